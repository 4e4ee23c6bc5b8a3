"""Pretrain the ELMo biLM: a forward and a backward LSTM language model over a character-CNN token encoder.

Reads plain text, one sentence per line (--train-file / --valid-file), or a Hugging Face data set by name
(default: Salesforce/wikitext, wikitext-103-raw-v1). Each corpus is tokenised once into a token shard in
--data-cache (a memory-mapped int32 file and its word list; later runs and --resume reuse it), so memory
does not grow with the corpus. Writes a self-describing checkpoint `--out` (the best validation perplexity
so far, default lm.pt) and `<out>.last.pt` (the latest state, for --resume); both load with
torch.load(weights_only=True), and downstream scripts rebuild the model from them (`--elmo lm.pt`).

Two ways to read the text (--context): `sentence` (default): batches of whole sentences, each from zero
state, as ELMo reads them downstream; `stream`, as bilm-tf trained ELMo: every batch row reads the next
--unroll tokens of its own stretch of the running text, the LSTM state carried from window to window.

  # CPU smoke run from a fresh clone, under a minute (testdata/: a small made-up text)
  python train_lm.py --preset tiny --train-file testdata/sample_text.txt \\
      --valid-file testdata/sample_valid.txt --max-steps 50 --out /tmp/tiny.pt --overwrite
  # a real run: 15 minutes on 2 CPU cores (WikiText-2 from the hub; or --train-file/--valid-file), or a GPU
  python train_lm.py --dataset-config wikitext-2-raw-v1 --tokenizer ptb --max-minutes 15 --out lm.pt
  python train_lm.py --device cuda --epochs 10 --out lm.pt        # on a GPU: the `small` preset, WikiText-103
  # resume an interrupted run (Ctrl-C writes <out>.last.pt): the same command plus --resume
  python train_lm.py --dataset-config wikitext-2-raw-v1 --tokenizer ptb --max-minutes 15 --out lm.pt --resume
  # bilm-tf's regime: 20-token windows of the running text, state carried between them
  python train_lm.py --context stream --unroll 20 --train-file train.txt --valid-file valid.txt --out lm.pt
  # domain adaptation (paper 3.4): one epoch over the task's sentences, from a pretrained biLM
  python train_sst.py --task sst2 --train-file train.tsv --write-lm-text sst2_text.txt
  python train_lm.py --init-from lm.pt --train-file sst2_text.txt --epochs 1 --out lm_sst2.pt
  # evaluate a checkpoint
  python train_lm.py --eval-only --ckpt lm.pt --valid-file valid.txt --context sentence   # default: as trained

Perplexity: exp(mean negative log-likelihood per prediction); each sentence gives one prediction per token
plus </S> (forward) or <S> (backward), the word-level convention, so PTB numbers compare with the literature.
Both contexts score exactly these predictions: stream evaluation reads the text as one stream in 10 rows
(as the PyTorch word-language-model example) and predicts every token once, sentence evaluation restarts
at every sentence. "ppl" is exp of the mean of both directions' losses (the training loss, paper eq. 3).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict

import torch

from elmo_pytorch import data
from elmo_pytorch.data import UserError
from elmo_pytorch.elmo import PRESETS, BiLM, ELMoConfig, bilm_from_checkpoint, count_parameters
from elmo_pytorch.runtime import (CHECKPOINT_FORMAT, ArgumentParser, StopSignal, abort_nonfinite, all_finite,
                                  atomic_save, check_numbers, check_out_dir, refuse_overwrite, fmt_time, last_path,
                                  load_checkpoint, log_stdout, run_main, setup, write_metrics)


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    g = p.add_argument_group("model (stored in the checkpoint; ignored with --resume)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="architecture sizes (default: small on a GPU, "
                   "cpu elsewhere; see TRAINING_DEFAULTS)")
    g.add_argument("--token-encoder", choices=["char", "word"], help="character CNN (ELMo) or word "
                   "embeddings; default: char")
    g.add_argument("--lstm-dim", type=int, help="LSTM cell D (paper: 4096); default: the preset's")
    g.add_argument("--projection-dim", type=int, help="LSTM output P (paper: 512); default: the preset's")
    g.add_argument("--n-layers", type=int, help="LSTM layers per direction (paper: 2)")
    g.add_argument("--cell-clip", type=float, help="clip memory cells to +-this (paper: 3.0; 0 = off, "
                   "which allows the fused nn.LSTM path); default: the preset's (0)")
    g.add_argument("--proj-clip", type=float, help="clip LSTM outputs to +-this (paper: 3.0; 0 = off)")
    g.add_argument("--dropout", type=float, help="dropout on LSTM inputs and before the softmax "
                   "(paper: 0.1); default: the preset's (0.1)")
    g.add_argument("--softmax", choices=["full", "adaptive"], help="'adaptive' is cheaper for large "
                   "vocabularies and still exactly normalised; default: the preset's")
    g.add_argument("--vocab-size", type=int, default=50000, help="LM vocabulary: most frequent training "
                   "words, specials included (paper: 793,471)")
    g = p.add_argument_group("data")
    g.add_argument("--train-file", nargs="+", help="text file(s), one sentence per line")
    g.add_argument("--valid-file", nargs="+", help="validation text file(s)")
    g.add_argument("--dataset", default="Salesforce/wikitext", help="hub data set used without --train-file")
    g.add_argument("--dataset-config", default="wikitext-103-raw-v1", help="its configuration")
    g.add_argument("--tokenizer", default="auto", choices=["auto", *data.TOKENIZERS], help="'whitespace' "
                   "for tokenised text, 'regex' for raw, 'ptb' = regex + Penn Treebank clitics (\"does n't\", "
                   "as SST; use it when the biLM is for SST or MultiNLI); auto = whitespace for files, regex "
                   "for the hub")
    g.add_argument("--max-length", type=int, default=100, help="split sentences longer than this (tokens)")
    g.add_argument("--data-cache", default=data.default_cache_dir(), help="folder of the token shards: "
                   "each corpus is tokenised once into a memory-mapped file there and reused by later runs "
                   "and --resume ($ELMO_DATA_CACHE sets the default)")
    g.add_argument("--data-workers", type=int, default=0, help="processes that tokenise a corpus into its "
                   "shard (0 = one per CPU core)")
    g.add_argument("--encoding", default="utf-8", help="text encoding of the input files")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip lines that do not decode (counted)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adagrad", "sgd"],
                   help="adam trains fastest in short budgets (measured: RESULTS.md); the paper used adagrad, lr 0.2")
    g.add_argument("--lr", type=float, help="learning rate; default adam: the preset's (cpu: 2e-3 with one "
                   "thread, 5e-3 with more, measured: RESULTS.md; others 5e-3), adagrad 0.2, sgd 1.0")
    g.add_argument("--lr-schedule", default="linear", choices=["linear", "constant"],
                   help="linear: decay to 0 at the end of the budget (steps, minutes or epochs)")
    g.add_argument("--context", choices=["sentence", "stream"], help="training context (README, 'How "
                   "it works'). sentence: length-bucketed batches of whole sentences, each from "
                   "zero state, as ELMo is used downstream. stream (bilm-tf): each batch row reads the next "
                   "--unroll tokens of its own stretch of the running text, the LSTM state carried from window "
                   "to window; no padding. With --eval-only: how to evaluate (default: as the checkpoint "
                   "was trained). Default for training: sentence: ELMo reads sentences from zero state, and "
                   "there the sentence-trained biLM is the better one (measured: RESULTS.md)")
    g.add_argument("--unroll", type=int, default=20, help="stream context: tokens per window, i.e. steps of "
                   "backpropagation through time (bilm-tf: 20)")
    g.add_argument("--batch-tokens", type=int, help="tokens per batch: sentence context B x T padded, stream "
                   "context rows x --unroll (default: the preset's on this device, TRAINING_DEFAULTS, measured: "
                   "cpu 700 with one thread, 2000 with more; 8192 on a GPU; else 2000)")
    g.add_argument("--clip-norm", type=float, default=10.0, help="gradient norm clip (paper: 10)")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = no limit)")
    g.add_argument("--max-minutes", type=float, default=0, help="stop after this much training time "
                   "(0 = no limit; validation time counted)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (auto: cuda > mps > cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bfloat16 on cuda, float32 elsewhere")
    g.add_argument("--lstm", default="auto", choices=["auto", "reference", "columns", "fused"],
                   help="auto: fused nn.LSTM for training, unless clipping is on (then the column-stepping "
                   "cell); reference: the cell as the equations read")
    g.add_argument("--compile", action="store_true", help="torch.compile the token encoder and the LSTM "
                   "stacks (in place: checkpoints keep their keys); the first steps compile (minutes on a CPU)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    g.add_argument("--eval-every", type=int, default=0, help="steps between validations (0 = once an "
                   "epoch, and at the end)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--out", default="lm.pt", help="best checkpoint; the latest goes to <out>.last.pt")
    g.add_argument("--resume", action="store_true", help="continue from <out>.last.pt")
    g.add_argument("--overwrite", action="store_true", help="start over even if --out or <out>.last.pt exists "
                   "(without it or --resume, an existing one is an error: a finished biLM is not replaced by "
                   "accident)")
    g.add_argument("--init-from", help="start from this biLM checkpoint: its weights, vocabulary, config and "
                   "tokenizer; a new optimizer and schedule, written to --out. Paper section 3.4: fine-tune "
                   "the biLM on the task's text (labels dropped), then freeze it (train_sst.py / "
                   "train_mnli.py --write-lm-text write that text)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --ckpt on --valid-file and exit")
    g.add_argument("--ckpt", help="checkpoint for --eval-only")
    g.add_argument("--metrics-json", help="write the last evaluation here as JSON")
    args = p.parse_args(argv)
    check_numbers(args, {"lstm_dim": (1, None), "projection_dim": (1, None), "n_layers": (1, None),
                         "cell_clip": (0, None), "proj_clip": (0, None), "dropout": (0, 0.99),
                         "vocab_size": (len(data.SPECIALS) + 1, None), "max_length": (0, None),
                         "data_workers": (0, None), "lr": ((0,), None), "unroll": (2, None),
                         "batch_tokens": (1, None), "clip_norm": (0, None), "epochs": (1, None),
                         "max_steps": (0, None), "max_minutes": (0, None), "threads": (0, None),
                         "log_every": (1, None), "eval_every": (0, None)})
    return args


# Run settings that the flags leave open, per preset and device (the sizes are elmo.PRESETS; these are not
# architecture, so they are not stored in the config). The cpu preset's batch and learning rate were chosen
# by side-by-side measurement against the PyTorch word-language-model example (RESULTS.md, "The cpu preset's
# recipe"): with one thread per process, small batches make more updates at the same tokens/s; with more
# threads a small batch leaves them idle (the recurrence is a chain of small products), and the larger
# batch trained the better biLM in the same minutes. On a GPU the default is the `small` published
# architecture with batches of 8192 tokens, bilm-tf's order of batch size for 1-3 GPUs; `bench.py --suite
# gpu` reports what it gives. Keys: (preset, device type, threads per process), or without the threads.
TRAINING_DEFAULTS = {("cpu", "cpu", 1): {"batch_tokens": 700, "lr": 2e-3},
                     ("cpu", "cpu"): {"batch_tokens": 2000, "lr": 5e-3}}
GPU_DEFAULTS = {"preset": "small", "batch_tokens": 8192}


def resolve_defaults(args, device) -> str:
    """Fill the flags not given (--preset, --batch-tokens, --lr) with the defaults for this device, so that a
    first `python train_lm.py --device cuda` trains what a GPU should. -> the line that says which."""
    on_gpu = device.type == "cuda"
    filled = {}
    if args.preset is None:
        filled["preset"] = GPU_DEFAULTS["preset"] if on_gpu else "cpu"
    preset = args.preset or filled["preset"]
    kind = "cuda" if on_gpu else "cpu"
    known = (TRAINING_DEFAULTS.get((preset, kind, torch.get_num_threads())) or TRAINING_DEFAULTS.get((preset, kind))
             or {})
    if args.batch_tokens is None:
        filled["batch_tokens"] = known.get("batch_tokens", GPU_DEFAULTS["batch_tokens"] if on_gpu else 2000)
    if args.lr is None and args.optimizer == "adam" and "lr" in known:
        filled["lr"] = known["lr"]
    for name, value in filled.items():
        setattr(args, name, value)
    if args.unroll > args.batch_tokens:
        raise UserError(f"--batch-tokens {args.batch_tokens} is smaller than --unroll {args.unroll}: a stream "
                        f"batch needs at least one row of --unroll tokens")
    return (f"defaults for {device.type}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in filled.items())
            + " (give a flag to change one)") if filled else ""


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def load_corpus(files, split, args, log, vocab=None):
    """Local files, or the hub data set's split -> its token shard (built once, see data.token_shard) ->
    a memory-mapped Corpus. vocab=None: the shard's own most frequent --vocab-size words (training data)."""
    if files:
        source = {"files": files}
        tokenizer = "whitespace" if args.tokenizer == "auto" else args.tokenizer
    else:
        source = {"dataset": args.dataset, "config": args.dataset_config, "split": split,
                  "local_flags": "--train-file FILE [FILE ...] --valid-file FILE"}
        tokenizer = "regex" if args.tokenizer == "auto" else args.tokenizer
    shard = data.token_shard(source, args.data_cache, tokenizer, args.max_length, args.encoding,
                             args.skip_bad_lines, args.data_workers, log)
    corpus = data.Corpus.open_shard(shard, vocab, args.vocab_size)
    return corpus, corpus.vocab


# ---------------------------------------------------------------------------------------------------------
# the two training contexts: whole sentences, or windows of a token stream with carried state
# ---------------------------------------------------------------------------------------------------------
class SentenceBatches:
    """--context sentence: length-bucketed batches of whole sentences, <S> w_1 .. w_n </S>, each read from
    zero state, as ELMo reads sentences downstream. The order is shuffled each epoch (seed + epoch), which
    is what lets --resume skip to the exact batch where a run stopped."""

    def __init__(self, corpus, batch_tokens, seed, char_inputs, rank=0, world=1):
        self.corpus, self.batch_tokens, self.seed, self.char_inputs = corpus, batch_tokens, seed, char_inputs
        self.rank, self.world = rank, world      # distributed: every rank takes every world-th sentence

    def __len__(self):
        return len(self.batches)

    def start_epoch(self, epoch):    # called before the first batch of every epoch
        self.batches = data.bucket_batches(self.corpus.lengths, self.batch_tokens, self.seed + epoch)

    def nll(self, model, i, device):
        """Batch i (this rank's share of it) -> summed NLL forward, backward, and the predictions counted."""
        part, weight = self.batches[i][self.rank::self.world], 1
        if not part:                 # fewer sentences than ranks: run one, count nothing (DDP needs a graph)
            part, weight = self.batches[i][:1], 0
        inputs, targets = self.corpus.batch(part, self.char_inputs)
        nll_f, nll_b, n = model.lm_nll(inputs.to(device), targets.to(device))
        return nll_f * weight, nll_b * weight, n * weight, n * weight

    def state_dict(self, dist):
        return {}

    def load_state_dict(self, state):
        pass


class StreamBatches:
    """--context stream, as bilm-tf trained ELMo: the corpus is one running text (the sentences one after
    the other, each with its <S> and </S>), cut into `rows` contiguous stretches, one per batch row. Step i
    reads window i of every stretch, `unroll` tokens: the forward LM reads its stretch from the start, the
    backward LM reads the same stretch of the *reversed* text. Each row's LSTM state is carried into its
    next window, detached (truncated backpropagation through time), so a word can use the sentences
    before it (forward) or after it (backward). Leak-free: each direction only ever reads the text before
    its target in its own reading order, and the two stacks never exchange state (tests:
    test_stream_has_no_leakage_across_windows, test_stream_carry_equals_one_long_call).
    No padding and one fixed shape: the fastest case for fused kernels. Each epoch starts from zero state,
    with the stretches shifted by a random offset below `unroll` (seed + epoch), so that windows do not cut
    the text at the same places every epoch."""

    def __init__(self, corpus, rows, unroll, seed, char_inputs, log=print, rank=0, world=1):
        if (len(corpus.stream) - 1) // rows < 2 * unroll:       # a tiny text: fewer rows, each 2 windows
            rows = (len(corpus.stream) - 1) // (2 * unroll)
            if rows < 1:
                raise UserError(f"--context stream: the training text ({len(corpus.stream):,} tokens with "
                                f"boundaries) is shorter than 2 x --unroll {unroll}; lower --unroll or use "
                                f"--context sentence")
            log(f"stream context: the training text is short, so {rows} rows of {2 * unroll}+ tokens")
        self.corpus, self.rows, self.unroll, self.seed, self.char_inputs = corpus, rows, unroll, seed, char_inputs
        self.row_length = (len(corpus.stream) - 1) // rows      # tokens with a target, per stretch
        # distributed: each rank reads its own block of rows; the global batch is the same for any world
        if rows < world:
            raise UserError(f"--context stream: {rows} rows (--batch-tokens / --unroll) for {world} processes; "
                            f"raise --batch-tokens")
        self.mine = slice(rank * rows // world, (rank + 1) * rows // world)

    def __len__(self):
        return (self.row_length - self.unroll) // self.unroll    # room for the shift below

    def start_epoch(self, epoch):
        shift = random.Random(self.seed + epoch).randrange(self.unroll)
        self.starts = (torch.arange(self.rows) * self.row_length + shift)[self.mine]   # (this rank's rows,)
        self.state = None                                                          # zero state

    def nll(self, model, i, device):
        """Window i of every row, both directions, from the carried state; carries the new state on."""
        starts = self.starts + i * self.unroll
        windows = [tuple(t.to(device) for t in self.corpus.window(starts, self.unroll, self.char_inputs, back))
                   for back in (False, True)]
        state = map_state(lambda s: s.to(device), self.state)     # (from a checkpoint, it is on the cpu)
        nll_f, nll_b, n_f, n_b, state = model.stream_nll(*windows, state=state)
        self.state = map_state(torch.Tensor.detach, state)
        return nll_f, nll_b, n_f, n_b

    def state_dict(self, dist):
        """The carried state of *all* rows (gathered from every rank, in row order) for <out>.last.pt, so
        --resume continues it exactly, with any number of processes."""
        states = dist.gather(map_state(lambda s: s.cpu(), self.state))
        return {"state": map_state(lambda *parts: torch.cat(parts), *states)}

    def load_state_dict(self, state):
        self.state = map_state(lambda s: s[self.mine], state.get("state"))


def map_state(fn, *states):
    """fn applied to the tensors at the same place of one or more carried LSTM states (nested tuples of
    tensors); None stays None."""
    if states[0] is None or isinstance(states[0], torch.Tensor):
        return None if states[0] is None else fn(*states)
    return type(states[0])(map_state(fn, *parts) for parts in zip(*states))


# ---------------------------------------------------------------------------------------------------------
# distributed training: torchrun + DistributedDataParallel
# ---------------------------------------------------------------------------------------------------------
class Distributed:
    """The process group that `torchrun` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK):
    gloo on the CPU, NCCL on CUDA, one GPU per process. A plain `python train_lm.py` is rank 0 of 1, and
    then every method below is the identity: the single-process path runs the same code, talking to no one.
    Rank 0 alone logs, evaluates and writes checkpoints; whatever must agree across ranks (the prediction
    count of a step, a NaN, a stop signal, the time budget) is agreed through `reduce`."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model, find_unused: bool):
        """The model's losses behind DistributedDataParallel, which averages gradients over the ranks
        during backward. DDP only watches forward(), and the biLM's losses are methods, so a small module
        whose forward is `batches.nll(model, i, device)` stands in between."""
        loss = LMLoss(model)
        if self.world == 1:
            return loss
        return torch.nn.parallel.DistributedDataParallel(
            loss, device_ids=[self.device] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused)

    def reduce(self, values, op: str = "sum") -> list:
        """Numbers from every rank -> their sum (or max), the same list on every rank."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op == "sum" else
                                     torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def gather(self, obj) -> list:
        """Any picklable object from every rank -> the list of them, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    # `with Distributed(device) as dist:` destroys the process group on every way out of the run: a finished
    # run, Ctrl-C, a NaN stop, a user error. A process that exits with its group alive leaves gloo's worker
    # threads holding work (and tensors) while the interpreter shuts down, which aborts the process at exit
    # ("terminate called without an active exception", SIGABRT) now and then (PyTorch's c10d documents
    # destroy_process_group as required at the end of every trainer process, for this reason).
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.world > 1 and torch.distributed.is_initialized():
            if exc_type is None:  # no rank tears the group down while another still talks (rank 0 saving)
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class LMLoss(torch.nn.Module):
    """forward(batches, i, device) = batch i's summed NLLs: the biLM's loss as a forward(), for DDP."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batches, i, device):
        return batches.nll(self.model, i, device)


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
EVAL_ROWS = 10   # stream evaluation: rows of the valid text, as the PyTorch word-language-model example


@torch.no_grad()
def evaluate(model, corpus, context, args, device, autocast):
    """Perplexity of both directions on `corpus`, every token predicted once. sentence: each sentence from
    zero state. stream: the text as one stream in EVAL_ROWS rows, state carried through each row."""
    model.eval()
    run = evaluate_sentences if context == "sentence" else evaluate_stream
    nll_f, nll_b, n = run(model, corpus, args, device, autocast)
    model.train()
    return {"ppl_forward": perplexity(nll_f / n), "ppl_backward": perplexity(nll_b / n),
            "ppl": perplexity((nll_f + nll_b) / (2 * n)), "tokens": n, "context": context}


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), inf instead of an OverflowError for a diverging model."""
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


def evaluate_sentences(model, corpus, args, device, autocast):
    nll_f = nll_b = 0.0
    n = 0
    for batch in data.bucket_batches(corpus.lengths, args.batch_tokens, seed=0, shuffle=False):
        inputs, targets = corpus.batch(batch, model.config.token_encoder == "char")
        with autocast():
            f, b, count = model.lm_nll(inputs.to(device), targets.to(device))
        nll_f, nll_b, n = nll_f + float(f), nll_b + float(b), n + count
    return nll_f, nll_b, n


def evaluate_stream(model, corpus, args, device, autocast):
    """The N-1 predictions of the stream (all tokens but the first, in each reading direction) are split
    into EVAL_ROWS consecutive rows; row b's last input predicts row b+1's first token, so each is scored
    exactly once (and the <S>/</S> restarts not at all, as in training): n + 1 per sentence and direction,
    the same count as sentence evaluation. Carrying is exact, so the window length does not matter; long
    windows only make it faster."""
    rows = min(EVAL_ROWS, len(corpus.stream) - 1)
    row_length = -(-(len(corpus.stream) - 1) // rows)                     # ceil: the last row may be shorter
    starts, ends = torch.arange(rows) * row_length, torch.arange(1, rows + 1) * row_length   # (rows,) each
    window, char_inputs = 10 * args.unroll, model.config.token_encoder == "char"
    nll_f = nll_b = 0.0
    n_f = n_b = 0
    state = None
    for offset in range(0, row_length, window):
        inside = starts.unsqueeze(1) + offset + torch.arange(window) < ends.unsqueeze(1)    # (rows, window)
        windows = []
        for backward in (False, True):
            inputs, targets = corpus.window(starts + offset, window, char_inputs, backward)
            windows.append((inputs.to(device), torch.where(inside, targets, data.PAD_ID).to(device)))
        with autocast():
            f, b, count_f, count_b, state = model.stream_nll(*windows, state=state)
        nll_f, nll_b, n_f, n_b = nll_f + float(f), nll_b + float(b), n_f + count_f, n_b + count_b
    assert n_f == n_b, (n_f, n_b)      # n words + n </S> forward, n words + n <S> backward
    return nll_f, nll_b, n_f


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def initial_biLM(args, log):
    """--init-from: the checkpoint to start from (weights, vocabulary, config), checked to be one that can
    go on training (a converted published biLM has no LM softmax). Its tokenizer becomes this run's, so
    the task text is cut the way the biLM's own text was. None without --init-from."""
    if not args.init_from:
        return None
    init = load_checkpoint(args.init_from, "bilm")
    if not init["config"].get("vocab_size") or not init.get("vocab"):
        raise UserError(f"--init-from {args.init_from} has no LM softmax or vocabulary (converted from "
                        f"published weights, which do not include them): it cannot go on training")
    if args.tokenizer == "auto":
        args.tokenizer = init["args"].get("tokenizer", "auto")
    log(f"init from {args.init_from} (step {init.get('step', 0)}): its weights, vocabulary "
        f"({len(init['vocab']):,} words) and architecture; --preset and the model flags are not used")
    return init


def eval_only(args, device, autocast, log):
    """--eval-only: the perplexity of --ckpt on --valid-file, in its training context or --context."""
    if not args.ckpt or not args.valid_file:
        raise UserError("--eval-only needs --ckpt PATH and --valid-file FILE")
    ckpt = load_checkpoint(args.ckpt, "bilm")
    if not ckpt["config"].get("vocab_size"):
        raise UserError(f"{args.ckpt} has no LM softmax (converted from published weights, which do not "
                        f"include it): it gives ELMo vectors, but no perplexity")
    model = bilm_from_checkpoint(ckpt, args.lstm).to(device)
    if args.tokenizer == "auto":
        args.tokenizer = ckpt["args"].get("tokenizer", "auto")
    context = args.context or ckpt["args"].get("context") or "sentence"
    valid, _ = load_corpus(args.valid_file, "validation", args, log, vocab=ckpt["vocab"])
    metrics = evaluate(model, valid, context, args, device, autocast)
    log(f"eval {args.ckpt} (step {ckpt['step']}) on {' '.join(args.valid_file)}, {context} context: ppl "
        f"forward {metrics['ppl_forward']:.2f} backward {metrics['ppl_backward']:.2f} mean {metrics['ppl']:.2f}"
        f" | {metrics['tokens']:,} predictions per direction, {valid.n_unk:,} <unk>")
    write_metrics(args.metrics_json, metrics)


def run_start(args, log):
    """(the checkpoint --resume continues, the one --init-from starts from); at most one is not None. A
    resumed run takes its own batching, whatever this command line says."""
    resume = None
    if not args.resume and not args.eval_only:
        refuse_overwrite([args.out, last_path(args.out)], args.overwrite, resume_flag=True)
    if args.resume:
        if not os.path.exists(last_path(args.out)):
            raise UserError(f"--resume: no checkpoint {last_path(args.out)} to resume from (run without "
                            f"--resume first, with the same --out)")
        resume = load_checkpoint(last_path(args.out), "bilm")
        for name, old_default in (("context", "sentence"), ("unroll", 20), ("batch_tokens", 2000)):
            setattr(args, name, resume["args"].get(name, old_default))
    elif args.ckpt:
        raise UserError("--ckpt is for --eval-only; to continue a run use --resume with the same --out")
    init = None if resume else initial_biLM(args, log)
    check_out_dir(args.out)
    args.context = args.context or "sentence"
    return resume, init


def load_data(args, dist, start, log):
    """The training and validation corpora (token shards, built once by rank 0) and the LM vocabulary:
    `start`'s (a resumed or --init-from checkpoint), else the training text's most frequent words."""
    t0 = time.time()
    if not dist.main:                         # rank 0 builds the token shards, the others then open them
        torch.distributed.barrier()
    train, vocab = load_corpus(args.train_file, "train", args, log, vocab=start["vocab"] if start else None)
    valid = load_corpus(args.valid_file, "validation", args, log, vocab)[0] \
        if (args.valid_file or not args.train_file) else None
    if dist.main and dist.world > 1:
        torch.distributed.barrier()
    log(f"data: train {len(train):,} sentences {train.n_tokens:,} tokens ({train.n_unk:,} <unk>), "
        + (f"valid {len(valid):,} sentences {valid.n_tokens:,} tokens ({valid.n_unk:,} <unk>), "
           if valid else "no validation data, ")
        + f"vocab {len(vocab):,}, {len(train.types) - len(data.SPECIALS):,} distinct training words, "
          f"{time.time() - t0:.1f}s")
    return train, valid, vocab


def build_model(args, start, init, vocab):
    """The biLM: `start`'s architecture, or --preset with the model flags over it; --init-from's weights.
    -> (model, config)."""
    if start:
        config = ELMoConfig.from_dict(start["config"])
    else:
        overrides = {k: getattr(args, k) for k in ("token_encoder", "lstm_dim", "projection_dim", "n_layers",
                     "cell_clip", "proj_clip", "dropout", "softmax") if getattr(args, k) is not None}
        try:
            config = ELMoConfig(**{**PRESETS[args.preset], **overrides, "vocab_size": len(vocab)}).validate()
        except ValueError as e:
            raise UserError(f"bad model settings: {e}") from None
    if args.lstm == "fused" and (config.cell_clip or config.proj_clip):
        raise UserError("--lstm fused cannot clip: set --cell-clip 0 --proj-clip 0, or use reference")
    model = BiLM(config, impl=args.lstm)
    if init:
        model.load_state_dict(init["model"])
    return model, config


def make_optimizer(args, model):
    """-> (optimizer, its peak learning rate)."""
    lr = args.lr or {"adam": 5e-3, "adagrad": 0.2, "sgd": 1.0}[args.optimizer]
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr), lr
    if args.optimizer == "adagrad":   # the original: initial accumulator 1.0
        return torch.optim.Adagrad(model.parameters(), lr=lr, initial_accumulator_value=1.0), lr
    return torch.optim.SGD(model.parameters(), lr=lr), lr


def restore(resume, model, opt, run, dist, last, log):
    """--resume: the weights, the optimizer, the position in the data, the best so far, the curve and each
    rank's random state (older checkpoints: one state for all), into `run` and the objects."""
    model.load_state_dict(resume["model"])
    opt.load_state_dict(resume["optimizer"])
    run.update({k: resume[k] for k in ("step", "epoch", "batch_in_epoch", "trained_seconds", "best")},
               history=resume.get("history", []))
    rng = resume["rng"]
    torch.set_rng_state(rng["torch"][dist.rank] if isinstance(rng["torch"], list) else rng["torch"])
    random.setstate(_to_tuple(rng["python"][dist.rank] if isinstance(rng["python"], list) else rng["python"]))
    log(f"resumed from {last}: step {run['step']}, epoch {run['epoch'] + 1}, batch {run['batch_in_epoch']}, "
        f"best valid ppl {run['best']:.2f}")


def main(argv=None):
    args = parse_args(argv)
    log, device = log_stdout, setup(args)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    defaults = resolve_defaults(args, device)
    if args.eval_only:
        return eval_only(args, device, autocast, log)

    with Distributed(device) as dist:   # one process, or torchrun's: the group is destroyed on every way out
        return pretrain(args, dist, dtype, autocast, defaults, log)


def pretrain(args, dist, dtype, autocast, defaults, log):
    """Everything a training run does, in order: what to start from, the data, the model and optimizer,
    the training context, the loop. Returns the trained model."""
    device = dist.device
    if not dist.main:
        log = lambda msg: None   # noqa: E731  (rank 0 alone speaks)
    resume, init = run_start(args, log)
    if defaults and not resume:
        log(defaults)

    # ---- data ---------------------------------------------------------------------------------------
    random.seed(args.seed + dist.rank)        # each rank its own dropout masks; DDP gives all rank 0's weights
    torch.manual_seed(args.seed + dist.rank)
    train, valid, vocab = load_data(args, dist, resume or init, log)

    # ---- model and optimizer ------------------------------------------------------------------------
    model, config = build_model(args, resume or init, init, vocab)
    model.to(device)
    opt, lr = make_optimizer(args, model)
    run = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "trained_seconds": 0.0, "best": float("inf"),
           "history": []}             # history: every validation, the learning curve
    if resume:
        restore(resume, model, opt, run, dist, last_path(args.out), log)
    counts = count_parameters(model)
    log(f"device {device} | dtype {str(dtype).replace('torch.', '')} | lstm {model.lstm_impl} | threads "
        f"{torch.get_num_threads()} | processes {dist.world} | parameters: biLM {counts['bilm']:,} (without "
        f"softmax) + softmax {counts['softmax']:,}")
    log("config " + json.dumps(asdict(config)))

    # ---- the two contexts, then training -------------------------------------------------------------
    char_inputs = config.token_encoder == "char"
    if args.context == "stream":
        batches = StreamBatches(train, max(1, args.batch_tokens // args.unroll), args.unroll, args.seed,
                                char_inputs, log, dist.rank, dist.world)
    else:
        batches = SentenceBatches(train, args.batch_tokens, args.seed, char_inputs, dist.rank, dist.world)
    if args.compile:                   # the distinct-token CNN's data-dependent shapes break its graph: fine
        for module in (model.token_encoder, model.forward_lstm, model.backward_lstm):
            module.compile()
    batches.start_epoch(run["epoch"])
    if resume:                         # the carried stream state: resume continues it exactly
        batches.load_state_dict(resume.get("context_state", {}))
    train_lm(model, opt, lr, run, batches, valid, vocab, config, args, dist, device, autocast, log)
    return model


def train_lm(model, opt, lr, run, batches, valid, vocab, config, args, dist, device, autocast, log):
    """The pretraining loop: steps of both directions' summed NLL (paper eq. 3) over `batches`, the linear
    learning-rate decay over the budget, validation each epoch (or every --eval-every steps) with the best
    model at --out and the latest state at <out>.last.pt, a clean stop on Ctrl-C/SIGTERM (every rank at the
    same step), a NaN stop; `run` holds the position and is updated in place."""
    last = last_path(args.out)
    lm_loss = dist.wrap(model, find_unused=config.softmax == "adaptive")   # tail clusters may see no target
    total_steps = args.epochs * len(batches)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    budget_s = args.max_minutes * 60

    def progress():                    # fraction of the budget used: drives the lr schedule and the ETA
        return max(run["step"] / max(total_steps, 1), run["trained_seconds"] / budget_s if budget_s else 0.0)

    def checkpoint(best_too: bool):
        """<out>.last.pt, and --out too when the model is the best so far. Every rank calls this (the
        stream state and the random states are gathered from all of them); rank 0 writes the one file."""
        if not all_finite(model):
            abort_nonfinite("the parameters are no longer finite", run["step"], last)
        context_state = batches.state_dict(dist)
        rng = dist.gather((torch.get_rng_state(), random.getstate()))
        if not dist.main:
            return
        ckpt = {"format": CHECKPOINT_FORMAT, "kind": "bilm", "config": asdict(config), "vocab": vocab,
                "model": model.state_dict(), "optimizer": opt.state_dict(), **run,
                "context_state": context_state, "args": vars(args),
                "rng": {"torch": [r[0] for r in rng], "python": [r[1] for r in rng]}}
        if best_too:
            atomic_save(ckpt, args.out)
        atomic_save(ckpt, last)

    def validate(tag):                 # -> (metrics, improved), None without validation data (or off rank 0)
        if valid is None or not dist.main:
            return None
        t = time.time()
        metrics = evaluate(model, valid, args.context, args, device, autocast)
        improved = metrics["ppl"] < run["best"]
        if improved:
            run["best"] = metrics["ppl"]
        run["history"].append({"step": run["step"], "epoch": round(run["step"] / len(batches), 3),
                               "trained_seconds": round(run["trained_seconds"], 1), **metrics})
        log(f"eval {tag} step {run['step']} | valid ppl forward {metrics['ppl_forward']:.2f} backward "
            f"{metrics['ppl_backward']:.2f} mean {metrics['ppl']:.2f} | {time.time() - t:.1f}s"
            + (f" | best, saved {args.out}" if improved else f" | best {run['best']:.2f}"))
        return metrics, improved

    def validate_and_save(tag):        # its time counts in the budget, and the latest state is saved
        t_eval = time.time()
        result = validate(tag)
        checkpoint(best_too=bool(result and result[1]))
        run["trained_seconds"] += time.time() - t_eval
        return time.time() - t_eval

    stop, agreed = StopSignal(log, last), False     # agreed: every rank knows of a stop signal
    log(f"training ({args.context} context): {len(batches):,} batches per epoch, up to {total_steps:,} steps"
        + (f" or {args.max_minutes:g} minutes" if budget_s else ""))
    window = {"loss_f": 0.0, "loss_b": 0.0, "n_f": 0, "n_b": 0, "steps": 0, "t": time.time()}
    model.train()
    done = run["step"] >= total_steps or (budget_s and run["trained_seconds"] >= budget_s)
    while not done and run["epoch"] < args.epochs:
        while run["batch_in_epoch"] < len(batches):
            t_step = time.time()
            scale = 1.0 if args.lr_schedule == "constant" else max(0.0, 1.0 - progress())
            for group in opt.param_groups:
                group["lr"] = lr * scale
            with autocast():
                nll_f, nll_b, n_f, n_b = lm_loss(batches, run["batch_in_epoch"], device)
            # the mean over the predictions of the *global* batch: DDP averages the ranks' gradients, so
            # each rank scales its sum by world / (all ranks' count); one process: (nll_f + nll_b) / n
            local = float((nll_f + nll_b).detach())
            count, bad = dist.reduce([n_f + n_b, 0.0 if math.isfinite(local) else 1.0])
            if bad:                            # a NaN on any rank stops every rank
                abort_nonfinite(f"loss is {local if not math.isfinite(local) else 'not finite on another rank'}",
                                run["step"] + 1, last)
            loss = (nll_f + nll_b) / (count / dist.world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
            opt.step()
            run["step"] += 1
            run["batch_in_epoch"] += 1
            # the ranks agree on the time spent and on a stop signal, so that they stop at the same step
            run["trained_seconds"], stopping = dist.reduce(
                [run["trained_seconds"] + time.time() - t_step, bool(stop.name)], "max")
            agreed = bool(stopping)
            for key, value in (("loss_f", nll_f.item()), ("loss_b", nll_b.item()), ("n_f", n_f), ("n_b", n_b),
                               ("steps", 1)):
                window[key] += value
            if run["step"] % args.log_every == 0 or run["step"] == 1:
                log_step(window, run, opt, progress(), dist, log)
                window = {"loss_f": 0.0, "loss_b": 0.0, "n_f": 0, "n_b": 0, "steps": 0, "t": time.time()}
            done = run["step"] >= total_steps or bool(budget_s and run["trained_seconds"] >= budget_s) \
                or agreed
            if args.eval_every and run["step"] % args.eval_every == 0 and not done:
                window["t"] += validate_and_save("periodic")
            if done:
                break
        if run["batch_in_epoch"] >= len(batches):
            run["epoch"], run["batch_in_epoch"] = run["epoch"] + 1, 0
            batches.start_epoch(run["epoch"])
            if not done and not args.eval_every and run["epoch"] < args.epochs:
                window["t"] += validate_and_save(f"epoch {run['epoch']}")
            done = done or run["epoch"] >= args.epochs

    # ---- end: final evaluation and checkpoints ------------------------------------------------------
    if agreed:
        checkpoint(best_too=False)
        log(f"stopped by {stop.name or 'a signal to another rank'} at step {run['step']}; saved {last}. "
            f"Resume with the same command plus --resume")
    else:
        result = validate("final")
        checkpoint(best_too=result is None or result[1])   # after the final evaluation: --resume knows the best
        if result:
            write_metrics(args.metrics_json, {**result[0], "step": run["step"],
                                              "trained_seconds": round(run["trained_seconds"], 1),
                                              "history": run["history"]})
        log(f"done: {run['step']} steps in {fmt_time(run['trained_seconds'])} of training; best valid ppl "
            f"{run['best']:.2f}; checkpoints {args.out} (best) and {last} (last)")
    del lm_loss                        # DDP's reducer goes before its process group (see Distributed)


def log_step(window, run, opt, progress, dist, log):
    """The progress line: losses and perplexities of both directions since the last line (summed over the
    ranks), the learning rate, the speed, the time left."""
    elapsed = time.time() - window["t"]
    loss_f, loss_b, n_f, n_b = dist.reduce([window[k] for k in ("loss_f", "loss_b", "n_f", "n_b")])
    lf, lb = loss_f / n_f, loss_b / n_b
    eta = (run["trained_seconds"] / progress - run["trained_seconds"]) if progress > 0 else 0
    log(f"step {run['step']:6d} | epoch {run['epoch'] + 1} | loss {(lf + lb) / 2:.3f} | ppl fwd {perplexity(lf):7.1f} "
        f"bwd {perplexity(lb):7.1f} mean {perplexity((lf + lb) / 2):7.1f} | lr {opt.param_groups[0]['lr']:.2e} | "
        f"{1000 * elapsed / window['steps']:.0f} ms/step | {n_f / elapsed:,.0f} tok/s | ETA {fmt_time(eta)}")


def _to_tuple(x):
    """random.getstate() comes back from a checkpoint with its tuples as lists; setstate wants tuples."""
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def cli():
    """`elmo-pytorch-train-lm` once installed: this script's command line."""
    run_main(main)


if __name__ == "__main__":
    cli()
