"""What each layer of a frozen biLM knows (paper section 5.3): a probe per layer, on the layer alone.

ELMo mixes the biLM's layers because they hold different things: in the paper the first LSTM layer tags
parts of speech better (Table 6) and the second tells word senses apart better (Table 5). This script asks
that of any biLM. It runs the frozen biLM once over every distinct sentence of the data (the layer cache
of the task scripts), then fits, for every layer j = 0 (the character CNN: one vector per word, no
context) .. L and for a learned scalar mix of all of them, a probe that sees nothing but that vector:

  pos    part-of-speech tags; `word<TAB>tag` lines, a blank line between sentences. A linear classifier
         per layer (Liu et al., 2019), trained until the dev score stops improving. Accuracy.
  chunk  syntactic chunks; CoNLL-2000's `word POS chunk` lines (the POS column is not used). A linear
         classifier of the B-/I-/O tags; chunk F1 as CoNLL-2000's evaluation counts it: a chunk counts
         when its type and both ends match, and an I-X after O or after another type opens a chunk.
  wsd    word senses; a TSV `word<TAB>sense<TAB>position<TAB>text` (the text's token at `position` is the
         instance of `word`). The paper's method: each sense is the mean vector of its training instances,
         and an instance takes the sense nearest by cosine (1-nearest-neighbour); a linear classifier per
         word beside it. Accuracy, overall and per word.

Beside them, the baseline each task has without a biLM: the most frequent tag (chunk tag, sense) of each
word in the training data, unseen words taking the most frequent one overall. A tag that only dev has is
scored wrong. Prints the table; --metrics-json writes it (scores are fractions in [0, 1]).

  # CPU smoke run from a fresh clone, seconds (the tiny biLM of train_lm.py's smoke run)
  python probe.py --elmo /tmp/tiny.pt --task pos --train-file testdata/sample_pos.txt \\
      --dev-file testdata/sample_pos.txt --metrics-json /tmp/pos.json
  # a real run: chunks on CoNLL-2000 (add --device cuda on a GPU), then the control: the same
  # architecture untrained, which says how much comes from the architecture alone
  python probe.py --elmo lm.pt --task chunk --train-file chunk/train.txt --dev-file chunk/dev.txt \\
      --threads 2 --metrics-json chunk_lm.json
  python probe.py --elmo random --preset cpu --task wsd --train-file wsd/train.tsv --dev-file wsd/dev.tsv
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from elmo_pytorch.data import read_token_lines, read_tsv
from elmo_pytorch.downstream import LayerCache, frozen_bilm, task_optimizer
from elmo_pytorch.elmo import PRESETS, Elmo, ScalarMix
from elmo_pytorch.runtime import (ArgumentParser, UserError, check_numbers, fmt_time, log_stdout, run_main, setup,
                                  write_metrics)

METRICS = {"pos": "accuracy", "chunk": "chunk F1", "wsd": "accuracy"}


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    model = p.add_argument_group("model")
    model.add_argument("--elmo", required=True, help="biLM checkpoint (train_lm.py, elmo.py convert), a "
                       "published model (AllenNLP's *_weights.hdf5; an NLPL or ELMoForManyLangs folder or .zip), "
                       "or 'random' (the --preset architecture, untrained: the control)")
    model.add_argument("--elmo-options", help="options JSON of a published weight file (default: "
                       "X_options.json, else options.json, beside X_weights.hdf5)")
    model.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="architecture for --elmo random")
    data = p.add_argument_group("data")
    data.add_argument("--task", required=True, choices=sorted(METRICS))
    data.add_argument("--train-file", required=True, help="pos: word<TAB>tag lines; chunk: CoNLL-2000 lines "
                      "`word POS chunk`; both with a blank line between sentences; wsd: TSV with the header "
                      "word<TAB>sense<TAB>position<TAB>text")
    data.add_argument("--dev-file", required=True, help="same format: the probes stop when its score stops improving")
    data.add_argument("--test-file", help="same format: scored once, with the probe the dev score chose")
    opt = p.add_argument_group("optimisation (the linear probes)")
    opt.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    opt.add_argument("--batch-size", type=int, default=256, help="tokens (instances) per step")
    opt.add_argument("--epochs", type=int, default=30, help="at most")
    opt.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a better dev score")
    runtime = p.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    runtime.add_argument("--threads", type=int, default=0)
    runtime.add_argument("--seed", type=int, default=1)
    runtime.add_argument("--metrics-json", help="write the table here as JSON")
    args = p.parse_args(argv)
    check_numbers(args, {"lr": ((0,), None), "batch_size": (1, None), "epochs": (1, None), "patience": (1, None),
                         "threads": (0, None)})
    return args


# ---------------------------------------------------------------------------------------------------------
# Data: every split as the sentences the biLM reads and the positions whose vectors are probed
# ---------------------------------------------------------------------------------------------------------
def read_split(task: str, path: str) -> dict:
    """A file of `task` -> {"sentences": token lists, "positions": (sentence, token) pairs probed, "words":
    the word at each position (wsd: the lexical item), "labels": the gold label at each position}."""
    if task in ("pos", "chunk"):
        rows = read_token_lines(path, 2, "\t", "word<TAB>tag") if task == "pos" else \
            read_token_lines(path, 3, " ", "`word POS chunk`, single spaces (CoNLL-2000)")
        sentences = [[r[0] for r in s] for s in rows]
        positions = [(i, t) for i, s in enumerate(sentences) for t in range(len(s))]
        return {"sentences": sentences, "positions": positions, "words": [sentences[i][t] for i, t in positions],
                "labels": [r[-1] for s in rows for r in s]}
    split = {"sentences": [], "positions": [], "words": [], "labels": []}
    for number, row in read_tsv(path, ["word", "sense", "position", "text"]):
        tokens = row["text"].split(" ")
        try:
            position = int(row["position"])
        except ValueError:
            raise UserError(f"{path}:{number}: position must be a whole number, not {row['position']!r}") from None
        if not 0 <= position < len(tokens):
            raise UserError(f"{path}:{number}: position {position} is outside its text ({len(tokens)} tokens, "
                            f"0-based)")
        split["positions"].append((len(split["sentences"]), position))
        split["sentences"].append(tokens)
        split["words"].append(row["word"])
        split["labels"].append(row["sense"])
    if not split["positions"]:
        raise UserError(f"{path} has a header but no instances")
    return split


def chunks(tags: list) -> set:
    """B-/I-/O tags of one sentence -> its chunks {(start, end, type)}, as CoNLL-2000's conlleval reads
    them: B-X opens a chunk; I-X continues a chunk of type X and opens one after O or another type."""
    found, start, kind = set(), None, None
    for t, tag in enumerate(list(tags) + ["O"]):
        prefix, _, tag_kind = tag.partition("-")
        if start is not None and (prefix in ("B", "O") or tag_kind != kind):
            found.add((start, t, kind))                 # the open chunk ends before token t
            start = None
        if prefix in ("B", "I") and start is None:
            start, kind = t, tag_kind
    return found


def chunk_f1(gold: list, predicted: list) -> float:
    """Sentences of gold and predicted tags -> F1 of the chunks (precision and recall over all chunks)."""
    correct = n_gold = n_predicted = 0
    for g, p in zip(gold, predicted):
        g, p = chunks(g), chunks(p)
        correct, n_gold, n_predicted = correct + len(g & p), n_gold + len(g), n_predicted + len(p)
    if not correct:
        return 0.0
    precision, recall = correct / n_predicted, correct / n_gold
    return 2 * precision * recall / (precision + recall)


def score(task: str, split: dict, predicted: list) -> float:
    """The task's metric for predicted labels (strings), one per position of `split`."""
    if task != "chunk":
        return sum(p == g for p, g in zip(predicted, split["labels"])) / len(predicted)
    by_sentence_gold, by_sentence_predicted = defaultdict(list), defaultdict(list)
    for (i, _), g, p in zip(split["positions"], split["labels"], predicted):
        by_sentence_gold[i].append(g)
        by_sentence_predicted[i].append(p)
    return chunk_f1(list(by_sentence_gold.values()), [by_sentence_predicted[i] for i in by_sentence_gold])


def most_frequent_labels(train: dict):
    """The baseline: word -> its most frequent training label; unseen words: the most frequent overall."""
    counts = defaultdict(Counter)
    for w, y in zip(train["words"], train["labels"]):
        counts[w][y] += 1
    overall = Counter(train["labels"]).most_common(1)[0][0]
    best = {w: c.most_common(1)[0][0] for w, c in counts.items()}
    return lambda words: [best.get(w, overall) for w in words]


# ---------------------------------------------------------------------------------------------------------
# Features: the frozen biLM's layers at the probed positions, computed once per distinct sentence
# ---------------------------------------------------------------------------------------------------------
def layer_vectors(elmo: Elmo, splits: dict, log) -> dict:
    """{name: split} -> {name: (N, L+1, 2P) fp32}: every layer's vector at each probed position. One
    LayerCache over the distinct sentences of all splits; the rows probed are kept, the rest is dropped."""
    cache = LayerCache(elmo, [s for split in splits.values() for s in split["sentences"]], log=log)
    out = {}
    for name, split in splits.items():
        rows = [cache.offsets[tuple(split["sentences"][i])] + 1 + t for i, t in split["positions"]]  # +1: <S>
        out[name] = cache.rows[torch.tensor(rows)].float()
    return out


# ---------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------
class LinearProbe(nn.Module):
    """A linear classifier on layer `layer`'s vector, or (layer None) on a learned scalar mix of all layers
    (paper eq. 1). `allowed` (N, labels) restricts each instance to its word's senses (wsd)."""

    def __init__(self, n_layers: int, dim: int, n_labels: int, layer: int | None):
        super().__init__()
        self.layer = layer
        self.mix = ScalarMix(n_layers) if layer is None else None
        self.linear = nn.Linear(dim, n_labels)

    def features(self, x):                              # (N, L+1, 2P) -> (N, 2P)
        return x[:, self.layer] if self.mix is None else self.mix(list(x.unbind(dim=1)))

    def forward(self, x, allowed=None):                 # (N, L+1, 2P) -> (N, labels)
        logits = self.linear(self.features(x))
        return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))


def predict(probe: LinearProbe, x, allowed, batch: int = 4096):
    with torch.no_grad():
        return torch.cat([probe(x[i:i + batch], None if allowed is None else allowed[i:i + batch]).argmax(dim=1)
                          for i in range(0, len(x), batch)])


def fit(probe: LinearProbe, train: tuple, dev_score, args, name: str, log) -> float:
    """Adam on the cross-entropy of `train` = (x, y, allowed), one pass an epoch, until `dev_score(probe)`
    has not improved for --patience epochs; the probe keeps its best state. Returns the best dev score."""
    x, y, allowed = train
    opt = task_optimizer(probe.parameters(), "adam", args.lr, x.device)
    generator = torch.Generator().manual_seed(args.seed)
    best, best_state, waited = -1.0, None, 0
    for epoch in range(1, args.epochs + 1):
        for idx in torch.randperm(len(y), generator=generator).split(args.batch_size):
            loss = F.cross_entropy(probe(x[idx], None if allowed is None else allowed[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        current = dev_score(probe)
        if current > best:
            best, waited = current, 0
            best_state = {k: v.detach().clone() for k, v in probe.state_dict().items()}
        else:
            waited += 1
        if waited >= args.patience:
            break
    probe.load_state_dict(best_state)
    log(f"  {name:<8} dev {best:.4f} after {epoch} epochs")
    return best


def nearest_sense(train_vectors, train_y, vectors, allowed, n_labels: int):
    """The paper's word-sense method (section 5.3): each sense is the mean of its training instances'
    vectors; an instance takes the allowed sense whose mean is nearest by cosine. (N, D) -> (N,) label ids."""
    sums = train_vectors.new_zeros(n_labels, train_vectors.shape[1]).index_add_(0, train_y, train_vectors)
    counts = torch.bincount(train_y, minlength=n_labels).unsqueeze(1)
    centroids = F.normalize(sums / counts.clamp(min=1), dim=1)                  # (labels, D)
    cosine = F.normalize(vectors, dim=1) @ centroids.T                           # (N, labels)
    cosine = cosine.masked_fill(~allowed | (counts.T == 0), float("-inf"))
    return cosine.argmax(dim=1)


def probe_task(task: str, elmo: Elmo, splits: dict, args, device, log) -> dict:
    """Features once, then every probe: the metrics of the module docstring (without "elmo")."""
    t0 = time.time()
    vectors = {k: v.to(device) for k, v in layer_vectors(elmo, splits, log).items()}
    feature_seconds = time.time() - t0
    train = splits["train"]
    labels = sorted(set(train["labels"]))
    label_id = {y: i for i, y in enumerate(labels)}
    allowed = {k: None for k in splits}                 # pos, chunk: every label for every token
    if task == "wsd":                                   # each instance chooses among its word's senses
        senses = defaultdict(set)
        for w, y in zip(train["words"], train["labels"]):
            senses[w].add(label_id[y])
        allowed = {k: torch.tensor([[j in senses[w] for j in range(len(labels))] for w in s["words"]],
                                   device=device) for k, s in splits.items()}
    y_train = torch.tensor([label_id[y] for y in train["labels"]], device=device)
    evaluated = [k for k in ("dev", "test") if k in splits]

    def as_labels(ids) -> list:
        return [labels[i] for i in ids.tolist()]

    n_layers, dim = vectors["train"].shape[1:]
    guesses = {"layers": {}}                            # {table: {probe: {split: predicted labels}}}
    linear = {}
    log(f"linear probes ({len(labels)} labels, {len(y_train):,} training {'instances' if task == 'wsd' else 'tokens'}):")
    t0 = time.time()
    for layer in [*range(n_layers), None]:
        name = "mix" if layer is None else str(layer)
        torch.manual_seed(args.seed)
        probe = LinearProbe(n_layers, dim, len(labels), layer).to(device)
        fit(probe, (vectors["train"], y_train, allowed["train"]),
            lambda p: score(task, splits["dev"], as_labels(predict(p, vectors["dev"], allowed["dev"]))),
            args, f"layer {name}" if layer is not None else "mix", log)
        linear[name] = probe
        guesses["layers"][name] = {k: as_labels(predict(probe, vectors[k], allowed[k])) for k in evaluated}
    if task == "wsd":                                   # the paper's 1-NN is the main table; the linear beside
        guesses["linear"] = guesses["layers"]
        guesses["layers"] = {}
        for name, probe in linear.items():
            with torch.no_grad():
                features = {k: probe.features(v) for k, v in vectors.items()}
            guesses["layers"][name] = {k: as_labels(nearest_sense(features["train"], y_train, features[k],
                                                                  allowed[k], len(labels))) for k in evaluated}
    baseline = most_frequent_labels(train)
    base = {k: baseline(splits[k]["words"]) for k in evaluated}
    mix = linear["mix"].mix
    metrics = {"task": task, "metric": METRICS[task],
               **{table: {name: {k: score(task, splits[k], p) for k, p in by_split.items()}
                          for name, by_split in probes.items()} for table, probes in guesses.items()},
               "baseline": {k: score(task, splits[k], base[k]) for k in evaluated},
               "mix_weights": torch.softmax(mix.weights.detach(), dim=0).tolist(),
               "mix_gamma": float(mix.gamma.detach())}
    if task == "wsd":
        metrics["per_word"] = per_word(splits, guesses, base, evaluated)
    metrics["seconds"] = {"features": round(feature_seconds, 1), "probes": round(time.time() - t0, 1)}
    metrics["examples"] = {k: len(s["labels"]) for k, s in splits.items()}
    return metrics


def per_word(splits: dict, guesses: dict, base: dict, evaluated: list) -> dict:
    """wsd: each word's accuracy in every table (1-NN and linear, every probe), and its baseline's."""
    out = {}
    for word in sorted(set(splits["train"]["words"])):
        rows = {k: [i for i, w in enumerate(splits[k]["words"]) if w == word] for k in evaluated}

        def accuracy(k, predicted):
            return sum(predicted[i] == splits[k]["labels"][i] for i in rows[k]) / max(len(rows[k]), 1)
        entry = {table: {name: {k: accuracy(k, p[k]) for k in evaluated} for name, p in probes.items()}
                 for table, probes in guesses.items()}
        out[word] = {**entry, "baseline": {k: accuracy(k, base[k]) for k in evaluated},
                     "instances": {k: len(r) for k, r in rows.items()}}
    return out


def report(metrics: dict, log):
    """The table: one line per layer, the mix and the baseline, dev (and test) scores."""
    evaluated = list(metrics["baseline"])
    method = "1-nearest-neighbour sense (linear probe)" if metrics["task"] == "wsd" else "linear probe"
    log(f"{metrics['task']}: {metrics['metric']} of a {method} on each layer of {metrics['elmo']}")
    for name, result in [*metrics["layers"].items(), ("baseline", metrics["baseline"])]:
        label = {"0": "layer 0 (no context)", "mix": "scalar mix", "baseline": "most frequent label"}.get(
            name, f"layer {name}")
        cells = "  ".join(f"{k} {result[k]:.4f}" + (f" ({metrics['linear'][name][k]:.4f})"
                                                   if "linear" in metrics and name in metrics["linear"] else "")
                          for k in evaluated)
        log(f"  {label:<22} {cells}")
    log(f"  mix weights softmax(s) = [{', '.join(f'{w:.3f}' for w in metrics['mix_weights'])}], "
        f"gamma {metrics['mix_gamma']:.3f}")


def main(argv=None):
    """Read the splits, load the frozen biLM, probe every layer, report."""
    args = parse_args(argv)
    device = setup(args)
    # ---- data
    files = {"train": args.train_file, "dev": args.dev_file, "test": args.test_file}
    splits = {k: read_split(args.task, path) for k, path in files.items() if path}
    counts = ", ".join(f"{k} {len(s['labels']):,}" for k, s in splits.items())
    log_stdout(f"data: {counts} {'instances' if args.task == 'wsd' else 'tokens'} ({args.task})")
    # ---- the frozen biLM: an Elmo whose layers() the layer cache calls
    bilm, described = frozen_bilm(args.elmo, args.preset, args.seed, args.elmo_options)
    if bilm is None:
        raise UserError("--elmo none has no layers to probe: give a biLM, or 'random'")
    elmo = Elmo(bilm.to(device), 1, dropout=0.0)
    # ---- probes
    start = time.time()
    metrics = {**probe_task(args.task, elmo, splits, args, device, log_stdout), "elmo": described}
    report(metrics, log_stdout)
    log_stdout(f"done in {fmt_time(time.time() - start)} (features {metrics['seconds']['features']}s, "
               f"probes {metrics['seconds']['probes']}s)")
    write_metrics(args.metrics_json, metrics)


def cli():
    """`elmo-pytorch-probe` once installed: this script's command line."""
    run_main(main)


if __name__ == "__main__":
    cli()
