"""Natural language inference (MultiNLI) on frozen ELMo: a shared BiLSTM encodes premise and hypothesis.

The GLUE baseline design: premise and hypothesis go through the same features (ELMo mix of a frozen biLM,
or word embeddings for `--elmo none`) and the same BiLSTM, are max-pooled to u and v, and an MLP classifies
[u; v; |u - v|; u * v]. `--cross-attention` adds ESIM-style soft alignment between the two token sequences
(Chen et al., 2017) before pooling. Data: TSV `premise<TAB>hypothesis<TAB>label` (labels as names or 0
entailment, 1 neutral, 2 contradiction; -1 and '-' rows are dropped; an optional `genre` column gives
per-genre accuracy), or the hub (nyu-mll/multi_nli: matched and mismatched validation reported separately).

  # CPU smoke run, under a minute (tiny biLM from train_lm.py's smoke run)
  python train_mnli.py --elmo /tmp/tiny.pt --train-file ../shared/data/mnli/dev.tsv \
      --dev-file ../shared/data/mnli/dev.tsv --max-steps 30 --out /tmp/mnli.pt
  # a real run (or --device cuda)
  python train_mnli.py --elmo lm.pt --data-dir ../shared/data/mnli --max-minutes 15 --out mnli.pt
  # resume, evaluate, predict
  python train_mnli.py --resume --out mnli.pt --elmo lm.pt --data-dir ../shared/data/mnli
  python train_mnli.py --eval-only --ckpt mnli.pt --test-file ../shared/data/mnli/dev.tsv --metrics-json m.json
  python train_mnli.py --ckpt mnli.pt --predict "A man is playing a guitar. ||| A person makes music."
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

LABELS = ["entailment", "neutral", "contradiction"]       # GLUE / HF multi_nli order: 0, 1, 2
HUB = "nyu-mll/multi_nli"
HUB_DEV = {"matched": "validation_matched", "mismatched": "validation_mismatched"}


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--elmo", help="biLM checkpoint (train_lm.py, elmo.py convert) or a published "
                   "*_weights.hdf5, 'random' (same architecture as --preset, untrained) or 'none' (word "
                   "embeddings only)")
    g.add_argument("--elmo-options", help="options JSON of a published weight file (default: X_options.json, "
                   "else options.json, beside X_weights.hdf5)")
    g.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="architecture for --elmo random")
    g.add_argument("--encoder", default="bilstm", choices=["bilstm", "mean"], help="'mean': mean-pooled "
                   "features, no LSTM (CBoW baseline)")
    g.add_argument("--cross-attention", action="store_true", help="ESIM-style alignment of premise and "
                   "hypothesis tokens before pooling")
    g.add_argument("--hidden", type=int, default=256, help="BiLSTM size per direction and MLP width")
    g.add_argument("--pooling", default="max", choices=["max", "mean", "max+mean"])
    g.add_argument("--word-dim", type=int, default=300, help="trainable word embeddings x_k concatenated "
                   "with ELMo as in the paper ([ELMo_k; x_k]), or alone for --elmo none; 0 = ELMo only")
    g.add_argument("--elmo-at", default="input", choices=["input", "output", "both"], help="where ELMo enters "
                   "the task model (paper 3.3, Table 3): the task BiLSTM's input, its output, or both, each "
                   "with its own scalar mix (paper: input for SST; both helped SNLI and SQuAD)")
    g.add_argument("--elmo-dropout", type=float, default=0.5, help="dropout on the ELMo mix (AllenNLP: 0.5)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout before the MLP")
    g.add_argument("--word-dropout", type=float, help="dropout on the word embeddings x_k (default: --dropout)")
    g.add_argument("--layer-norm", action="store_true", help="layer-normalise biLM layers before mixing")
    g.add_argument("--mix-l2", type=float, default=0.0, help="L2 penalty on the mix weights (paper's lambda; "
                   "0.001 in the paper for some tasks)")
    g = p.add_argument_group("data")
    g.add_argument("--train-file", help="TSV with a header: premise<TAB>hypothesis<TAB>label[<TAB>genre]")
    g.add_argument("--dev-file", help="same format, for early stopping")
    g.add_argument("--data-dir", help="folder with train.tsv and dev.tsv")
    g.add_argument("--tokenizer", default="ptb", choices=list(data.TOKENIZERS), help="MultiNLI is raw text; "
                   "'ptb' splits \"doesn't\" into \"does n't\" (pretrain the biLM the same way)")
    g.add_argument("--max-length", type=int, default=100, help="cut sentences longer than this (tokens)")
    g.add_argument("--encoding", default="utf-8")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip lines that do not decode (counted)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--clip-norm", type=float, default=0.0, help="clip the gradient norm to this (0 = off)")
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
    g.add_argument("--out", default="mnli.pt", help="best checkpoint; the latest goes to <out>.last.pt")
    g.add_argument("--write-lm-text", metavar="FILE",
                   help="write the training premises and hypotheses (each once) to FILE, one a line, as "
                   "text for train_lm.py --init-from (paper 3.4: fine-tune the biLM on the task's "
                   "text), and exit")
    g.add_argument("--resume", action="store_true", help="continue from <out>.last.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate --ckpt on --test-file and exit")
    g.add_argument("--ckpt", help="classifier checkpoint for --eval-only / --predict")
    g.add_argument("--test-file", help="file for --eval-only")
    g.add_argument("--predict", help="'premise ||| hypothesis': classify with --ckpt, print probabilities")
    g.add_argument("--metrics-json", help="write the last evaluation here as JSON")
    args = p.parse_args(argv)
    for name in ("max_steps", "max_minutes", "epochs", "batch_size", "patience", "eval_every", "threads",
                 "hidden", "max_length"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")
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


def load_classifier(path, device):
    ckpt = load_checkpoint(path, "mnli")
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
            raise UserError("--predict and --eval-only need --ckpt PATH (a train_mnli.py checkpoint)")
        ckpt, model = load_classifier(args.ckpt, device)
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
        return

    # ---- checkpoint to resume -----------------------------------------------------------------------
    last = last_path(args.out)
    resume = None
    if args.resume:
        if not os.path.exists(last):
            raise UserError(f"--resume: no checkpoint {last} to resume from")
        resume = load_checkpoint(last, "mnli")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"--out directory does not exist: {os.path.dirname(os.path.abspath(args.out))}")

    # ---- data ---------------------------------------------------------------------------------------
    random.seed(args.seed)
    train = load_split(args, "train")
    if args.write_lm_text:
        sentences = list(dict.fromkeys(tuple(s) for example in train for s in example[:2]))   # each once
        n = data.write_lm_text(sentences, args.write_lm_text)
        log(f"wrote {n:,} sentences to {args.write_lm_text} (for train_lm.py --init-from LM --train-file "
            f"{args.write_lm_text})")
        return
    dev = load_split(args, "dev")
    labels = LABELS
    log(f"data: train {len(train):,} pairs, dev " + ", ".join(f"{k} {len(v):,}" for k, v in dev.items())
        + f" pairs; labels {labels}")

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
            word_vocab = data.build_vocab([p + h for p, h, _, _ in train], max_size=10 ** 9)
        spec = {"task": "mnli", "labels": labels, "cross_attention": args.cross_attention, "bilm_config": asdict(bilm.config) if bilm else None,
                "word_vocab": word_vocab, "word_dim": args.word_dim, "layer_norm": args.layer_norm,
                "elmo_dropout": args.elmo_dropout, "elmo_at": args.elmo_at, "encoder": args.encoder,
                "hidden": args.hidden, "pooling": args.pooling, "dropout": args.dropout,
                "word_dropout": args.dropout if args.word_dropout is None else args.word_dropout, "elmo": described}
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
    sentences = [s for p, h, _, _ in train + [e for v in dev.values() for e in v] for s in (p, h)]
    # the time budget pays for the cache: it is part of what ELMo costs
    trained_s += cache_layers(model.features, sentences, args.cache, args.out, log)

    def checkpoint(path):
        if not all_finite(model):
            abort_nonfinite("the parameters are no longer finite", step, last)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("features.elmo.bilm.")}
        atomic_save({"format": CHECKPOINT_FORMAT, "kind": "mnli", "spec": spec, "bilm": bilm_state,
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

    lengths = torch.tensor([max(len(p), len(h)) for p, h, _, _ in train])
    budget_s = args.max_minutes * 60
    metrics, best_metrics, window = None, None, {"loss": 0.0, "correct": 0, "n": 0, "steps": 0, "t": time.time()}
    evaluated_at = -1

    def run_eval(tag):
        nonlocal best, bad_evals, metrics, best_metrics, evaluated_at
        evaluated_at = step
        t = time.time()
        metrics = evaluate_all(model, dev, args.batch_size)
        improved = metrics["accuracy"] > best
        best, bad_evals = (metrics["accuracy"], 0) if improved else (best, bad_evals + 1)
        splits = ", ".join(f"{name} {100 * m['accuracy']:.2f}%" for name, m in metrics["splits"].items())
        log(f"eval {tag} step {step} | accuracy: {splits} | {time.time() - t:.1f}s"
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
            logits = model([train[i][0] for i in batch], [train[i][1] for i in batch])
            y = torch.tensor([train[i][2] for i in batch], device=device)
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
