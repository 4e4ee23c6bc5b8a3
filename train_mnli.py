"""Natural language inference (MultiNLI) on frozen ELMo: a shared BiLSTM encodes premise and hypothesis.

The GLUE baseline design: premise and hypothesis go through the same features (ELMo mix of a frozen biLM,
or word embeddings for `--elmo none`) and the same BiLSTM, are max-pooled to u and v, and an MLP classifies
[u; v; |u - v|; u * v]. `--cross-attention` adds ESIM-style soft alignment between the two token sequences
(Chen et al., 2017) before pooling. Data: TSV `premise<TAB>hypothesis<TAB>label` (labels as names or 0
entailment, 1 neutral, 2 contradiction; -1 and '-' rows are dropped; an optional `genre` column gives
per-genre accuracy), or the hub (nyu-mll/multi_nli: matched and mismatched validation reported separately).

  # CPU smoke run from a fresh clone, under a minute (the tiny biLM of train_lm.py's smoke run)
  python train_mnli.py --elmo /tmp/tiny.pt --train-file testdata/sample_nli.tsv \\
      --dev-file testdata/sample_nli.tsv --max-steps 30 --out /tmp/mnli.pt --overwrite
  # a real run: MultiNLI from the hub (or --data-dir DIR with train.tsv and dev.tsv; --device cuda)
  python train_mnli.py --elmo lm.pt --max-minutes 15 --out mnli.pt
  # resume (the same command plus --resume), evaluate, predict
  python train_mnli.py --elmo lm.pt --max-minutes 15 --out mnli.pt --resume
  python train_mnli.py --eval-only --ckpt /tmp/mnli.pt --test-file testdata/sample_nli.tsv --metrics-json m.json
  python train_mnli.py --ckpt mnli.pt --predict "A man is playing a guitar. ||| A person makes music."
"""
from __future__ import annotations

import os
import random

import torch
import torch.nn as nn

from elmo_pytorch import data
from elmo_pytorch.data import UserError
from elmo_pytorch.downstream import (BiLstmEncoder, TokenFeatures, check_task_numbers, features_spec,
                                     load_classifier, pool, resume_checkpoint, task_arguments, train_task,
                                     write_task_text)
from elmo_pytorch.runtime import ArgumentParser, log_stdout, run_main, setup, write_metrics

LABELS = ["entailment", "neutral", "contradiction"]       # GLUE / HF multi_nli order: 0, 1, 2
HUB = "nyu-mll/multi_nli"
HUB_DEV = {"matched": "validation_matched", "mismatched": "validation_mismatched"}


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    model, data_group, opt, _, ckpt = task_arguments(p, out_default="mnli.pt")
    model.add_argument("--encoder", default="bilstm", choices=["bilstm", "mean"], help="'mean': mean-pooled "
                       "features, no LSTM (CBoW baseline)")
    model.add_argument("--cross-attention", action="store_true", help="ESIM-style alignment of premise and "
                       "hypothesis tokens before pooling")
    model.add_argument("--hidden", type=int, default=256, help="BiLSTM size per direction and MLP width")
    model.add_argument("--elmo-dropout", type=float, default=0.5, help="dropout on the ELMo mix (AllenNLP: 0.5)")
    model.add_argument("--dropout", type=float, default=0.2, help="dropout before the MLP")
    model.add_argument("--word-dropout", type=float, help="dropout on the word embeddings x_k (default: "
                       "--dropout)")
    data_group.add_argument("--train-file", help="TSV with a header: premise<TAB>hypothesis<TAB>label[<TAB>genre]")
    data_group.add_argument("--dev-file", help="same format, for early stopping")
    data_group.add_argument("--data-dir", help="folder with train.tsv and dev.tsv")
    data_group.add_argument("--tokenizer", default="ptb", choices=list(data.TOKENIZERS), help="MultiNLI is raw "
                            "text; 'ptb' splits \"doesn't\" into \"does n't\" (pretrain the biLM the same way)")
    opt.add_argument("--clip-norm", type=float, default=0.0, help="clip the gradient norm to this (0 = off)")
    ckpt.add_argument("--write-lm-text", metavar="FILE",
                      help="write the training premises and hypotheses (each once) to FILE, one a line, as "
                      "text for train_lm.py --init-from (paper 3.4: fine-tune the biLM on the task's "
                      "text), and exit")
    ckpt.add_argument("--predict", help="'premise ||| hypothesis': classify with --ckpt, print probabilities")
    args = p.parse_args(argv)
    if args.word_dropout is None:
        args.word_dropout = args.dropout
    check_task_numbers(args)
    return args


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def read_examples(path, args):
    """A local TSV -> list of (premise tokens, hypothesis tokens, label id, genre or None)."""
    data.check_file(path)
    examples, unlabeled = [], 0
    with_genre = "genre" in next(data.read_lines(path, args.encoding, args.skip_bad_lines), (0, ""))[1].split("\t")
    columns = ["premise", "hypothesis", "label"] + (["genre"] if with_genre else [])
    for number, row in data.read_tsv(path, columns, args.encoding, args.skip_bad_lines):
        label = parse_label(row["label"])
        if label == -1:
            unlabeled += 1
            continue
        if label is None:
            raise UserError(f"{path}:{number}: label {row['label']!r} is not one of {', '.join(LABELS)} "
                            f"(or 0, 1, 2; -1 = unlabeled)")
        premise = data.tokenize(row["premise"], args.tokenizer)[: args.max_length]
        hypothesis = data.tokenize(row["hypothesis"], args.tokenizer)[: args.max_length]
        if premise and hypothesis:
            examples.append((premise, hypothesis, label, row.get("genre")))
    if not examples:
        raise UserError(f"{path} has no usable examples" + (f" ({unlabeled} unlabeled)" if unlabeled else ""))
    return examples


def parse_label(text):
    """'entailment' / 'neutral' / 'contradiction' or 0 / 1 / 2 -> 0 / 1 / 2; '-1' or '-' -> -1; else None."""
    text = text.strip().lower()
    if text in LABELS:
        return LABELS.index(text)
    if text in ("-1", "-"):
        return -1
    return int(text) if text in ("0", "1", "2") else None


def load_split(args, split):
    """Examples of 'train' or 'dev' from --train-file/--dev-file, --data-dir or the hub. The hub's dev is
    a dict {"matched": [...], "mismatched": [...]}; a local dev file is {"dev": [...]}."""
    path = args.train_file if split == "train" else args.dev_file
    if path is None and args.data_dir:
        path = os.path.join(args.data_dir, f"{split}.tsv")
        if not os.path.exists(path):
            raise UserError(f"--data-dir {args.data_dir} has no {split}.tsv")
    if path:
        examples = read_examples(path, args)
        return examples if split == "train" else {"dev": examples}
    def hub(split_name):
        ds = data.hub_dataset(HUB, None, split_name, "--train-file F --dev-file F, or --data-dir D")
        return [(data.tokenize(p, args.tokenizer)[: args.max_length], data.tokenize(h, args.tokenizer)[: args.max_length],
                 int(y), g) for p, h, y, g in zip(ds["premise"], ds["hypothesis"], ds["label"], ds["genre"])
                if int(y) >= 0 and p.strip() and h.strip()]
    return hub("train") if split == "train" else {name: hub(s) for name, s in HUB_DEV.items()}


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------
class PairClassifier(nn.Module):
    """Shared features and BiLSTM for both sentences -> (ESIM alignment) -> max pool -> u, v ->
    MLP([u; v; |u - v|; u * v]) -> 3 logits."""

    def __init__(self, features: TokenFeatures, n_classes: int, encoder="bilstm", hidden=256, pooling="max",
                 dropout=0.2, cross_attention=False):
        super().__init__()
        self.features = features
        self.encoder = BiLstmEncoder(features.output_dim, hidden, encoder)
        self.pooling = pooling
        width = self.encoder.output_dim + features.elmo_output_dim
        if cross_attention:   # ESIM: enhance each token with its soft-aligned counterpart, then compose
            self.project = nn.Sequential(nn.Linear(4 * width, hidden), nn.ReLU())
            self.compose = BiLstmEncoder(hidden, hidden, "bilstm")
            width = self.compose.output_dim
        self.cross_attention = cross_attention
        width *= 2 if pooling == "max+mean" else 1
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_classes))

    def forward(self, premises, hypotheses):            # B + B token lists -> (B, classes)
        x, mask, elmo_out = self.features(premises + hypotheses)   # one batch for both: (2B, T, F), ...
        h = self.encoder(x, mask)                       # (2B, T, 2H)
        if elmo_out is not None:                        # --elmo-at output|both: [h_k; ELMo_k] (paper 3.3)
            h = torch.cat([h, elmo_out], dim=-1)
        B = len(premises)
        (a, b), (ma, mb) = h.split(B), mask.split(B)    # (B, T, 2H) each
        if self.cross_attention:
            scores = a @ b.transpose(1, 2)              # (B, T, T): premise token i vs hypothesis token j
            a_hat = torch.softmax(scores.masked_fill(~mb.unsqueeze(1), -1e4), dim=2) @ b       # (B, T, 2H)
            b_hat = torch.softmax(scores.masked_fill(~ma.unsqueeze(2), -1e4), dim=1).transpose(1, 2) @ a
            a = self.compose(self.project(torch.cat([a, a_hat, a - a_hat, a * a_hat], -1)), ma)
            b = self.compose(self.project(torch.cat([b, b_hat, b - b_hat, b * b_hat], -1)), mb)
        u, v = pool(a, ma, self.pooling), pool(b, mb, self.pooling)                          # (B, W)
        return self.mlp(torch.cat([u, v, (u - v).abs(), u * v], dim=-1))


def build_model(spec: dict, bilm_state=None):
    """The classifier from a spec (stored in checkpoints as plain values), with its biLM if any."""
    features = TokenFeatures.from_spec(spec, bilm_state)
    return PairClassifier(features, len(spec["labels"]), spec["encoder"], spec["hidden"], spec["pooling"],
                          spec["dropout"], spec["cross_attention"])


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, examples, batch_size):
    """Accuracy, and per genre where the examples carry one."""
    model.eval()
    hits = []
    lengths = torch.tensor([max(len(p), len(h)) for p, h, _, _ in examples])
    for batch in data.bucket_batches(lengths, 10 ** 9, seed=0, shuffle=False, max_sentences=batch_size * 4):
        logits = model([examples[i][0] for i in batch], [examples[i][1] for i in batch])
        hits += [(i, int(p == examples[i][2])) for p, i in zip(logits.argmax(-1).tolist(), batch)]
    model.train()
    metrics = {"accuracy": sum(h for _, h in hits) / len(hits), "n": len(hits)}
    genres = sorted({g for *_, g in examples if g})
    if genres:
        metrics["genres"] = {g: sum(h for i, h in hits if examples[i][3] == g) /
                             sum(1 for i, _ in hits if examples[i][3] == g) for g in genres}
    return metrics


def evaluate_all(model, dev, batch_size):
    """{split: metrics} for every dev split; "accuracy" is their mean (what early stopping watches)."""
    per_split = {name: evaluate(model, examples, batch_size) for name, examples in dev.items()}
    return {"accuracy": sum(m["accuracy"] for m in per_split.values()) / len(per_split),
            "n": sum(m["n"] for m in per_split.values()), "splits": per_split}


def predict_or_evaluate(args, device, log):
    """--predict "PREMISE ||| HYPOTHESIS" (the class probabilities) or --eval-only (accuracy, per genre
    where the file has them, on --test-file) with --ckpt."""
    if not args.ckpt:
        raise UserError("--predict and --eval-only need --ckpt PATH (a train_mnli.py checkpoint)")
    ckpt, model = load_classifier(args.ckpt, "mnli", build_model, device)
    labels = ckpt["spec"]["labels"]
    if args.predict is not None:
        if args.predict.count("|||") != 1:
            raise UserError('--predict takes "premise ||| hypothesis"')
        premise, hypothesis = (data.tokenize(t, args.tokenizer) for t in args.predict.split("|||"))
        if not premise or not hypothesis:
            raise UserError('--predict takes "premise ||| hypothesis", both non-empty')
        with torch.no_grad():
            p = torch.softmax(model([premise], [hypothesis]), -1)[0].tolist()
        log(f"{labels[max(range(len(p)), key=p.__getitem__)]}\t" +
            " ".join(f"{name}={q:.3f}" for name, q in zip(labels, p)))
        return
    if not args.test_file:
        raise UserError("--eval-only needs --test-file FILE")
    metrics = evaluate(model, read_examples(args.test_file, args), args.batch_size)
    log(f"eval {args.ckpt} on {args.test_file}: accuracy {100 * metrics['accuracy']:.2f}% of {metrics['n']:,}"
        + "".join(f" | {g} {100 * a:.1f}%" for g, a in metrics.get("genres", {}).items()))
    write_metrics(args.metrics_json, metrics)


def main(argv=None):
    """--predict / --eval-only with a checkpoint, or: read the sentence pairs, build the pair classifier on
    the frozen biLM's features (or word embeddings alone), train it with downstream.train_task."""
    args = parse_args(argv)
    log, device = log_stdout, setup(args)
    if args.predict is not None or args.eval_only:
        return predict_or_evaluate(args, device, log)
    resume = resume_checkpoint(args, "mnli")

    # ---- data ---------------------------------------------------------------------------------------
    random.seed(args.seed)
    train = load_split(args, "train")
    if args.write_lm_text:       # premises and hypotheses, each once
        sentences = list(dict.fromkeys(tuple(s) for example in train for s in example[:2]))
        return write_task_text(sentences, args.write_lm_text, args.overwrite, log)
    dev = load_split(args, "dev")
    log(f"data: train {len(train):,} pairs, dev " + ", ".join(f"{k} {len(v):,}" for k, v in dev.items())
        + f" pairs; labels {LABELS}")

    # ---- model --------------------------------------------------------------------------------------
    if resume:
        spec, bilm_state = resume["spec"], resume["bilm"]
    else:
        spec, bilm_state = features_spec(args, [p + h for p, h, _, _ in train])
        spec.update(task="mnli", labels=LABELS, cross_attention=args.cross_attention)
    torch.manual_seed(args.seed)
    model = build_model(spec, bilm_state).to(device)

    # ---- training -----------------------------------------------------------------------------------
    def batch_of(indices):                              # -> (the model's inputs, labels)
        inputs = [train[i][0] for i in indices], [train[i][1] for i in indices]
        return inputs, torch.tensor([train[i][2] for i in indices])
    sentences = [s for p, h, _, _ in train + [e for v in dev.values() for e in v] for s in (p, h)]
    train_task(model, "mnli", spec, bilm_state, torch.tensor([max(len(p), len(h)) for p, h, _, _ in train]),
               batch_of, lambda m: evaluate_all(m, dev, args.batch_size), args, device, resume,
               cache_sentences=sentences, log=log)


def cli():
    """`elmo-pytorch-train-mnli` once installed: this script's command line."""
    run_main(main)


if __name__ == "__main__":
    cli()
