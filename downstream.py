"""What train_sst.py and train_mnli.py share: the frozen biLM's features (the layer cache, the token
features [ELMo_k; x_k]), the task BiLSTM encoder, pooling, the optimizer, the shared flags and checkpoints,
and the one training loop (`train_task`), a plain function each script calls with its data and model.
What is left in each script is what makes it that task: reading its data, its model head, its metrics,
--predict and --write-lm-text."""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from elmo_pytorch.data import PAD_ID, bucket_batches, build_vocab, write_lm_text
from elmo_pytorch.elmo import PRESETS, BiLM, ELMoConfig, Elmo, length_mask, load_elmo
from elmo_pytorch.runtime import (CHECKPOINT_FORMAT, StopSignal, UserError, abort_nonfinite, all_finite,
                                  atomic_save, check_numbers, check_out_dir, fmt_time, last_path, load_checkpoint,
                                  log_stdout, refuse_overwrite, write_metrics)


# ---------------------------------------------------------------------------------------------------------
# Downstream building blocks shared by train_sst.py and train_mnli.py
# ---------------------------------------------------------------------------------------------------------
class LayerCache:
    """The frozen biLM's layers for every distinct sentence a run will see, computed once before training.

    The biLM is frozen, so its layers are the same every epoch: computing them again is waste. This runs it
    once over the distinct sentences (sorted by length, up to `batch_tokens` tokens a batch: little padding,
    large matrix products) and stores them row by row: a sentence of n tokens owns rows
    [offset, offset + n + 2) of `rows`, each row (L+1, 2P), <S> and </S> included.

    In memory the rows are fp32: what the biLM gives (to float rounding, as batches differ; padding cannot
    leak, see test_padding_invariance). With `path` they go to a memory-mapped
    fp16 file instead: half the bytes, paged in and out by the OS, for data whose layers exceed RAM (the
    mix and the task model then see the layers rounded to fp16, about 3 significant digits)."""

    def __init__(self, elmo: Elmo, sentences, path: str | None = None, batch_tokens: int = 8000,
                 log=None):
        unique = sorted({tuple(s) for s in sentences}, key=len)
        self.offsets, n_rows = {}, 0
        for s in unique:
            self.offsets[s] = n_rows
            n_rows += len(s) + 2
        shape = (n_rows, len(elmo.mixes[0].weights), elmo.output_dim)           # (rows, L+1, 2P)
        if path is None:
            self.rows = torch.empty(shape)
        else:
            self.rows = torch.from_file(path, shared=True, size=shape[0] * shape[1] * shape[2],
                                        dtype=torch.float16).view(shape)
            try:
                os.remove(path)      # the mapping keeps the data; the file goes when the process ends
            except OSError:          # (systems that cannot remove an open file leave it for the user)
                pass
        self.nbytes = self.rows.numel() * self.rows.element_size()
        device = next(elmo.bilm.parameters()).device
        batch, done, reported = [], 0, 0
        for i, s in enumerate(unique):
            batch.append(s)
            if i + 1 < len(unique) and (len(batch) + 1) * (len(unique[i + 1]) + 2) <= batch_tokens:
                continue
            layers, _ = elmo.layers(elmo.bilm.lexicon.ids([list(t) for t in batch]).to(device))
            stacked = torch.stack(layers, dim=2).to("cpu", self.rows.dtype)       # (B, T+2, L+1, 2P)
            for b, t in enumerate(batch):
                self.rows[self.offsets[t]: self.offsets[t] + len(t) + 2] = stacked[b, : len(t) + 2]
            done, batch = done + len(batch), []
            if log and done * 10 // len(unique) > reported:
                reported = done * 10 // len(unique)
                log(f"  biLM layers cached for {done:,} / {len(unique):,} distinct sentences")

    def __contains__(self, sentence):
        return tuple(sentence) in self.offsets

    def __len__(self):
        return len(self.offsets)

    def get(self, sentences):
        """Token lists (all cached) -> (L+1, B, T+2, 2P) fp32 layers, zero beyond each sentence."""
        T = max(len(s) for s in sentences) + 2
        out = torch.zeros(len(sentences), T, *self.rows.shape[1:])               # (B, T+2, L+1, 2P)
        for b, s in enumerate(sentences):
            offset = self.offsets[tuple(s)]
            out[b, : len(s) + 2] = self.rows[offset: offset + len(s) + 2]
        return out.permute(2, 0, 1, 3)


class TokenFeatures(nn.Module):
    """What a task model reads for each token (paper section 3.3): [ELMo_k; x_k], the ELMo mix of a frozen
    biLM (`--elmo PATH` or `random`) next to a trainable, context-independent word embedding x_k. Either
    part can be absent: `--elmo none` is the no-pretraining baseline (x_k only), `--word-dim 0` ELMo only.

    `forward(sentences)` takes token lists and gives (B, T, output_dim) features and the (B, T) mask. The
    biLM layers come from `self.cache` (a LayerCache, set by the training scripts) when it holds every
    sentence of the batch, otherwise from the biLM itself."""

    def __init__(self, bilm: BiLM | None = None, word_vocab: list | None = None, word_dim: int = 300,
                 elmo_at: str = "input", layer_norm: bool = False, elmo_dropout: float = 0.5,
                 word_dropout: float = 0.2):
        super().__init__()
        if bilm is None and not (word_vocab and word_dim):
            raise ValueError("TokenFeatures needs a biLM, word embeddings, or both")
        if elmo_at not in ("input", "output", "both"):
            raise ValueError(f"elmo_at must be input, output or both, not {elmo_at!r}")
        # Paper section 3.3: ELMo at the task RNN's input, [ELMo_k; x_k], and/or at its output, [h_k; ELMo_k],
        # each place with its own scalar mix ("another set of output specific linear weights").
        self.elmo_at = elmo_at if bilm is not None else "input"
        n_mixes = 2 if self.elmo_at == "both" else 1
        self.elmo = Elmo(bilm, n_mixes, layer_norm, elmo_dropout) if bilm is not None else None
        self.embed = None
        if word_vocab and word_dim:
            self.word_index = {w: i for i, w in enumerate(word_vocab)}
            self.embed = nn.Embedding(len(word_vocab), word_dim, padding_idx=PAD_ID)
            self.word_dropout = nn.Dropout(word_dropout)
        elmo_dim = self.elmo.output_dim if self.elmo else 0
        self.output_dim = (elmo_dim if self.elmo_at != "output" else 0) + (word_dim if self.embed else 0)
        self.elmo_output_dim = elmo_dim if self.elmo_at != "input" else 0   # what joins the RNN's output
        if not self.output_dim:
            raise ValueError("ELMo only at the output leaves the task RNN no input: add word embeddings")
        self.cache: LayerCache | None = None

    @classmethod
    def from_spec(cls, spec: dict, bilm_state: dict | None = None) -> "TokenFeatures":
        """Rebuild from a classifier checkpoint's plain-value spec (and the frozen biLM's weights, stored
        there once): what train_sst.py and train_mnli.py share when they build or load a model."""
        bilm = None
        if spec["bilm_config"] is not None:
            bilm = BiLM(ELMoConfig.from_dict(spec["bilm_config"]))
            if bilm_state is not None:
                bilm.load_state_dict(bilm_state)
        return cls(bilm, spec["word_vocab"], spec["word_dim"], spec.get("elmo_at", "input"),
                   layer_norm=spec["layer_norm"], elmo_dropout=spec["elmo_dropout"],
                   word_dropout=spec.get("word_dropout", spec["dropout"]))      # older checkpoints: one dropout

    def _layers(self, sentences, device):
        """Frozen biLM layers for a batch: (L+1, B, T+2, 2P) and the mask (B, T+2)."""
        if self.cache is not None and all(s in self.cache for s in sentences):
            layers = self.cache.get(sentences).to(device)
            lengths = torch.tensor([len(s) + 2 for s in sentences], device=device)
            return layers, length_mask(lengths, layers.shape[2])
        layers, mask = self.elmo.layers(self.elmo.bilm.lexicon.ids(sentences).to(device))
        return torch.stack(layers), mask

    def forward(self, sentences):
        """Token lists -> the task RNN's input (B, T, F), the mask (B, T), and the ELMo mix that joins the
        RNN's output (B, T, 2P), or None when ELMo is at the input only."""
        device = next(self.parameters()).device
        T = max(len(s) for s in sentences)
        mask = length_mask(torch.tensor([len(s) for s in sentences], device=device), T)     # (B, T)
        parts, at_output = [], None
        if self.elmo is not None:
            layers, mask_bos_eos = self._layers(sentences, device)              # (L+1, B, T+2, 2P)
            mixes = self.elmo.mix(list(layers), mask_bos_eos)                   # 1 or 2 x (B, T, 2P)
            if self.elmo_at != "output":
                parts.append(mixes[0])
            if self.elmo_at != "input":
                at_output = mixes[-1]
        if self.embed is not None:
            unk = self.word_index.get("<unk>", PAD_ID)
            ids = torch.tensor([[self.word_index.get(w, unk) for w in s] + [PAD_ID] * (T - len(s))
                                for s in sentences], device=device)             # (B, T)
            parts.append(self.word_dropout(self.embed(ids)))                    # (B, T, word_dim)
        return torch.cat(parts, dim=-1), mask, at_output                        # (B, T, F), (B, T), ...

    def l2_penalty(self):
        return self.elmo.l2_penalty() if self.elmo is not None else torch.zeros(())


def cache_layers(features: TokenFeatures, sentences, choice: str, out: str, log) -> float:
    """The scripts' `--cache auto|memory|disk|off`: build features.cache over `sentences` (train + dev).
    auto = memory (fp32) when it takes under a quarter of RAM, else an fp16 file `<out>.layers` when the
    disk has room, else off. Returns the seconds spent."""
    if features.elmo is None or choice == "off":
        return 0.0
    unique = {tuple(s) for s in sentences}
    fp32_bytes = sum(len(s) + 2 for s in unique) * len(features.elmo.mixes[0].weights) * features.elmo.output_dim * 4
    if choice == "auto":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free_disk = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
        choice = "memory" if fp32_bytes < ram / 4 else "disk" if fp32_bytes / 2 < free_disk / 2 else "off"
        if choice == "off":
            log(f"cache off: the biLM layers need {fp32_bytes / 2 ** 30:.1f} GiB; each epoch recomputes them")
            return 0.0
    t = time.time()
    log(f"caching the frozen biLM's layers ({choice}, {fp32_bytes / 2 ** 30 / (2 if choice == 'disk' else 1):.2f}"
        f" GiB); every epoch then runs only the mix and the task model")
    features.cache = LayerCache(features.elmo, unique, out + ".layers" if choice == "disk" else None, log=log)
    seconds = time.time() - t
    log(f"cache {choice} ({features.cache.nbytes / 2 ** 30:.2f} GiB) in {seconds:.0f}s")
    return seconds


def frozen_bilm(elmo: str, preset: str = "cpu", seed: int = 1, options: str | None = None):
    """The downstream scripts' `--elmo`: a biLM checkpoint or a published model (`load_elmo`; the options of
    an *.hdf5: see `find_options`) -> its frozen biLM without the LM softmax; 'random' -> the `preset`
    architecture, untrained, frozen (the ablation that separates pretraining from architecture); 'none' ->
    None. Returns (biLM or None, a description)."""
    if not elmo:
        raise UserError("--elmo is required: a train_lm.py checkpoint, 'random' or 'none'")
    if elmo == "none":
        return None, "none (trainable word embeddings only)"
    if elmo == "random":
        torch.manual_seed(seed)
        return BiLM(ELMoConfig(**PRESETS[preset], vocab_size=0)).eval(), f"random (untrained '{preset}' biLM)"
    bilm = load_elmo(elmo, options=options)
    bilm.head = None                                    # the LM softmax is not part of ELMo
    bilm.config.vocab_size = 0
    return bilm, f"{elmo} (frozen)"


def load_task_state(model: nn.Module, state: dict):
    """Load a task model's weights, all but the frozen biLM (a checkpoint stores that once, under "bilm")."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("features.elmo.bilm.") for k in missing):
        raise UserError(f"checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


class BiLstmEncoder(nn.Module):
    """Token features -> BiLSTM (packed, so padding never reaches the backward direction) -> (B, T, 2H).
    `encoder="mean"` skips the LSTM (the notebook's mean-pooling design)."""

    def __init__(self, input_dim: int, hidden: int, encoder: str = "bilstm"):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden, batch_first=True, bidirectional=True) if encoder == "bilstm" \
            else None
        self.output_dim = 2 * hidden if self.lstm is not None else input_dim

    def forward(self, x, mask):                         # (B, T, F), (B, T) -> (B, T, 2H)
        if self.lstm is None:
            return x * mask.unsqueeze(-1).to(x.dtype)
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


def pool(h, mask, how: str):
    """(B, T, H), (B, T) -> (B, H) or (B, 2H): max and/or mean over the real tokens only."""
    m = mask.unsqueeze(-1)
    pooled = []
    if "max" in how:
        pooled.append(h.masked_fill(~m, float("-inf")).max(dim=1).values)
    if "mean" in how:
        pooled.append((h * m.to(h.dtype)).sum(1) / m.sum(1).clamp(min=1).to(h.dtype))
    return torch.cat(pooled, dim=-1)


def task_optimizer(params, name: str, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The downstream scripts' optimizer: Adam, or SGD with momentum 0.9. Adam runs fused (one pass over
    each parameter instead of a dozen elementwise ops) on CPU and CUDA: on this project's CPU PyTorch's
    default loop is several times slower over BCN's 26M parameters (measured: RESULTS.md). The same
    update, up to the last bits."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda") or None)


# ---------------------------------------------------------------------------------------------------------
# The task scripts' shared flags, model spec and checkpoints
# ---------------------------------------------------------------------------------------------------------
def task_arguments(p, out_default: str):
    """The flags train_sst.py and train_mnli.py share, in their groups; each script adds its own to the
    groups returned (model, data, optimisation, runtime, checkpoints)."""
    model = p.add_argument_group("model")
    model.add_argument("--elmo", help="biLM checkpoint (train_lm.py, elmo.py convert), a published model (AllenNLP's "
                       "*_weights.hdf5; an NLPL or ELMoForManyLangs folder or .zip), 'random' (same architecture "
                       "as --preset, untrained) or 'none' (word embeddings only)")
    model.add_argument("--elmo-options", help="options JSON of a published weight file (default: "
                       "X_options.json, else options.json, beside X_weights.hdf5)")
    model.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="architecture for --elmo random")
    model.add_argument("--pooling", default="max", choices=["max", "mean", "max+mean"])
    model.add_argument("--word-dim", type=int, default=300, help="trainable word embeddings x_k concatenated "
                       "with ELMo as in the paper ([ELMo_k; x_k]), or alone for --elmo none; 0 = ELMo only")
    model.add_argument("--elmo-at", default="input", choices=["input", "output", "both"], help="where ELMo "
                       "enters the task model (paper 3.3, Table 3): the task BiLSTM's input, its output, or "
                       "both, each with its own scalar mix (paper: input for SST; both helped SNLI and SQuAD)")
    model.add_argument("--layer-norm", action="store_true", help="layer-normalise biLM layers before mixing")
    model.add_argument("--mix-l2", type=float, default=0.0, help="L2 penalty on the mix weights (paper's "
                       "lambda; 0.001 in the paper for some tasks)")
    data = p.add_argument_group("data")
    data.add_argument("--max-length", type=int, default=100, help="cut sentences longer than this (tokens)")
    data.add_argument("--encoding", default="utf-8")
    data.add_argument("--skip-bad-lines", action="store_true", help="skip lines that do not decode (counted)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--max-steps", type=int, default=0, help="0 = no limit")
    opt.add_argument("--max-minutes", type=float, default=0, help="0 = no limit (evaluation time counted)")
    opt.add_argument("--patience", type=int, default=3, help="stop after this many evaluations without a "
                     "better dev accuracy (0 = never)")
    opt.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0 = each epoch)")
    runtime = p.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    runtime.add_argument("--cache", default="auto", choices=["auto", "memory", "disk", "off"], help="compute "
                         "the frozen biLM's layers once, before training: 'memory' (fp32, exact) or 'disk' "
                         "(fp16 memory-mapped file, for data larger than RAM); auto = memory when it needs "
                         "under a quarter of RAM, else disk")
    runtime.add_argument("--threads", type=int, default=0)
    runtime.add_argument("--seed", type=int, default=1)
    runtime.add_argument("--log-every", type=int, default=100)
    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--out", default=out_default, help="best checkpoint; the latest goes to <out>.last.pt")
    ckpt.add_argument("--resume", action="store_true", help="continue from <out>.last.pt")
    ckpt.add_argument("--overwrite", action="store_true", help="start over even if --out or <out>.last.pt "
                      "exists (without it or --resume, an existing one is an error); also lets "
                      "--write-lm-text replace its file")
    ckpt.add_argument("--eval-only", action="store_true", help="evaluate --ckpt on --test-file and exit")
    ckpt.add_argument("--ckpt", help="classifier checkpoint for --eval-only / --predict")
    ckpt.add_argument("--test-file", help="file for --eval-only")
    ckpt.add_argument("--metrics-json", help="write the last evaluation here as JSON")
    return model, data, opt, runtime, ckpt


def check_task_numbers(args):
    """Every numeric flag of the task scripts in its range, each error naming its flag (runtime.check_numbers)."""
    check_numbers(args, {"hidden": (1, None), "word_dim": (0, None), "elmo_dropout": (0, 0.99),
                         "dropout": (0, 0.99), "word_dropout": (0, 0.99), "mix_l2": (0, None),
                         "max_length": (1, None), "lr": ((0,), None), "clip_norm": (0, None),
                         "batch_size": (1, None), "epochs": (1, None), "max_steps": (0, None),
                         "max_minutes": (0, None), "patience": (0, None), "eval_every": (0, None),
                         "threads": (0, None), "log_every": (1, None)})


def write_task_text(sentences, path: str, overwrite: bool, log):
    """--write-lm-text: the task's sentences, one a line, as text for train_lm.py --init-from (paper 3.4)."""
    refuse_overwrite([path], overwrite)
    check_out_dir(path, "--write-lm-text")
    n = write_lm_text(sentences, path)
    log(f"wrote {n:,} sentences to {path} (for train_lm.py --init-from LM --train-file {path})")


def features_spec(args, sentences) -> tuple[dict, dict | None]:
    """What every task model's checkpoint records about its features (plain values), and the frozen biLM's
    weights (stored once in the checkpoint): --elmo, the word vocabulary of the training `sentences`, the
    dropouts, where ELMo enters."""
    bilm, described = frozen_bilm(args.elmo, args.preset, args.seed, args.elmo_options)
    if bilm is None and not args.word_dim:
        raise UserError("--elmo none needs --word-dim > 0 (there would be no features at all)")
    if args.elmo_at == "output" and not args.word_dim:
        raise UserError("--elmo-at output needs --word-dim > 0 (the task BiLSTM's input would be empty)")
    word_vocab = build_vocab(sentences, max_size=10 ** 9) if args.word_dim or bilm is None else None
    spec = {"bilm_config": asdict(bilm.config) if bilm else None, "word_vocab": word_vocab,
            "word_dim": args.word_dim, "layer_norm": args.layer_norm, "elmo_dropout": args.elmo_dropout,
            "elmo_at": args.elmo_at, "encoder": args.encoder, "hidden": args.hidden, "pooling": args.pooling,
            "dropout": args.dropout, "word_dropout": args.word_dropout, "elmo": described}
    return spec, bilm.state_dict() if bilm else None


def load_classifier(path, kind: str, build_model, device):
    """A task checkpoint -> (checkpoint, its model in eval mode on `device`)."""
    ckpt = load_checkpoint(path, kind)
    model = build_model(ckpt["spec"], ckpt["bilm"])
    load_task_state(model, ckpt["model"])
    return ckpt, model.to(device).eval()


def resume_checkpoint(args, kind: str) -> dict | None:
    """--resume: <out>.last.pt, checked to be a `kind` checkpoint; None without --resume, when neither --out
    nor <out>.last.pt may exist yet (unless --overwrite)."""
    check_out_dir(args.out)
    last = last_path(args.out)
    if not args.resume:
        if not args.write_lm_text:
            refuse_overwrite([args.out, last], args.overwrite, resume_flag=True)
        return None
    if not os.path.exists(last):
        raise UserError(f"--resume: no checkpoint {last} to resume from")
    return load_checkpoint(last, kind)


# ---------------------------------------------------------------------------------------------------------
# The training loop of both task scripts: a plain function each calls once
# ---------------------------------------------------------------------------------------------------------
def train_task(model, kind: str, spec: dict, bilm_state, train_lengths, batch_of, evaluate, args, device,
               resume: dict | None = None, cache_sentences=(), log=log_stdout):
    """Train a task model on frozen features and keep the best on dev.

    The loop: length-bucketed batches of --batch-size (seed + epoch), cross-entropy (+ --mix-l2 on the
    mix weights), Adam or SGD on the trainable parameters, an evaluation after each epoch (or every
    --eval-every steps), until --epochs, --max-steps, --max-minutes or --patience evaluations without a
    better dev accuracy. The best model goes to --out, the latest state to <out>.last.pt (every evaluation,
    and on Ctrl-C/SIGTERM), from which --resume continues exactly; a NaN loss stops without saving.
    batch_of(indices) -> (the model's inputs, labels (B,)); evaluate(model) -> {"accuracy", ...}. The frozen
    biLM must end as it began (checked)."""
    last = last_path(args.out)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_before = {k: v.clone() for k, v in model.features.elmo.bilm.state_dict().items()} \
        if model.features.elmo is not None else {}
    opt = task_optimizer(trainable, args.optimizer, args.lr, device)
    run = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "trained_seconds": 0.0, "best": -1.0, "bad_evals": 0}
    if resume:
        load_task_state(model, resume["model"])
        opt.load_state_dict(resume["optimizer"])
        run = {k: resume[k] for k in run}
        torch.set_rng_state(resume["rng"]["torch"])
        log(f"resumed from {last}: step {run['step']}, epoch {run['epoch'] + 1}, best dev accuracy "
            f"{100 * run['best']:.2f}%")
    log(f"device {device} | elmo {spec['elmo']} | words {spec['word_dim'] if spec['word_vocab'] else 0}d | "
        f"encoder {spec['encoder']} | trainable parameters {sum(p.numel() for p in trainable):,}")
    # the time budget pays for the cache: it is part of what ELMo costs
    run["trained_seconds"] += cache_layers(model.features, cache_sentences, args.cache, args.out, log)

    def checkpoint(path):
        if not all_finite(model):
            abort_nonfinite("the parameters are no longer finite", run["step"], last)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("features.elmo.bilm.")}
        atomic_save({"format": CHECKPOINT_FORMAT, "kind": kind, "spec": spec, "bilm": bilm_state,
                     "model": state, "optimizer": opt.state_dict(), **run,
                     "rng": {"torch": torch.get_rng_state()}, "args": vars(args)}, path)

    best_metrics = None

    def run_eval(tag):                       # -> whether training should stop (patience)
        nonlocal best_metrics
        t = time.time()
        metrics = evaluate(model)
        improved = metrics["accuracy"] > run["best"]
        run["best"], run["bad_evals"] = (metrics["accuracy"], 0) if improved else (run["best"], run["bad_evals"] + 1)
        log(f"eval {tag} step {run['step']} | {accuracy_text(metrics)} | {time.time() - t:.1f}s"
            + (f" | best, saved {args.out}" if improved else f" | best {100 * run['best']:.2f}%"))
        if improved:
            best_metrics = metrics
            checkpoint(args.out)
        return bool(args.patience and run["bad_evals"] >= args.patience)

    stop = StopSignal(log, last)
    evaluated_at = train_epochs(model, opt, run, train_lengths, batch_of, args, device, stop, run_eval,
                                checkpoint, log)
    if frozen_before:
        after = model.features.elmo.bilm.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in frozen_before.items()), "the frozen biLM changed"
    if stop.name:
        checkpoint(last)
        log(f"stopped by {stop.name} at step {run['step']}; saved {last}. Resume with the same command plus "
            f"--resume")
        return None
    if evaluated_at != run["step"]:          # steps since the last evaluation: evaluate what we have
        run_eval("final")
    checkpoint(last)                         # after the final evaluation, so --resume knows the final best
    if not os.path.exists(args.out):
        checkpoint(args.out)
    metrics = {**(best_metrics or {"accuracy": run["best"]}), "step": run["step"],
               "trained_seconds": round(run["trained_seconds"], 1)}
    mixes = learned_mixes(load_checkpoint(args.out, kind)["model"], spec.get("elmo_at", "input"))   # the best's
    for where, mix in mixes.items():
        log(f"scalar mix at the task model's {where} (best model): softmax(w) = "
            f"[{', '.join(f'{x:.3f}' for x in mix['s'])}] over layers 0..{len(mix['s']) - 1}, gamma {mix['gamma']:.3f}")
    if mixes:
        metrics["mix"] = mixes
    write_metrics(args.metrics_json, metrics)
    log(f"done: {run['step']} steps in {fmt_time(run['trained_seconds'])}; best dev accuracy "
        f"{100 * run['best']:.2f}%; checkpoints {args.out} (best) and {last} (last)")
    return metrics


def train_epochs(model, opt, run, train_lengths, batch_of, args, device, stop, run_eval, checkpoint, log):
    """train_task's loop over epochs and steps; `run` holds the position and is updated in place. Returns
    the step of the last evaluation."""
    budget_s, evaluated_at = args.max_minutes * 60, -1
    window = {"loss": 0.0, "correct": 0, "n": 0, "steps": 0, "t": time.time()}

    def evaluate_and_save(tag):              # an evaluation: its time counts, the latest state is saved
        nonlocal evaluated_at
        t_eval, evaluated_at = time.time(), run["step"]
        patience_spent = run_eval(tag)
        checkpoint(last_path(args.out))
        run["trained_seconds"] += time.time() - t_eval
        window["t"] += time.time() - t_eval
        return patience_spent

    model.train()
    done = False
    while not done and run["epoch"] < args.epochs:
        batches = bucket_batches(train_lengths, 10 ** 9, args.seed + run["epoch"], max_sentences=args.batch_size)
        epoch_started = run["trained_seconds"]
        while run["batch_in_epoch"] < len(batches):
            t_step = time.time()
            batch = batches[run["batch_in_epoch"]]
            inputs, labels = batch_of(batch)
            logits = model(*inputs)
            y = labels.to(device)
            loss = F.cross_entropy(logits, y) + args.mix_l2 * model.features.l2_penalty().to(device)
            if not math.isfinite(loss.item()):
                abort_nonfinite(f"loss is {loss.item()}", run["step"] + 1, last_path(args.out))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
            opt.step()
            run["step"], run["batch_in_epoch"] = run["step"] + 1, run["batch_in_epoch"] + 1
            run["trained_seconds"] += time.time() - t_step
            window["loss"] += loss.item() * len(batch)
            window["correct"] += int((logits.argmax(-1) == y).sum())
            window["n"] += len(batch)
            window["steps"] += 1
            if run["step"] % args.log_every == 0:
                elapsed = time.time() - window["t"]
                log(f"step {run['step']:6d} | epoch {run['epoch'] + 1} | loss {window['loss'] / window['n']:.3f} | "
                    f"train acc {100 * window['correct'] / window['n']:.1f}% | "
                    f"{1000 * elapsed / window['steps']:.0f} ms/step | {window['n'] / elapsed:,.0f} sent/s | "
                    f"{fmt_time(run['trained_seconds'])} trained")
                window.update({"loss": 0.0, "correct": 0, "n": 0, "steps": 0, "t": time.time()})
            done = bool(args.max_steps and run["step"] >= args.max_steps) \
                or bool(budget_s and run["trained_seconds"] >= budget_s) or bool(stop.name)
            if args.eval_every and run["step"] % args.eval_every == 0 and not stop.name:
                done = evaluate_and_save("periodic") or done
            if done:
                break
        if run["batch_in_epoch"] >= len(batches):
            run["epoch"], run["batch_in_epoch"] = run["epoch"] + 1, 0
            if not args.eval_every and not stop.name:
                tag = f"epoch {run['epoch']} ({run['trained_seconds'] - epoch_started:.0f}s of training)"
                done = evaluate_and_save(tag) or done
    return evaluated_at


def learned_mixes(state: dict, elmo_at: str) -> dict:
    """A task model's learned scalar mixes (paper eq. 1, its Figure 2), from its state_dict: {"input" and/or
    "output": {"s": softmax(w) over the biLM's layers, "gamma": gamma}}; {} without ELMo."""
    if "features.elmo.mixes.0.weights" not in state:
        return {}
    places = {"input": ["input"], "output": ["output"], "both": ["input", "output"]}[elmo_at]
    return {where: {"s": torch.softmax(state[f"features.elmo.mixes.{i}.weights"].float(), 0).tolist(),
                    "gamma": float(state[f"features.elmo.mixes.{i}.gamma"])} for i, where in enumerate(places)}


def accuracy_text(metrics: dict) -> str:
    """The accuracy part of an eval line: one dev set, or each of several (MNLI matched / mismatched)."""
    if "splits" in metrics:
        return "accuracy: " + ", ".join(f"{name} {100 * m['accuracy']:.2f}%" for name, m in metrics["splits"].items())
    return f"dev accuracy {100 * metrics['accuracy']:.2f}%"
