"""Sentiment classification (SST-2 / SST-5) on frozen ELMo: biLM layers -> scalar mix -> BiLSTM -> pool -> MLP.

Reads a biLM checkpoint (`--elmo lm.pt`, from train_lm.py or `elmo.py convert`), or AllenNLP's published
weights (`--elmo elmo_..._weights.hdf5`, with `elmo_..._options.json` beside it), or builds a baseline:
`--elmo random` (the same architecture, untrained, frozen) or `--elmo none` (trainable word embeddings, no
pretraining). Data: SST-2 style TSV (`sentence<TAB>label`, with a header) or SST trees in PTB format
(`trainDevTestTrees_PTB`: one tree a line, root label = sentence label), or the hub (stanfordnlp/sst2,
SetFit/sst5). Writes `--out` (best dev accuracy) and `<out>.last.pt`.

  # CPU smoke run from a fresh clone, under a minute (the tiny biLM of train_lm.py's smoke run)
  python train_sst.py --elmo /tmp/tiny.pt --train-file testdata/sample_sst.tsv \\
      --dev-file testdata/sample_sst.tsv --max-steps 30 --out /tmp/sst.pt --overwrite
  # a real run: SST-2 from the hub (or --data-dir DIR with train.tsv and dev.tsv; --device cuda)
  python train_sst.py --elmo lm.pt --task sst2 --max-minutes 10 --out sst2.pt
  python train_sst.py --elmo lm.pt --task sst5 --data-dir sst5_trees --phrases --out sst5.pt
  # resume (the same command plus --resume), evaluate, predict
  python train_sst.py --elmo lm.pt --task sst2 --max-minutes 10 --out sst2.pt --resume
  python train_sst.py --eval-only --ckpt /tmp/sst.pt --test-file testdata/sample_sst.tsv --metrics-json m.json
  python train_sst.py --ckpt sst2.pt --predict "a gorgeous , witty , seductive movie ."
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

LABELS = {"sst2": ["negative", "positive"],
          "sst5": ["very negative", "negative", "neutral", "positive", "very positive"]}
# Defaults of the flags that depend on --encoder. BCN takes AllenNLP's SST-5 configuration
# (biattentive_classification_network_elmo.jsonnet): 300 units, the gradient norm clipped at 5, and one
# dropout on the concatenated token features [ELMo_k; x_k] (BCN's embedding dropout) instead of one on
# each part, so ELMo is not dropped twice (that configuration sets ELMo's own dropout to 0).
DEFAULTS = {"hidden": 256, "elmo_dropout": 0.5, "clip_norm": 0.0}          # word_dropout: --dropout
BCN_DEFAULTS = {"hidden": 300, "elmo_dropout": 0.0, "word_dropout": 0.0, "clip_norm": 5.0}
HUB = {"sst2": ("stanfordnlp/sst2", None, "sentence", "validation"),
       "sst5": ("SetFit/sst5", None, "text", "validation")}


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    model, data_group, opt, _, ckpt = task_arguments(p, out_default="sst.pt")
    model.add_argument("--encoder", default="bilstm", choices=["bilstm", "mean", "bcn"], help="'mean': the "
                       "notebook's mean-pooled features -> MLP, no LSTM; 'bcn': the biattentive classification "
                       "network (McCann et al., 2017), the paper's SST-5 model; it changes the defaults of "
                       "--hidden, --elmo-dropout, --word-dropout and --clip-norm to AllenNLP's SST-5 "
                       "configuration")
    model.add_argument("--hidden", type=int, help="BiLSTM size per direction and MLP width (default 256; "
                       "--encoder bcn: 300, as AllenNLP's SST-5 configuration)")
    model.add_argument("--elmo-dropout", type=float, help="dropout on the ELMo mix (default 0.5, AllenNLP's "
                       "ELMo default; --encoder bcn: 0, its embedding dropout already drops ELMo)")
    model.add_argument("--dropout", type=float, default=0.2, help="dropout before the MLP (--encoder bcn: "
                       "after its first maxout layer, 0.2 in AllenNLP's configuration)")
    model.add_argument("--word-dropout", type=float, help="dropout on the word embeddings x_k (default: "
                       "--dropout; --encoder bcn: 0, its embedding dropout already drops them)")
    data_group.add_argument("--task", default="sst2", choices=sorted(LABELS))
    data_group.add_argument("--train-file", help="TSV (sentence<TAB>label) or PTB trees; SST is already "
                            "tokenised (\"does n't\"), so lines are split at spaces (--predict: raw text, "
                            "cut as SST is, --tokenizer ptb)")
    data_group.add_argument("--dev-file", help="same format, for early stopping")
    data_group.add_argument("--data-dir", help="folder with train.{tsv,txt} and dev.{tsv,txt}")
    data_group.add_argument("--phrases", action="store_true", help="trees: also train on every labelled subtree")
    opt.add_argument("--clip-norm", type=float, help="clip the gradient norm to this (0 = off; default 0, "
                     "--encoder bcn: 5 as AllenNLP's SST-5 configuration)")
    ckpt.add_argument("--write-lm-text", metavar="FILE",
                      help="write the training sentences (each once; a phrase inside a longer one dropped) "
                      "to FILE, one a line, as text for train_lm.py --init-from (paper 3.4: fine-tune "
                      "the biLM on the task's text), and exit")
    ckpt.add_argument("--predict", help="classify this text with --ckpt and print the probabilities")
    args = p.parse_args(argv)
    defaults = BCN_DEFAULTS if args.encoder == "bcn" else {**DEFAULTS, "word_dropout": args.dropout}
    for name, value in defaults.items():               # the flags the user did not give: the encoder's defaults
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_task_numbers(args)
    return args


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def read_examples(path, task, args, phrases=False):
    """A local TSV or tree file -> list of (tokens, label id). Format from the first line."""
    data.check_file(path)
    labels = LABELS[task]
    first = next((line for _, line in data.read_lines(path, args.encoding, args.skip_bad_lines) if line.strip()),
                 None)
    if first is None:
        raise UserError(f"{path} has no examples")
    examples = []
    if first.lstrip().startswith("("):
        for number, line in data.read_lines(path, args.encoding, args.skip_bad_lines):
            if not line.strip():
                continue
            try:
                _, _, subtrees = data.parse_tree(line.strip())
            except ValueError as e:
                raise UserError(f"{path}:{number}: not a PTB tree ({e})") from None
            for k, (label, tokens) in enumerate(subtrees if phrases else subtrees[:1]):
                if not 0 <= label <= 4:
                    raise UserError(f"{path}:{number}: label {label} is not in 0-4")
                if task == "sst2":          # the standard binarisation: 0-1 negative, 3-4 positive, 2 dropped
                    if label == 2:
                        continue
                    label = int(label > 2)
                examples.append((tokens[: args.max_length], label))
        if phrases:                          # the same phrase occurs in many trees: keep one copy
            examples = list(dict.fromkeys((tuple(t), y) for t, y in examples))
            examples = [(list(t), y) for t, y in examples]
    else:
        for number, row in data.read_tsv(path, ["sentence", "label"], args.encoding, args.skip_bad_lines):
            label = parse_label(row["label"], labels)
            if label is None:
                raise UserError(f"{path}:{number}: label {row['label']!r} is not one of 0-{len(labels) - 1} "
                                f"for --task {task}")
            tokens = data.tokenize(row["sentence"])[: args.max_length]
            if tokens:
                examples.append((tokens, label))
    if not examples:
        raise UserError(f"{path} has no usable examples")
    return examples


def parse_label(text, labels):
    text = text.strip()
    if text in labels:
        return labels.index(text)
    try:
        value = int(float(text))
    except ValueError:
        return None
    return value if 0 <= value < len(labels) and float(text) == value else None


def load_split(args, split):
    """(tokens, label) examples of 'train' or 'dev' from --train-file/--dev-file, --data-dir or the hub."""
    path = args.train_file if split == "train" else args.dev_file
    if path is None and args.data_dir:
        for ext in ("tsv", "txt"):
            candidate = os.path.join(args.data_dir, f"{split}.{ext}")
            if os.path.exists(candidate):
                path = candidate
                break
        else:
            raise UserError(f"--data-dir {args.data_dir} has no {split}.tsv or {split}.txt")
    if path:
        return read_examples(path, args.task, args, phrases=args.phrases and split == "train")
    name, config, column, dev_split = HUB[args.task]
    ds = data.hub_dataset(name, config, "train" if split == "train" else dev_split,
                          "--train-file F --dev-file F, or --data-dir D")
    return [(data.tokenize(t)[: args.max_length], int(y)) for t, y in zip(ds[column], ds["label"])
            if data.tokenize(t)]


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------
class SentenceClassifier(nn.Module):
    """features -> (BiLSTM) -> max/mean pool -> MLP -> class logits."""

    def __init__(self, features: TokenFeatures, n_classes: int, encoder="bilstm", hidden=256, pooling="max",
                 dropout=0.2):
        super().__init__()
        self.features = features
        self.encoder = BiLstmEncoder(features.output_dim, hidden, encoder)
        self.pooling = pooling
        width = (self.encoder.output_dim + features.elmo_output_dim) * (2 if pooling == "max+mean" else 1)
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_classes))

    def forward(self, sentences):                       # B token lists -> (B, classes)
        x, mask, elmo_out = self.features(sentences)    # (B, T, F), (B, T), (B, T, 2P) or None
        h = self.encoder(x, mask)                       # (B, T, 2H)
        if elmo_out is not None:                        # --elmo-at output|both: [h_k; ELMo_k] (paper 3.3)
            h = torch.cat([h, elmo_out], dim=-1)
        return self.mlp(pool(h, mask, self.pooling))


class Maxout(nn.Module):
    """A maxout layer (Goodfellow et al., 2013): `pieces` linear maps, the largest one wins, per output unit;
    dropout on what it outputs, as AllenNLP's Maxout applies its per-layer dropout."""

    def __init__(self, input_dim: int, output_dim: int, pieces: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim * pieces)
        self.dropout = nn.Dropout(dropout)
        self.output_dim, self.pieces = output_dim, pieces

    def forward(self, x):                               # (B, in) -> (B, out * pieces) -> (B, out)
        return self.dropout(self.linear(x).view(-1, self.output_dim, self.pieces).max(dim=-1).values)


class BCN(nn.Module):
    """The biattentive classification network (McCann et al., 2017, section 5), which the ELMo paper used for
    SST-5, with the sizes and dropouts of AllenNLP's SST-5 ELMo configuration (H = --hidden, 300 there):
    features -> ReLU layer (H) -> BiLSTM encoder X (B, T, 2H) -> self-biattention: each token attends over
    the sentence's tokens, C = softmax(X X^T) X -> integrator BiLSTM over [X; X - C; X * C] -> (ELMo here
    with --elmo-at output|both) -> max, min, mean and self-attentive pooling -> three maxout layers.

    Dropout sits where AllenNLP puts it: once on the token features (`embedding_dropout`: 0.5 with ELMo,
    0.25 without, as its two SST-5 configurations; so TokenFeatures' own dropouts are 0 for BCN), inside the
    ReLU layer (0.25), on the pooled vector (`integrator_dropout`, 0.1) and after each maxout layer
    (--dropout, default 0.2, then 0.3 and 0)."""

    def __init__(self, features: TokenFeatures, n_classes: int, hidden=300, dropout=0.2):
        super().__init__()
        self.features = features
        self.embedding_dropout = nn.Dropout(0.5 if features.elmo is not None else 0.25)
        self.pre_encode = nn.Sequential(nn.Linear(features.output_dim, hidden), nn.ReLU(), nn.Dropout(0.25))
        self.encoder = BiLstmEncoder(hidden, hidden)
        self.integrator = BiLstmEncoder(3 * self.encoder.output_dim, hidden)
        width = self.integrator.output_dim + features.elmo_output_dim
        self.attend = nn.Linear(width, 1)                                       # self-attentive pooling
        self.integrator_dropout = nn.Dropout(0.1)
        # AllenNLP: output dims [1200, 600, classes] for H = 300, pool size 4, dropout [0.2, 0.3, 0.0]
        self.output = nn.Sequential(Maxout(4 * width, 4 * hidden, 4, dropout),
                                    Maxout(4 * hidden, 2 * hidden, 4, 0.3), Maxout(2 * hidden, n_classes, 4, 0.0))

    def forward(self, sentences):                       # B token lists -> (B, classes)
        x, mask, elmo_out = self.features(sentences)    # (B, T, F), (B, T), (B, T, 2P) or None
        X = self.encoder(self.pre_encode(self.embedding_dropout(x)), mask)     # (B, T, 2H)
        keys = mask.unsqueeze(1)                                                # (B, 1, T): real tokens only
        attention = torch.softmax((X @ X.transpose(1, 2)).masked_fill(~keys, float("-inf")), dim=-1)
        C = attention @ X                                                       # (B, T, T) @ (B, T, 2H)
        h = self.integrator(torch.cat([X, X - C, X * C], dim=-1), mask)        # (B, T, 6H) -> (B, T, 2H)
        if elmo_out is not None:
            h = torch.cat([h, elmo_out], dim=-1)                                # (B, T, W)
        m = mask.unsqueeze(-1)
        weights = torch.softmax(self.attend(h).squeeze(-1).masked_fill(~mask, float("-inf")), dim=-1)
        pooled = torch.cat([pool(h, mask, "max"), -pool(-h, mask, "max"), pool(h, mask, "mean"),
                            (weights.unsqueeze(-1) * h * m).sum(1)], dim=-1)   # max, min, mean, attentive
        return self.output(self.integrator_dropout(pooled))                    # (B, 4W) -> (B, classes)


def build_model(spec: dict, bilm_state=None):
    """The classifier from a spec (stored in checkpoints as plain values), with its biLM if any."""
    features = TokenFeatures.from_spec(spec, bilm_state)
    if spec["encoder"] == "bcn":
        return BCN(features, len(spec["labels"]), spec["hidden"], spec["dropout"])
    return SentenceClassifier(features, len(spec["labels"]), spec["encoder"], spec["hidden"], spec["pooling"],
                              spec["dropout"])


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, examples, batch_size):
    model.eval()
    correct = 0
    lengths = torch.tensor([len(t) for t, _ in examples])
    for batch in data.bucket_batches(lengths, 10 ** 9, seed=0, shuffle=False, max_sentences=batch_size * 4):
        logits = model([examples[i][0] for i in batch])
        correct += sum(int(p == examples[i][1]) for p, i in zip(logits.argmax(-1).tolist(), batch))
    model.train()
    return {"accuracy": correct / len(examples), "n": len(examples)}


def predict_or_evaluate(args, device, log):
    """--predict TEXT (the class probabilities) or --eval-only (accuracy on --test-file) with --ckpt."""
    if not args.ckpt:
        raise UserError("--predict and --eval-only need --ckpt PATH (a train_sst.py checkpoint)")
    ckpt, model = load_classifier(args.ckpt, "sst", build_model, device)
    labels = ckpt["spec"]["labels"]
    if args.predict is not None:
        text = args.predict.lower() if ckpt["spec"].get("lowercase") else args.predict
        tokens = data.tokenize(text, "ptb")                 # SST is PTB-tokenised: "does n't"
        if not tokens:
            raise UserError("--predict needs some text")
        with torch.no_grad():
            p = torch.softmax(model([tokens]), -1)[0].tolist()
        log(f"{labels[max(range(len(p)), key=p.__getitem__)]}\t" +
            " ".join(f"{name}={q:.3f}" for name, q in zip(labels, p)))
        return
    if not args.test_file:
        raise UserError("--eval-only needs --test-file FILE")
    examples = read_examples(args.test_file, ckpt["spec"]["task"], args)
    metrics = evaluate(model, examples, args.batch_size)
    log(f"eval {args.ckpt} on {args.test_file}: accuracy {100 * metrics['accuracy']:.2f}% of {metrics['n']:,}")
    write_metrics(args.metrics_json, metrics)


def main(argv=None):
    """--predict / --eval-only with a checkpoint, or: read SST, build the classifier on the frozen biLM's
    features (or word embeddings alone), train it with downstream.train_task."""
    args = parse_args(argv)
    log, device = log_stdout, setup(args)
    if args.predict is not None or args.eval_only:
        return predict_or_evaluate(args, device, log)
    resume = resume_checkpoint(args, "sst")

    # ---- data ---------------------------------------------------------------------------------------
    random.seed(args.seed)
    train = load_split(args, "train")
    if args.write_lm_text:       # each sentence once, not every sub-phrase of it again
        return write_task_text(data.maximal_phrases([tokens for tokens, _ in train]), args.write_lm_text,
                               args.overwrite, log)
    dev = load_split(args, "dev")
    log(f"data: {args.task} train {len(train):,} examples, dev {len(dev):,} examples; labels {LABELS[args.task]}")

    # ---- model --------------------------------------------------------------------------------------
    if resume:
        spec, bilm_state = resume["spec"], resume["bilm"]
    else:
        spec, bilm_state = features_spec(args, [tokens for tokens, _ in train])
        spec.update(task=args.task, labels=LABELS[args.task],
                    lowercase=all(w == w.lower() for tokens, _ in train for w in tokens))   # SST-2 is
    torch.manual_seed(args.seed)
    model = build_model(spec, bilm_state).to(device)

    # ---- training -----------------------------------------------------------------------------------
    def batch_of(indices):                              # -> (the model's inputs, labels)
        return ([train[i][0] for i in indices],), torch.tensor([train[i][1] for i in indices])
    train_task(model, "sst", spec, bilm_state, torch.tensor([len(t) for t, _ in train]), batch_of,
               lambda m: evaluate(m, dev, args.batch_size), args, device, resume,
               cache_sentences=[t for t, _ in train + dev], log=log)


def cli():
    """`elmo-pytorch-train-sst` once installed: this script's command line."""
    run_main(main)


if __name__ == "__main__":
    cli()
