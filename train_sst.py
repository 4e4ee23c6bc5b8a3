"""Sentiment classification (SST-2 / SST-5) on frozen ELMo: biLM layers -> scalar mix -> BiLSTM -> pool -> MLP.

Reads a biLM checkpoint (`--elmo lm.pt`, from train_lm.py or `elmo.py convert`), or AllenNLP's published
weights (`--elmo elmo_..._weights.hdf5`, with `elmo_..._options.json` beside it), or builds a baseline:
`--elmo random` (the same architecture, untrained, frozen) or `--elmo none` (trainable word embeddings, no
pretraining). Data: SST-2 style TSV (`sentence<TAB>label`, with a header) or SST trees in PTB format
(`trainDevTestTrees_PTB`: one tree a line, root label = sentence label), or the hub (stanfordnlp/sst2,
SetFit/sst5). Writes `--out` (best dev accuracy) and `<out>.last.pt`.

  # CPU smoke run, under a minute (tiny biLM from train_lm.py's smoke run)
  python train_sst.py --elmo /tmp/tiny.pt --task sst2 --train-file ../shared/data/sst2/dev.tsv \\
      --dev-file ../shared/data/sst2/dev.tsv --max-steps 30 --out /tmp/sst.pt
  # a real run: SST-2 with the movie-review biLM (or --device cuda)
  python train_sst.py --elmo lm.pt --task sst2 --data-dir ../shared/data/sst2 --max-minutes 10 --out sst2.pt
  python train_sst.py --elmo lm.pt --task sst5 --data-dir ../shared/data/sst5 --phrases --out sst5.pt
  # resume, evaluate, predict
  python train_sst.py --resume --out sst2.pt --elmo lm.pt --task sst2 --data-dir ../shared/data/sst2
  python train_sst.py --eval-only --ckpt sst2.pt --test-file ../shared/data/sst2/dev.tsv --metrics-json m.json
  python train_sst.py --ckpt sst2.pt --predict "a gorgeous , witty , seductive movie ."
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from data import UserError
from downstream import (BiLstmEncoder, TokenFeatures, cache_layers, frozen_bilm, load_task_state, pool,
                        task_optimizer)
from elmo import PRESETS
from runtime import (CHECKPOINT_FORMAT, ArgumentParser, abort_nonfinite, all_finite, atomic_save, fmt_time,
                     last_path, load_checkpoint, pick_device, run_main, write_metrics)

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
    g = p.add_argument_group("model")
    g.add_argument("--elmo", help="biLM checkpoint (train_lm.py, elmo.py convert) or a published "
                   "*_weights.hdf5, 'random' (same architecture as --preset, untrained) or 'none' (word "
                   "embeddings only)")
    g.add_argument("--elmo-options", help="options JSON of a published weight file (default: X_options.json, "
                   "else options.json, beside X_weights.hdf5)")
    g.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="architecture for --elmo random")
    g.add_argument("--encoder", default="bilstm", choices=["bilstm", "mean", "bcn"], help="'mean': the "
                   "notebook's mean-pooled features -> MLP, no LSTM; 'bcn': the biattentive classification "
                   "network (McCann et al., 2017), the paper's SST-5 model; it changes the defaults of --hidden, "
                   "--elmo-dropout, --word-dropout and --clip-norm to AllenNLP's SST-5 configuration")
    g.add_argument("--hidden", type=int, help="BiLSTM size per direction and MLP width (default 256; "
                   "--encoder bcn: 300, as AllenNLP's SST-5 configuration)")
    g.add_argument("--pooling", default="max", choices=["max", "mean", "max+mean"])
    g.add_argument("--word-dim", type=int, default=300, help="trainable word embeddings x_k concatenated "
                   "with ELMo as in the paper ([ELMo_k; x_k]), or alone for --elmo none; 0 = ELMo only")
    g.add_argument("--elmo-at", default="input", choices=["input", "output", "both"], help="where ELMo enters "
                   "the task model (paper 3.3, Table 3): the task BiLSTM's input, its output, or both, each "
                   "with its own scalar mix (paper: input for SST; both helped SNLI and SQuAD)")
    g.add_argument("--elmo-dropout", type=float, help="dropout on the ELMo mix (default 0.5, AllenNLP's "
                   "ELMo default; --encoder bcn: 0, its embedding dropout already drops ELMo)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout before the MLP (--encoder bcn: after "
                   "its first maxout layer, 0.2 in AllenNLP's configuration)")
    g.add_argument("--word-dropout", type=float, help="dropout on the word embeddings x_k (default: --dropout; "
                   "--encoder bcn: 0, its embedding dropout already drops them)")
    g.add_argument("--layer-norm", action="store_true", help="layer-normalise biLM layers before mixing")
    g.add_argument("--mix-l2", type=float, default=0.0, help="L2 penalty on the mix weights (paper's lambda; "
                   "0.001 in the paper for some tasks)")
    g = p.add_argument_group("data")
    g.add_argument("--task", default="sst2", choices=sorted(LABELS))
    g.add_argument("--train-file", help="TSV (sentence<TAB>label) or PTB trees")
    g.add_argument("--dev-file", help="same format, for early stopping")
    g.add_argument("--data-dir", help="folder with train.{tsv,txt} and dev.{tsv,txt}")
    g.add_argument("--phrases", action="store_true", help="trees: also train on every labelled subtree")
    g.add_argument("--max-length", type=int, default=100, help="cut sentences longer than this (tokens)")
    g.add_argument("--encoding", default="utf-8")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip lines that do not decode (counted)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--clip-norm", type=float, help="clip the gradient norm to this (0 = off; default 0, "
                   "--encoder bcn: 5 as AllenNLP's SST-5 configuration)")
    g.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--max-steps", type=int, default=0, help="0 = no limit")
    g.add_argument("--max-minutes", type=float, default=0, help="0 = no limit (evaluation time counted)")
    g.add_argument("--patience", type=int, default=3, help="stop after this many evaluations without a "
                   "better dev accuracy (0 = never)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0 = each epoch)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    g.add_argument("--cache", default="auto", choices=["auto", "memory", "disk", "off"], help="compute the "
                   "frozen biLM's layers once, before training: 'memory' (fp32, exact) or 'disk' (fp16 "
                   "memory-mapped file, for data larger than RAM); auto = memory when it needs under a "
                   "quarter of RAM, else disk")
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--log-every", type=int, default=100)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--out", default="sst.pt", help="best checkpoint; the latest goes to <out>.last.pt")
    g.add_argument("--write-lm-text", metavar="FILE",
                   help="write the training sentences (each once; a phrase inside a longer one dropped) "
                   "to FILE, one a line, as text for train_lm.py --init-from (paper 3.4: fine-tune "
                   "the biLM on the task's text), and exit")
    g.add_argument("--resume", action="store_true", help="continue from <out>.last.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate --ckpt on --test-file and exit")
    g.add_argument("--ckpt", help="classifier checkpoint for --eval-only / --predict")
    g.add_argument("--test-file", help="file for --eval-only")
    g.add_argument("--predict", help="classify this text with --ckpt and print the probabilities")
    g.add_argument("--metrics-json", help="write the last evaluation here as JSON")
    args = p.parse_args(argv)
    defaults = BCN_DEFAULTS if args.encoder == "bcn" else {**DEFAULTS, "word_dropout": args.dropout}
    for name, value in defaults.items():               # the flags the user did not give: the encoder's defaults
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("max_steps", "max_minutes", "epochs", "batch_size", "patience", "eval_every", "threads",
                 "hidden", "max_length"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")
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




def load_classifier(path, device):
    ckpt = load_checkpoint(path, "sst")
    model = build_model(ckpt["spec"], ckpt["bilm"])
    load_task_state(model, ckpt["model"])
    return ckpt, model.to(device).eval()



# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)   # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    # ---- predict / eval-only ------------------------------------------------------------------------
    if args.predict is not None or args.eval_only:
        if not args.ckpt:
            raise UserError("--predict and --eval-only need --ckpt PATH (a train_sst.py checkpoint)")
        ckpt, model = load_classifier(args.ckpt, device)
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
        return

    # ---- checkpoint to resume -----------------------------------------------------------------------
    last = last_path(args.out)
    resume = None
    if args.resume:
        if not os.path.exists(last):
            raise UserError(f"--resume: no checkpoint {last} to resume from")
        resume = load_checkpoint(last, "sst")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"--out directory does not exist: {os.path.dirname(os.path.abspath(args.out))}")

    # ---- data ---------------------------------------------------------------------------------------
    random.seed(args.seed)
    train = load_split(args, "train")
    if args.write_lm_text:
        n = data.write_lm_text(data.maximal_phrases([tokens for tokens, _ in train]), args.write_lm_text)
        log(f"wrote {n:,} sentences to {args.write_lm_text} (for train_lm.py --init-from LM --train-file "
            f"{args.write_lm_text})")
        return
    dev = load_split(args, "dev")
    labels = LABELS[args.task]
    log(f"data: {args.task} train {len(train):,} examples, dev {len(dev):,} examples; labels {labels}")

    # ---- model --------------------------------------------------------------------------------------
    if resume:
        spec, bilm_state = resume["spec"], resume["bilm"]
    else:
        bilm, described = frozen_bilm(args.elmo, args.preset, args.seed, args.elmo_options)
        if bilm is None and not args.word_dim:
            raise UserError("--elmo none needs --word-dim > 0 (there would be no features at all)")
        if args.elmo_at == "output" and not args.word_dim:
            raise UserError("--elmo-at output needs --word-dim > 0 (the task BiLSTM's input would be empty)")
        word_vocab = None
        if args.word_dim or bilm is None:
            word_vocab = data.build_vocab([tokens for tokens, _ in train], max_size=10 ** 9)
        spec = {"task": args.task, "labels": labels, "bilm_config": asdict(bilm.config) if bilm else None,
                "word_vocab": word_vocab, "word_dim": args.word_dim, "layer_norm": args.layer_norm,
                "elmo_dropout": args.elmo_dropout, "elmo_at": args.elmo_at, "encoder": args.encoder,
                "hidden": args.hidden, "pooling": args.pooling, "dropout": args.dropout,
                "word_dropout": args.word_dropout, "elmo": described,
                "lowercase": all(w == w.lower() for tokens, _ in train for w in tokens)}   # SST-2 is
        bilm_state = bilm.state_dict() if bilm else None
    torch.manual_seed(args.seed)
    model = build_model(spec, bilm_state).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_before = {k: v.clone() for k, v in model.features.elmo.bilm.state_dict().items()} \
        if model.features.elmo is not None else {}
    opt = task_optimizer(trainable, args.optimizer, args.lr, device)
    step, epoch, batch_in_epoch, trained_s, best, bad_evals = 0, 0, 0, 0.0, -1.0, 0
    if resume:
        load_task_state(model, resume["model"])
        opt.load_state_dict(resume["optimizer"])
        step, epoch, batch_in_epoch = resume["step"], resume["epoch"], resume["batch_in_epoch"]
        trained_s, best, bad_evals = resume["trained_seconds"], resume["best"], resume["bad_evals"]
        torch.set_rng_state(resume["rng"]["torch"])
        log(f"resumed from {last}: step {step}, epoch {epoch + 1}, best dev accuracy {100 * best:.2f}%")
    log(f"device {device} | elmo {spec['elmo']} | words {spec['word_dim'] if spec['word_vocab'] else 0}d | "
        f"encoder {spec['encoder']} | trainable parameters {sum(p.numel() for p in trainable):,}")
    # the time budget pays for the cache: it is part of what ELMo costs
    trained_s += cache_layers(model.features, [t for t, _ in train + dev], args.cache, args.out, log)

    def checkpoint(path):
        if not all_finite(model):
            abort_nonfinite("the parameters are no longer finite", step, last)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("features.elmo.bilm.")}
        atomic_save({"format": CHECKPOINT_FORMAT, "kind": "sst", "spec": spec, "bilm": bilm_state,
                     "model": state, "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
                     "batch_in_epoch": batch_in_epoch, "trained_seconds": trained_s, "best": best,
                     "bad_evals": bad_evals, "rng": {"torch": torch.get_rng_state()}, "args": vars(args)}, path)

    # ---- loop ---------------------------------------------------------------------------------------
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        log(f"\n{stop['signal']}: finishing this step, then writing {last}")
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    lengths = torch.tensor([len(t) for t, _ in train])
    budget_s = args.max_minutes * 60
    metrics, best_metrics, window = None, None, {"loss": 0.0, "correct": 0, "n": 0, "steps": 0, "t": time.time()}
    evaluated_at = -1

    def run_eval(tag):
        nonlocal best, bad_evals, metrics, best_metrics, evaluated_at
        evaluated_at = step
        t = time.time()
        metrics = evaluate(model, dev, args.batch_size)
        improved = metrics["accuracy"] > best
        best, bad_evals = (metrics["accuracy"], 0) if improved else (best, bad_evals + 1)
        log(f"eval {tag} step {step} | dev accuracy {100 * metrics['accuracy']:.2f}% | {time.time() - t:.1f}s"
            + (f" | best, saved {args.out}" if improved else f" | best {100 * best:.2f}%"))
        if improved:
            best_metrics = metrics
            checkpoint(args.out)
        return improved

    model.train()
    done = False
    while not done and epoch < args.epochs:
        batches = data.bucket_batches(lengths, 10 ** 9, args.seed + epoch, max_sentences=args.batch_size)
        epoch_started = trained_s
        while batch_in_epoch < len(batches):
            t_step = time.time()
            batch = batches[batch_in_epoch]
            logits = model([train[i][0] for i in batch])
            y = torch.tensor([train[i][1] for i in batch], device=device)
            loss = F.cross_entropy(logits, y) + args.mix_l2 * model.features.l2_penalty().to(device)
            if not math.isfinite(loss.item()):
                abort_nonfinite(f"loss is {loss.item()}", step + 1, last)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
            opt.step()
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            trained_s += time.time() - t_step
            window["loss"] += loss.item() * len(batch)
            window["correct"] += int((logits.argmax(-1) == y).sum())
            window["n"] += len(batch)
            window["steps"] += 1
            if step % args.log_every == 0:
                elapsed = time.time() - window["t"]
                log(f"step {step:6d} | epoch {epoch + 1} | loss {window['loss'] / window['n']:.3f} | train acc "
                    f"{100 * window['correct'] / window['n']:.1f}% | {1000 * elapsed / window['steps']:.0f} ms/step"
                    f" | {window['n'] / elapsed:,.0f} sent/s | {fmt_time(trained_s)} trained")
                window = {"loss": 0.0, "correct": 0, "n": 0, "steps": 0, "t": time.time()}
            done = bool(args.max_steps and step >= args.max_steps) or bool(budget_s and trained_s >= budget_s) \
                or bool(stop["signal"])
            if args.eval_every and step % args.eval_every == 0 and not stop["signal"]:
                t_eval = time.time()
                run_eval("periodic")
                checkpoint(last)
                trained_s += time.time() - t_eval
                window["t"] += time.time() - t_eval
                done = done or bool(args.patience and bad_evals >= args.patience)
            if done:
                break
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0
            if not args.eval_every and not stop["signal"]:
                t_eval = time.time()
                run_eval(f"epoch {epoch} ({trained_s - epoch_started:.0f}s of training)")
                checkpoint(last)
                trained_s += time.time() - t_eval
                window["t"] += time.time() - t_eval
                done = done or bool(args.patience and bad_evals >= args.patience)

    # ---- end ----------------------------------------------------------------------------------------
    if frozen_before:
        after = model.features.elmo.bilm.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in frozen_before.items()), "the frozen biLM changed"
    if stop["signal"]:
        checkpoint(last)
        log(f"stopped by {stop['signal']} at step {step}; saved {last}. Resume with the same command plus --resume")
        return
    if evaluated_at != step:                     # steps since the last evaluation: evaluate what we have
        run_eval("final")
    checkpoint(last)                             # after the final evaluation, so --resume knows the final best
    if not os.path.exists(args.out):
        checkpoint(args.out)
    write_metrics(args.metrics_json, {**(best_metrics or {"accuracy": best}), "step": step,
                                      "trained_seconds": round(trained_s, 1)})
    log(f"done: {step} steps in {fmt_time(trained_s)}; best dev accuracy {100 * best:.2f}%; checkpoints "
        f"{args.out} (best) and {last} (last)")




if __name__ == "__main__":
    run_main(main)
