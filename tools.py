"""The tools around the model: `python elmo.py convert | export | embed | neighbors`, and the functions
behind them (importable).

    python elmo.py convert --options X_options.json --weights X_weights.hdf5 --out x.pt   # published -> ours
    python elmo.py export --elmo lm.pt --out-dir lm_tf          # ours -> options.json + weights.hdf5
    python elmo.py embed --elmo lm.pt --input sentences.txt --output vectors.hdf5   # as `allennlp elmo`
    python elmo.py neighbors --elmo lm.pt --sentences text.txt --word play          # the paper's Table 4
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

from elmo_pytorch.elmo import BiLM, load_elmo
from elmo_pytorch.published import convert_official, export_official
from elmo_pytorch.runtime import (ArgumentParser, Progress, UserError, atomic_save, check_numbers, check_out_dir,
                                  disk_full, fmt_time, is_disk_full, log_stderr, pick_device, refuse_overwrite,
                                  run_main)


# ---------------------------------------------------------------------------------------------------------
# Tools around the model, as functions (importable) and as `python elmo.py convert | export | embed |
# neighbors` (the parser at the end).
# ---------------------------------------------------------------------------------------------------------
def embed_by_length(bilm: BiLM, sentences: list, batch_size: int = 64, progress=None):
    """Yield (index, layers) for every sentence, shortest first: layers is (L+1, n, 2P), the sentence's n
    tokens in every ELMo layer, without <S> and </S>; an empty sentence gives (L+1, 0, 2P). Sentences go
    through the biLM in batches of similar length (sorted), so little is spent on padding; `progress(
    done_tokens)` is called after each batch. The biLM is stateless, so the order of the batches changes
    nothing. (AllenNLP's `embed_sentences` yields in input order, lazily: `allennlp_compat` has that one.)"""
    device = next(bilm.parameters()).device
    width = 2 * bilm.config.projection_dim
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for i in (i for i in order if not sentences[i]):
        yield i, torch.zeros(bilm.config.n_layers + 1, 0, width)
    order = [i for i in order if sentences[i]]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        with torch.no_grad():
            layers = torch.stack(bilm(bilm.lexicon.ids([sentences[i] for i in batch]).to(device))["activations"],
                                 dim=1).float().cpu()                              # (B, L+1, T, 2P)
        for b, i in enumerate(batch):
            yield i, layers[b, :, :len(sentences[i])]
        if progress:
            progress(sum(len(sentences[i]) for i in batch))


def embed_file(bilm: BiLM, input_path: str, output: str, layers: str = "all", batch_size: int = 64,
               tokenizer: str = "whitespace", encoding: str = "utf-8", job: dict | None = None,
               log=print) -> int:
    """ELMo vectors of every line of a text file -> HDF5, in the layout of AllenNLP's `allennlp elmo`
    command (`write_embeddings`): dataset i is line i, and "sentence_to_index" maps each (stripped) line to
    its index. An empty line gets a dataset with n = 0 (AllenNLP refused such files), so dataset i is
    always line i. Returns the number of lines."""
    from elmo_pytorch.data import read_lines, tokenize
    lines = [text.strip() for _, text in read_lines(input_path, encoding)]
    write_embeddings(bilm, [tokenize(text, tokenizer) for text in lines], output, layers, batch_size,
                     index={text: str(i) for i, text in enumerate(lines)}, job=job, log=log)
    return len(lines)


def write_embeddings(bilm: BiLM, sentences: list, output: str, layers: str = "all", batch_size: int = 64,
                     keys: list | None = None, index: dict | None = None, job: dict | None = None, log=print):
    """Sentences (token lists) -> an HDF5 file in the layout of AllenNLP's `allennlp elmo`, so code that
    read those files reads these: one float32 dataset per sentence, named keys[i] (default "0", "1", ...),
    shape (L+1, n, 2P) for layers="all", (n, 2P) for "top" (the last layer) and "average" (the mean of all
    L+1); and, when `index` is given, a dataset "sentence_to_index" holding it as JSON. The one writer of
    `python elmo.py embed` and `allennlp_compat.ElmoEmbedder.embed_file`.

    The file is written as `output + ".partial"` and renamed to `output` when complete. An interrupted run
    leaves the partial file; the same call (same `job`: input, model, options) continues from it."""
    import h5py
    keys = keys or [str(i) for i in range(len(sentences))]
    job = json.dumps(job or {}, sort_keys=True)
    partial = output + ".partial"
    h5 = None
    if os.path.exists(partial):
        try:
            h5 = h5py.File(partial, "a")
            if h5.attrs.get("job") != job:
                log(f"{partial} is from another job (input, model or options differ): starting over")
                h5.close()
                h5 = None
            else:
                log(f"continuing {partial}: {len(h5):,} of {len(sentences):,} lines already there")
        except OSError:
            log(f"{partial} is unreadable (interrupted while writing): starting over")
            h5 = None
    if h5 is None:
        h5 = h5py.File(partial, "w")
        h5.attrs["job"] = job
    try:            # on any failure the partial file stays behind, closed, for the same command to continue
        todo = [i for i in range(len(sentences)) if keys[i] not in h5]
        progress = Progress("embed", sum(len(sentences[i]) for i in todo), "tokens")
        for n, (i, vectors) in enumerate(embed_by_length(bilm, [sentences[i] for i in todo], batch_size,
                                                         progress)):
            if layers == "top":
                vectors = vectors[-1]                               # (L+1, n, 2P) -> (n, 2P)
            elif layers == "average":
                vectors = vectors.mean(dim=0)                       # (L+1, n, 2P) -> (n, 2P)
            h5.create_dataset(keys[todo[i]], data=vectors.numpy())
            if n % batch_size == batch_size - 1:
                h5.flush()                                          # what a later run can continue from
        if "sentence_to_index" in h5:                               # killed just before the rename
            del h5["sentence_to_index"]
        if index is not None:
            h5.create_dataset("sentence_to_index", (1,), dtype=h5py.string_dtype(), data=[json.dumps(index)])
        h5.close()
    except BaseException as e:
        try:
            h5.close()
        except Exception:  # noqa: BLE001  (closing after a failed write can fail again; the first error counts)
            pass
        if is_disk_full(e):
            raise disk_full(partial, "it keeps the lines written so far, and the same command continues from "
                            "it") from None
        raise
    os.replace(partial, output)


def nearest_words(bilm: BiLM, word: str, vocabulary: list, k: int = 5):
    """Layer 0 has one vector per word, whatever its context: the k words of `vocabulary` nearest to `word`
    by cosine of that vector (the paper's Table 4, GloVe row). -> [(word, cosine)]."""
    words = [w for w in dict.fromkeys(vocabulary) if w != word]
    with torch.no_grad():
        device = next(bilm.parameters()).device
        e = torch.cat([bilm.token_encoder(bilm.lexicon.ids([words[i:i + 4096]]).to(device))[0]
                       for i in range(0, len(words), 4096)]).float().cpu()         # (N, P)
        q = bilm.token_encoder(bilm.lexicon.ids([[word]]).to(device))[0].float().cpu()  # (1, P)
    cos = F.cosine_similarity(e, q)                                                    # (N,)
    top = cos.topk(min(k, len(words)))
    return [(words[j], float(c)) for c, j in zip(top.values, top.indices)]


def nearest_occurrences(bilm: BiLM, sentences: list, word: str, layer: int = -1, k: int = 5,
                        batch_size: int = 64):
    """Every occurrence of `word` in `sentences` (token lists), represented by ELMo layer `layer`; for each,
    its k nearest occurrences in *other* sentences by cosine (the paper's Table 4, biLM rows: the nearest
    uses of "play" are the ones in the same sense). -> occurrences [(sentence index, token position)] and,
    per occurrence, [(neighbour's occurrence index, cosine)]."""
    occurrences = [(s, t) for s, tokens in enumerate(sentences) for t, w in enumerate(tokens) if w == word]
    if len(occurrences) < 2:
        return occurrences, []
    used = sorted({s for s, _ in occurrences})
    vectors = {}
    for j, layers in embed_by_length(bilm, [sentences[s] for s in used], batch_size):
        vectors[used[j]] = layers[layer]                                               # (n, 2P)
    v = F.normalize(torch.stack([vectors[s][t] for s, t in occurrences]), dim=1)       # (O, 2P)
    cos = v @ v.T                                                                      # (O, O)
    same = torch.tensor([s for s, _ in occurrences])
    cos = cos.masked_fill(same.unsqueeze(0) == same.unsqueeze(1), float("-inf"))     # not the same sentence
    top = cos.topk(min(k, len(occurrences) - 1), dim=1)
    return occurrences, [[(int(j), float(c)) for c, j in zip(vals, idx) if c > float("-inf")]
                         for vals, idx in zip(top.values, top.indices)]


def _cli(argv=None):
    """`python elmo.py SUBCOMMAND`: one parser; each subcommand's --help shows an example; each runs as a
    function of its own below."""
    p = ArgumentParser(__doc__)
    sub = p.add_subparsers(dest="command", metavar="{convert,export,embed,neighbors}")

    def command(name, summary, example):
        return sub.add_parser(name, help=summary, description=f"{summary}\n\nexample:\n  {example}")

    def elmo_flags(q):
        q.add_argument("--elmo", required=True, help="biLM: a .pt checkpoint (train_lm.py, convert), a published "
                       "*_weights.hdf5 (its options found beside it, or --elmo-options), or an NLPL or "
                       "ELMoForManyLangs model folder or .zip")
        q.add_argument("--elmo-options", help="options JSON of a published weight file, when it is not "
                       "X_options.json or options.json beside X_weights.hdf5")
        q.add_argument("--lstm", default="auto", choices=["auto", "reference", "columns", "fused"],
                       help="auto: the faster exact path (the column-stepping cell when the weights clip, as "
                       "the published ones do, and on a CPU); reference: the cell as the equations read; "
                       "fused: nn.LSTM, which cannot clip")
        q.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
        q.add_argument("--tokenizer", default="whitespace", choices=["whitespace", "regex", "ptb"],
                       help="how lines become tokens (whitespace: the text is already tokenised)")
        q.add_argument("--batch-size", type=int, default=64, help="sentences per batch")

    q = command("convert", "published options JSON + weights HDF5 -> one of our .pt biLM checkpoints",
                "python elmo.py convert --options elmo_small_options.json --weights elmo_small_weights.hdf5 "
                "--out elmo_small.pt")
    q.add_argument("--options", required=True, help="the published options JSON")
    q.add_argument("--weights", required=True, help="the published weights HDF5")
    q.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q = command("export", "our biLM checkpoint -> DIR/options.json + DIR/weights.hdf5 (the published "
                "layout, which AllenNLP and bilm-tf read)", "python elmo.py export --elmo lm.pt --out-dir lm_tf")
    q.add_argument("--elmo", required=True, help="a biLM checkpoint (train_lm.py)")
    q.add_argument("--out-dir", required=True, help="folder for options.json and weights.hdf5")
    q.add_argument("--overwrite", action="store_true", help="replace the two files if the folder has them")
    q = command("embed", "ELMo vectors of every line of a text file -> HDF5 (AllenNLP's `allennlp elmo` "
                "layout)", "python elmo.py embed --elmo lm.pt --input sentences.txt --output vectors.hdf5")
    elmo_flags(q)
    q.add_argument("--input", required=True, help="text file, one sentence a line")
    q.add_argument("--output", required=True, help="HDF5 file to write (OUTPUT.partial until complete; "
                   "running the same command again continues an interrupted run)")
    q.add_argument("--layers", default="all", choices=["all", "top", "average"],
                   help="all: (L+1, n, 2P) per line; top: the last layer (n, 2P); average: their mean")
    q.add_argument("--encoding", default="utf-8", help="of --input")
    q.add_argument("--overwrite", action="store_true", help="replace --output if it exists (complete)")
    q = command("neighbors", "the paper's Table 4: the nearest other uses of a word, by a layer's cosine",
                "python elmo.py neighbors --elmo lm.pt --sentences reviews.txt --word play --k 3")
    elmo_flags(q)
    q.add_argument("--sentences", required=True, help="text file, one sentence a line")
    q.add_argument("--word", required=True, help="the word whose occurrences are compared")
    q.add_argument("--layer", type=int, default=-1, help="ELMo layer (0 = context-free token layer; "
                   "-1 = the top LSTM layer)")
    q.add_argument("--k", type=int, default=3, help="neighbours per occurrence")
    q.add_argument("--show", type=int, default=4, help="occurrences to show (the first ones in the file)")
    q.add_argument("--max-lines", type=int, default=0, help="read at most this many lines (0 = all)")
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return
    check_numbers(args, {"batch_size": (1, None), "k": (1, None), "show": (0, None), "max_lines": (0, None)})
    {"convert": convert_command, "export": export_command, "embed": embed_command,
     "neighbors": neighbors_command}[args.command](args)


def convert_command(args):
    refuse_overwrite([args.out], args.overwrite)
    check_out_dir(args.out)
    ckpt = convert_official(args.options, args.weights)
    atomic_save(ckpt, args.out)
    c = ckpt["config"]
    print(f"wrote {args.out}: biLM {c['n_layers']}x{c['lstm_dim']}_{c['projection_dim']}, clip "
          f"{c['cell_clip'] or 'off'}/{c['proj_clip'] or 'off'}; use it as --elmo {args.out}")


def export_command(args):
    refuse_overwrite([os.path.join(args.out_dir, name) for name in ("options.json", "weights.hdf5")],
                     args.overwrite)
    bilm = load_elmo(args.elmo)
    paths = export_official(asdict(bilm.config), bilm.state_dict(), args.out_dir)
    print(f"wrote {paths[0]} and {paths[1]} (published layout; no LM softmax)")


def frozen_for_tools(args) -> BiLM:
    """The biLM of `embed` and `neighbors`: frozen (so it remembers tokens across batches), on --device."""
    return load_elmo(args.elmo, pick_device(args.device), impl=args.lstm, options=args.elmo_options)


def embed_command(args):
    from elmo_pytorch.data import check_file
    check_out_dir(args.output, "--output")
    refuse_overwrite([args.output], args.overwrite)
    stat = os.stat(check_file(args.input, "--input"))
    bilm = frozen_for_tools(args)
    job = {"input": [os.path.abspath(args.input), stat.st_size, stat.st_mtime_ns],
           "elmo": os.path.abspath(args.elmo), "layers": args.layers, "tokenizer": args.tokenizer,
           "lstm": args.lstm}
    start = time.time()
    n = embed_file(bilm, args.input, args.output, args.layers, args.batch_size, args.tokenizer, args.encoding,
                   job, log_stderr)
    print(f"wrote {args.output}: {n:,} lines, layers {args.layers}, in {fmt_time(time.time() - start)}")


def neighbors_command(args):
    from elmo_pytorch.data import read_lines, tokenize
    bilm = frozen_for_tools(args)
    lines = [text for _, text in read_lines(args.sentences)]
    lines = lines[:args.max_lines] if args.max_lines > 0 else lines
    sentences = [tokenize(text, args.tokenizer) for text in lines]
    if not -bilm.config.n_layers - 1 <= args.layer <= bilm.config.n_layers:
        raise UserError(f"--layer must be in 0..{bilm.config.n_layers} (or negative from the top)")
    occurrences, neighbours = nearest_occurrences(bilm, sentences, args.word, args.layer, args.k,
                                                  args.batch_size)
    if len(occurrences) < 2:
        raise UserError(f"'{args.word}' occurs {len(occurrences)} time(s) in {args.sentences}; need at least "
                        f"two (tokens are compared exactly, after --tokenizer {args.tokenizer})")
    layer = args.layer % (bilm.config.n_layers + 1)

    def context(s, t, width=8):
        tokens = sentences[s]
        left, right = " ".join(tokens[max(0, t - width):t]), " ".join(tokens[t + 1:t + 1 + width])
        more_left, more_right = t > width, t + 1 + width < len(tokens)
        return f"{'... ' if more_left else ''}{left} [{tokens[t]}] {right}{' ...' if more_right else ''}"

    vocabulary = [w for tokens in sentences for w in tokens][:2_000_000]
    close = ", ".join(f"{w} {c:.2f}" for w, c in nearest_words(bilm, args.word, vocabulary, 8))
    n_sentences = len({s for s, _ in occurrences})
    print(f"'{args.word}': {len(occurrences):,} occurrences in {n_sentences:,} sentences of "
          f"{args.sentences}; layer {layer} of {bilm.config.n_layers}, cosine\n")
    print(f"layer 0 has one vector for every '{args.word}', whatever the context; its nearest other words:\n"
          f"    {close}\n")
    for o in range(min(args.show, len(occurrences))):
        s, t = occurrences[o]
        print(f"line {s + 1}: {context(s, t)}")
        for j, c in neighbours[o]:
            print(f"    {c:.2f}  line {occurrences[j][0] + 1}: {context(*occurrences[j])}")
        print()


def cli():
    """`elmo-pytorch` once installed: `python elmo.py`'s command line."""
    run_main(_cli)


if __name__ == "__main__":
    cli()
