"""Benchmark the biLM: tokens per second and peak memory of inference and of training steps.

Every combination of the flags below is one configuration: batches of B sentences x T tokens (Zipf-
distributed words of 2-10 letters, so the distinct-token character CNN sees the repetition real text has;
a new batch for every call, as real text comes), `--warmup` untimed calls, then the median of `--repeats`
timed calls. One line per configuration,
and everything in `--json`. "infer" is what ELMo runs downstream: `BiLM.forward` (all layers) under
no_grad, from zero state. "train" is one pretraining step: the sentence LM loss of both directions,
backward, gradient clipping and an Adam step. Inference lines after the first of a preset and batch report
their drift from it: the largest absolute difference of the top layer (fp32 runs first, so bf16 lines show
what bf16 costs, and the other LSTM paths and CNN modes show that they compute the same numbers).
`--elmo` measures a given biLM instead, e.g. the published weights (inference).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` (reset per configuration); on the CPU the process's
peak resident set size (VmHWM, reset per configuration through /proc/self/clear_refs where Linux allows).

  # the quick default table on whatever device is present (CPU: about a minute on 2 cores)
  python bench.py
  # the numbers in the README's Performance section (2 threads)
  python bench.py --threads 2 --preset small --mode infer train --lstm fused columns --cnn distinct token
  python bench.py --threads 2 --preset original --mode infer --repeats 3
  # a published file (clipped: the column cell), on real sentences
  python bench.py --threads 2 --elmo elmo_2x4096_512_2048cnn_2xhighway_weights.hdf5 --lstm columns \
      --cnn distinct remembered --text ../shared/data/lm/movie_reviews.train.txt
  # a GPU: presets x dtypes x compile
  python bench.py --device cuda --preset small original --dtype float32 bfloat16 --compile off on \\
      --batch 128x20 --json bench_gpu.json
"""
from __future__ import annotations

import itertools
import json
import os
import platform
import random
import resource
import statistics
import time

import torch

import data
from data import UserError
from elmo import PRESETS, BiLM, ELMoConfig, count_parameters, load_elmo
from runtime import ArgumentParser, check_numbers, pick_device, run_main


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    g = p.add_argument_group("what to measure (each flag takes several values: every combination runs)")
    g.add_argument("--preset", nargs="+", default=["small"], choices=sorted(PRESETS))
    g.add_argument("--elmo", help="measure this biLM instead of the presets (inference only): a .pt checkpoint "
                   "or a published *_weights.hdf5, e.g. the `original` ELMo, whose clipping needs --lstm columns or reference")
    g.add_argument("--elmo-options", help="options JSON of --elmo, when it is not found beside the weights")
    g.add_argument("--mode", nargs="+", choices=["infer", "train"], help="default: both (--elmo: infer)")
    g.add_argument("--lstm", nargs="+", default=["fused", "columns"], choices=["fused", "columns", "reference"],
                   help="fused nn.LSTM; the reference cell stepped on columns (the CPU speed path, can clip); "
                   "the reference cell as the equations read (can clip)")
    g.add_argument("--cnn", nargs="+", default=["distinct"], choices=["distinct", "token", "remembered"],
                   help="character CNN once per distinct token of the batch, once per token, or (inference) "
                   "once per token ever seen: CharCNN.remember_tokens, filled during the warm-up")
    g.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="autocast dtype (bfloat16 on CPU needs AVX512-BF16 or AMX to be fast)")
    g.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                   help="torch.compile the model (the first calls compile: raise --warmup)")
    g.add_argument("--batch", nargs="+", default=["32x25"], help="B x T: sentences x tokens")
    g.add_argument("--text", help="draw the batches from this text file (one sentence a line, whitespace "
                   "tokens; lines of at least T words, cut to T) instead of made-up Zipf words; real text "
                   "matters for --cnn remembered, whose gain depends on how often words repeat")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    g.add_argument("--vocab-size", type=int, default=50000, help="LM softmax size for training steps")
    g.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    g.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
    g.add_argument("--json", default="bench.json", help="every configuration's numbers")
    args = p.parse_args(argv)
    try:
        args.batch = [tuple(int(n) for n in b.lower().split("x")) for b in args.batch]
    except ValueError:
        raise UserError(f"--batch takes BxT, e.g. 32x25, not {args.batch}") from None
    if any(len(b) != 2 or min(b) < 1 for b in args.batch):
        raise UserError(f"--batch needs BxT with B, T >= 1, not {' '.join('x'.join(map(str, b)) for b in args.batch)}")
    check_numbers(args, {"threads": (0, None), "vocab_size": (5, None), "warmup": (0, None), "repeats": (1, None)})
    return args


# ---------------------------------------------------------------------------------------------------------
# inputs and memory
# ---------------------------------------------------------------------------------------------------------
def make_batch(B, T, vocab_size, seed=0, text=None):
    """Batch number `seed`: B sentences of T words (from `text`, a list of sentences, in order; else drawn
    from one Zipf distribution over 5,000 made-up words) -> char ids (B, T, W), LM targets (B, T+2)."""
    if text is not None:
        if not text:
            raise UserError(f"--text has no line of at least {T} words (the batch's T)")
        sentences = [text[(seed * B + b) % len(text)] for b in range(B)]
    else:
        made_up = random.Random(0)                     # the same words for every batch
        words = ["".join(made_up.choices("abcdefghijklmnopqrstuvwxyz", k=made_up.randint(2, 10)))
                 for _ in range(5000)]
        weights = [1 / (k + 1) for k in range(len(words))]
        rng = random.Random(seed)
        sentences = [rng.choices(words, weights, k=T) for _ in range(B)]
    targets = torch.randint(4, vocab_size, (B, T + 2), generator=torch.Generator().manual_seed(seed))
    targets[:, 0], targets[:, -1] = 1, 2                   # <S> ... </S>
    return data.batch_to_ids(sentences), targets


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:   # "5" resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):   # elsewhere: the lifetime peak (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if platform.system() == "Darwin" else 1024)


# ---------------------------------------------------------------------------------------------------------
# one configuration
# ---------------------------------------------------------------------------------------------------------
def run_config(cfg, args, device, reference_outputs, text):
    preset, mode, lstm, cnn, dtype_name, compiled, (B, T) = cfg
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    vocab = args.vocab_size if mode == "train" else 0
    if args.elmo:
        model = load_elmo(args.elmo, device, impl=lstm, options=args.elmo_options)
    else:
        model = BiLM(ELMoConfig(**PRESETS[preset], vocab_size=vocab), impl=lstm).to(device)
    model.token_encoder.unique = cnn != "token"
    model.token_encoder.memo = None                # load_elmo turns the memo on: measure it only when asked
    if cnn == "remembered":
        model.token_encoder.remember_tokens()
    batches = [[t.to(device) for t in make_batch(B, T, max(vocab, 5), seed=k, text=text)]
               for k in range(args.warmup + args.repeats)]
    run = torch.compile(model) if compiled == "on" else model
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if mode == "infer":
        model.eval()

        def call(ids, targets):
            with torch.no_grad(), autocast:
                return run(ids)["activations"][-1]
    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        lm_nll = torch.compile(model.lm_nll) if compiled == "on" else model.lm_nll

        def call(ids, targets):
            with autocast:
                nll_f, nll_b, n = lm_nll(ids, targets)
            loss = (nll_f + nll_b) / (2 * n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            return loss

    def synced(batch):
        out = call(*batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    reset_peak(device)
    for batch in batches[: args.warmup]:
        synced(batch)
    times = []
    for batch in batches[args.warmup:]:
        t = time.perf_counter()
        out = synced(batch)
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    result = {"preset": preset, "mode": mode, "lstm": lstm, "cnn": cnn, "dtype": dtype_name,
              "compile": compiled, "batch": f"{B}x{T}", "ms": round(1000 * seconds, 2),
              "tokens_per_s": round(B * T / seconds), "peak_mib": round(peak_mib(device)),
              "parameters": count_parameters(model)["bilm"]}
    if mode == "infer":              # drift from the first inference line of this preset and batch
        key = (preset, B, T)
        if key not in reference_outputs:
            reference_outputs[key] = out.float().cpu()
        else:
            result["drift_max_abs"] = float((out.float().cpu() - reference_outputs[key]).abs().max())
    return result


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                              platform.machine())
    print(f"device {device} ({name}) | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"warmup {args.warmup}, median of {args.repeats}", flush=True)
    text = [line.split() for _, line in data.read_lines(args.text)] if args.text else None
    # fp32 before bf16, so that bf16 inference lines report their drift from an fp32 one
    dtypes = sorted(args.dtype, key=lambda d: d != "float32")
    args.mode = args.mode or (["infer"] if args.elmo else ["infer", "train"])
    if args.elmo:
        if "train" in args.mode:
            raise UserError("--elmo measures inference only (--mode infer)")
        args.preset = [os.path.basename(args.elmo)]
    configs = [c for c in itertools.product(args.preset, args.mode, args.lstm, args.cnn, dtypes, args.compile,
                                            args.batch) if not (c[1] == "train" and c[3] == "remembered")]
    print(f"{'preset':9} {'mode':5} {'lstm':9} {'cnn':10} {'dtype':8} {'compile':7} {'batch':7} "
          f"{'ms':>9} {'tokens/s':>10} {'peak MiB':>9}  drift", flush=True)
    results, reference_outputs = [], {}
    for cfg in configs:
        r = run_config(cfg, args, device, reference_outputs,
                       [s[:cfg[-1][1]] for s in text if len(s) >= cfg[-1][1]] if text else None)
        results.append(r)
        drift = f"{r['drift_max_abs']:.1e}" if "drift_max_abs" in r else ""
        print(f"{r['preset']:9} {r['mode']:5} {r['lstm']:9} {r['cnn']:10} {r['dtype']:8} {r['compile']:7} "
              f"{r['batch']:7} {r['ms']:9.1f} {r['tokens_per_s']:10,} {r['peak_mib']:9,}  {drift}", flush=True)
    with open(args.json + ".tmp", "w") as f:
        json.dump({"device": str(device), "device_name": name, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "results": results}, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
