"""Model folders in ELMoForManyLangs' published layout, with random weights, and what ELMoForManyLangs computes
from them (the golden values of test_elmo.py).

    python testdata/make_elmoformanylangs.py              # testdata/elmoformanylangs/{both,chars,words}/ (torch only)
    python testdata/make_elmoformanylangs.py --golden     # + testdata/elmoformanylangs_golden.npz: run where
                                                          #   `pip install elmoformanylangs "overrides<5"` works
    python testdata/make_elmoformanylangs.py --sizes published --char-dic C --word-dic W --out DIR
                                                          # the published sizes, for bench.py and real programs

The layout that `elmoformanylangs.Embedder(model_dir)` reads, as HIT-SCIR/ELMoForManyLangs publishes it:
`config.json` (the training arguments; its `config_path` names the network configuration by an absolute path
on the authors' machine), that network configuration under its file name (published folders leave it out:
ELMoForManyLangs ships the one they name), `char.dic` and `word.dic` ("token<TAB>id" lines), and
`token_embedder.pkl` and `encoder.pkl` (state dicts, saved in the pre-1.6 PyTorch format the published models
have). The state dict names are those of ELMoForManyLangs' modules (ConvTokenEmbedder, ElmobiLm with
LstmCellWithProjection), written out here.

The tiny folders: `both` (word embedding + character CNN, as every published model), `chars` (no word
embedding) and `words` (no character CNN). Their dictionaries hold Unicode and CJK entries, a line whose token
is a space (ELMoForManyLangs reads it as U+3000), and a word of exactly 48 characters (longer tokens are cut
to it). The LSTM weights are scaled so that the cell and projection clipping (3.0) bite.
"""
import argparse
import json
import os
from collections import OrderedDict

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL_CHARS = ["<bos>", "<eos>", "<oov>", "<pad>", "<bow>", "<eow>"]     # the order of the published char.dic
SPECIAL_WORDS = ["<oov>", "<bos>", "<eos>", "<pad>"]                       # and word.dic
LONG_WORD = "Donaudampfschifffahrtsgesellschaftskapitänswitwe" + "nkasse"   # 54 characters; its first 48 are a word
WORDS = ["the", "cat", "sat", "on", "mat", ".", ",", "naïve", "café", "Straße", "gør", "привет", "мир", "中文",
         "天气", "好", "日本語", "東京", "ok", "\u3000", LONG_WORD[:48]]
CHARS = list(dict.fromkeys("abcdefghijklmnopqrstuvwxyzACDNST.,!?'ïéßøæåпривмир中文天气好日本語東京"))
SENTENCES = [["the", "cat", "sat", "on", "the", "mat", "."], ["Hi"], ["naïve", "café", "!", "ok"],
             ["привет", "мир", "!"], ["中文", "天气", "好", "。"], ["日本語", "\u3000", "東京", "x\u3000y"],
             [LONG_WORD, "Straße", "gør"], ["the", "<bos>", "cat", "<eos>", "sat"],
             ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"], ["unseen", "wörds", "ẞ", "🙂"]]
SIZES = {
    "tiny": dict(word_dim=5, char_dim=6, filters=[[1, 4], [2, 6], [3, 8]], n_highway=1, dim=24,
                 projection_dim=8, n_layers=2),
    # ELMoForManyLangs' cnn_50_100_512_4096_sample.json, which every published model names
    "published": dict(word_dim=100, char_dim=50, filters=[[1, 32], [2, 32], [3, 64], [4, 128], [5, 256],
                                                          [6, 512], [7, 1024]], n_highway=2, dim=4096,
                      projection_dim=512, n_layers=2),
}


def network_config(sizes: dict, word_dim: int, char_dim: int) -> dict:
    return {"encoder": {"name": "elmo", "projection_dim": sizes["projection_dim"], "cell_clip": 3, "proj_clip": 3,
                        "dim": sizes["dim"], "n_layers": sizes["n_layers"]},
            "token_embedder": {"name": "cnn", "activation": "relu", "filters": sizes["filters"],
                               "n_highway": sizes["n_highway"], "word_dim": word_dim, "char_dim": char_dim,
                               "max_characters_per_token": 50},
            "classifier": {"name": "sampled_softmax", "n_samples": 8192}, "dropout": 0.1}


def write_dic(path: str, tokens: list):
    with open(path, "w", encoding="utf-8") as f:
        for i, token in enumerate(tokens):
            f.write(f"{' ' if token == chr(0x3000) else token}\t{i}\n")      # a space: read back as U+3000


def write_folder(out: str, sizes: dict, chars: list | None, words: list | None, seed: int = 0, clip=False):
    """One model folder: dictionaries, configuration and random weights. chars/words None: no character CNN
    / no word embedding. clip: LSTM weights that make the clipping bite (the tests' folders)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).float()

    os.makedirs(out, exist_ok=True)
    word_dim, char_dim = (sizes["word_dim"] if words else 0), (sizes["char_dim"] if chars else 0)
    config = network_config(sizes, word_dim, char_dim)
    name = "cnn_50_100_512_4096_sample.json" if sizes is SIZES["published"] else "tiny_network.json"
    if sizes is not SIZES["published"]:      # published folders leave it out: ELMoForManyLangs ships that file
        with open(os.path.join(out, name), "w") as f:
            json.dump(config, f, indent=1)
    with open(os.path.join(out, "config.json"), "w") as f:    # the training arguments, as published
        json.dump({"seed": 1, "gpu": 3, "train_path": "/users4/conll18st/raw_text/raw.txt", "valid_path": None,
                   "config_path": f"/users4/conll18st/elmo/configs/{name}", "word_embedding": None,
                   "optimizer": "adam", "lr": 0.001, "model": "./final_models/model", "batch_size": 32,
                   "max_epoch": 10, "clip_grad": 5, "max_sent_len": 20, "min_count": 5,
                   "max_vocab_size": 150000}, f)
    P, D, L = sizes["projection_dim"], sizes["dim"], sizes["n_layers"]
    F = sum(n for _, n in sizes["filters"])
    emb = OrderedDict()
    if words:
        write_dic(os.path.join(out, "word.dic"), words)
        emb["word_emb_layer.embedding.weight"] = rand(len(words), word_dim)
    if chars:
        write_dic(os.path.join(out, "char.dic"), chars)
        emb["char_emb_layer.embedding.weight"] = rand(len(chars), char_dim)   # the <pad> row too: it is used
        for k, (width, n) in enumerate(sizes["filters"]):
            emb[f"convolutions.{k}.weight"] = rand(n, char_dim, width, std=0.5)
            emb[f"convolutions.{k}.bias"] = rand(n, std=0.1)
        for k in range(sizes["n_highway"]):
            emb[f"highways._layers.{k}.weight"] = rand(2 * F, F, std=F ** -0.5)
            emb[f"highways._layers.{k}.bias"] = rand(2 * F, std=0.5)
    emb["projection.weight"] = rand(P, word_dim + (F if chars else 0), std=(word_dim + F) ** -0.5)
    emb["projection.bias"] = rand(P, std=0.1)
    enc = OrderedDict()
    for k in range(L):
        for direction in ("forward", "backward"):
            # Strong inputs, a forget gate near 1 and large projections make the clipping bite (cells pile
            # up past 3 over a sentence); weak recurrent weights keep float rounding from growing along it.
            prefix = f"{direction}_layer_{k}"
            bias = rand(4 * D, std=0.5)
            bias[D:2 * D] += 2.0 if clip else 1.0
            enc[f"{prefix}.input_linearity.weight"] = rand(4 * D, P, std=(2.0 if clip else 1.0) * P ** -0.5)
            enc[f"{prefix}.state_linearity.weight"] = rand(4 * D, P, std=0.2 * P ** -0.5)
            enc[f"{prefix}.state_linearity.bias"] = bias
            enc[f"{prefix}.state_projection.weight"] = rand(P, D, std=(5.0 if clip else 1.0) * D ** -0.5)
    torch.save(emb, os.path.join(out, "token_embedder.pkl"), _use_new_zipfile_serialization=False)
    torch.save(enc, os.path.join(out, "encoder.pkl"), _use_new_zipfile_serialization=False)


def read_dic(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t")[0] for line in f if line.strip()]


def golden(folders: dict, out: str):
    """What ELMoForManyLangs computes: each output_layer from a fresh Embedder (its LSTM state carries over
    from call to call, so only a first call is comparable), every sentence in one batch; and a second call."""
    import elmoformanylangs                                 # only here: the folders need nothing but torch
    from elmoformanylangs import Embedder
    torch.set_num_threads(1)
    arrays = {"sentences_json": np.array(json.dumps(SENTENCES, ensure_ascii=False))}
    for name in ("cnn_50_100_512_4096_sample.json", "cnn_0_100_512_4096_sample.json"):   # what it falls back on
        with open(os.path.join(os.path.dirname(elmoformanylangs.__file__), "configs", name)) as f:
            arrays[f"config_{name}"] = np.array(json.dumps(json.load(f)))
    for kind, folder in folders.items():
        for layer in (-1, 0, 1, 2, -2):
            outputs = Embedder(folder, batch_size=64).sents2elmo(SENTENCES, output_layer=layer)
            for i, a in enumerate(outputs):
                arrays[f"{kind}_layer{layer}_{i}"] = a
        e = Embedder(folder, batch_size=64)
        e.sents2elmo(SENTENCES, output_layer=-2)
        for i, a in enumerate(e.sents2elmo(SENTENCES, output_layer=-2)):
            arrays[f"{kind}_call2_{i}"] = a
    np.savez_compressed(out, **arrays)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny", choices=list(SIZES))
    p.add_argument("--out", default=os.path.join(HERE, "elmoformanylangs"))
    p.add_argument("--char-dic", help="a published char.dic to use (default: the made-up one above)")
    p.add_argument("--word-dic", help="a published word.dic to use")
    p.add_argument("--golden", action="store_true", help="also write elmoformanylangs_golden.npz")
    args = p.parse_args()
    if args.sizes == "tiny":
        chars, words = SPECIAL_CHARS + CHARS + ["\u3000"], SPECIAL_WORDS + WORDS
        folders = {kind: os.path.join(args.out, kind) for kind in ("both", "chars", "words")}
        write_folder(folders["both"], SIZES["tiny"], chars, words, seed=1, clip=True)
        write_folder(folders["chars"], SIZES["tiny"], chars, None, seed=2, clip=True)
        write_folder(folders["words"], SIZES["tiny"], None, words, seed=3, clip=True)
        if args.golden:
            golden(folders, os.path.join(HERE, "elmoformanylangs_golden.npz"))
    else:
        chars = read_dic(args.char_dic) if args.char_dic else SPECIAL_CHARS + CHARS
        words = read_dic(args.word_dic) if args.word_dic else SPECIAL_WORDS + WORDS
        write_folder(args.out, SIZES["published"], chars, words, seed=0)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
