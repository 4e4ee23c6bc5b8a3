"""A model folder in the NLPL vector repository's layout, and what simple_elmo computes from it (the golden
values of test_elmo.py).

    python testdata/make_nlpl.py             # testdata/nlpl/ (needs nothing but the standard library)
    python testdata/make_nlpl.py --golden    # + testdata/nlpl_golden.npz: run where simple_elmo imports
        # (pip install simple-elmo tensorflow-cpu; pip install tf_keras==<TensorFlow's version> --no-deps;
        #  TF_USE_LEGACY_KERAS=1)
    python testdata/make_nlpl.py --sizes small --out DIR    # a published size (small, medium, original):
        # our untrained biLM, seed 0, clipping 3, in the same layout, for real programs and benchmarks

The repository's ELMo archives (vectors.nlpl.eu/repository, e.g. 223.zip) hold `model.hdf5` (bilm-tf's weight
layout, the one AllenNLP publishes), `options.json`, `vocab.txt` (words, most frequent first, with <S>, </S>,
<UNK>), `meta.json` and a `README`. The weights here are the golden fixture's (testdata/weights.hdf5: a tiny
random biLM whose LSTM clipping bites), with its options; the vocabulary holds Norwegian and Russian words.
The tests zip the folder themselves, as the repository ships it.
"""
import argparse
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "nlpl")
VOCAB = ["<S>", "</S>", "<UNK>", ".", ",", "og", "i", "det", "er", "som", "en", "på", "å", "til", "ikke", "for",
         "jeg", "han", "hun", "med", "av", "år", "skole", "barn", "ønsker", "и", "в", "не", "на", "что", "он",
         "с", "это", "как", "мир", "привет", "школа", "дети", "год", "the", "cat", "sat"]
TEXTS = [["Det", "er", "en", "fin", "dag", "."], ["Han", "går", "på", "skolen", "i", "Tromsø", "."],
         ["Привет", ",", "мир", "!"], ["Дети", "идут", "в", "школу", "."], ["jeg"],
         ["Barna", "ønsker", "å", "lese", "bøker", "om", "sommeren", "på", "hytta", "."],
         ["the", "cat", "sat", "on", "the", "mat"], ["«", "Hva", "nå", "?", "»"]]
EQUAL = [["Det", "er", "en", "fin", "dag"], ["Он", "читает", "книгу", "в", "саду"],
         ["the", "cat", "sat", "on", "mats"]]                    # texts of one length: the averages agree


def write_folder(out: str = OUT):
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(HERE, "weights.hdf5"), os.path.join(out, "model.hdf5"))
    with open(os.path.join(HERE, "options.json")) as f:
        options = json.load(f)
    with open(os.path.join(out, "options.json"), "w") as f:
        json.dump(options, f)
    with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(VOCAB) + "\n")
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"id": 0, "algorithm": {"name": "ELMo", "tool": "bilm-tf"}, "dimensions": 32,
                   "corpus": [{"description": "made-up test model (random weights)", "language": "nor"}],
                   "vocabulary": {"size": len(VOCAB)}}, f, indent=1)
    with open(os.path.join(out, "README"), "w") as f:
        f.write("A tiny random ELMo model in the NLPL repository's layout, for tests (testdata/make_nlpl.py).\n")


def write_published_size(size: str, out: str):
    """Our untrained biLM of a published size (elmo.PRESETS), seed 0, clipping 3 as the published models,
    as the repository lays it out (its vocab.txt: the tiny one above; it only saves simple_elmo time)."""
    import sys
    from dataclasses import asdict
    sys.path.insert(0, os.path.dirname(HERE))               # the clone: elmo_pytorch
    import torch
    from elmo_pytorch.elmo import PRESETS, BiLM, ELMoConfig
    from elmo_pytorch.published import export_official
    torch.manual_seed(0)
    config = ELMoConfig(**PRESETS[size], cell_clip=3.0, proj_clip=3.0, vocab_size=0)
    _, weights = export_official(asdict(config), BiLM(config).state_dict(), out)
    os.replace(weights, os.path.join(out, "model.hdf5"))
    with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(VOCAB) + "\n")


def golden(out: str):
    """simple_elmo's outputs: a fresh model, warmup=False, every text in one batch (what ours equals), each
    `layers` value; the averages on texts of one length (where its average and ours agree) and of several
    (where its includes the padding of shorter texts); and, to show its state, several batches and warm-up."""
    import numpy as np
    import tensorflow as tf
    from simple_elmo import ElmoModel

    def run(method, texts, batch_size=64, **kwargs):       # a fresh model in a graph of its own
        with tf.Graph().as_default():
            m = ElmoModel()
            m.load(OUT, max_batch_size=batch_size)
            return getattr(m, method)(texts, **kwargs)
    arrays = {"texts_json": np.array(json.dumps(TEXTS, ensure_ascii=False)),
              "equal_json": np.array(json.dumps(EQUAL, ensure_ascii=False))}
    for layers in ("average", "top", "all"):
        arrays[f"vectors_{layers}"] = run("get_elmo_vectors", TEXTS, warmup=False, layers=layers)
        arrays[f"average_equal_{layers}"] = run("get_elmo_vector_average", EQUAL, warmup=False, layers=layers)
        arrays[f"average_mixed_{layers}"] = run("get_elmo_vector_average", TEXTS, warmup=False, layers=layers)
    arrays["vectors_average_batches_of_2"] = run("get_elmo_vectors", TEXTS, batch_size=2, warmup=False)
    arrays["vectors_average_warmup"] = run("get_elmo_vectors", TEXTS)
    np.savez_compressed(out, **arrays)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--golden", action="store_true", help="also write nlpl_golden.npz (needs simple_elmo)")
    p.add_argument("--sizes", choices=["small", "medium", "original"], help="a published size, into --out")
    p.add_argument("--out", help="with --sizes: the folder to write")
    args = p.parse_args()
    if args.sizes:
        write_published_size(args.sizes, args.out)
        print(f"wrote {args.out}")
        return
    write_folder()
    if args.golden:
        golden(os.path.join(HERE, "nlpl_golden.npz"))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
