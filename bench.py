"""Benchmark the biLM: tokens per second and peak memory of inference and of training steps.

Every combination of the flags below is one configuration: a fixed batch of B sentences x T tokens
(Zipf-distributed words of 2-10 letters, so the distinct-token character CNN sees the repetition real text
has), `--warmup` untimed calls, then the median of `--repeats` timed calls. One line per configuration,
and everything in `--json`. "infer" is what ELMo runs downstream: `BiLM.forward` (all layers) under
no_grad, from zero state. "train" is one pretraining step: the sentence LM loss of both directions,
backward, gradient clipping and an Adam step. Inference in bf16 also reports its drift: the largest
absolute difference of the top layer from the same configuration in fp32.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` (reset per configuration); on the CPU the process's
peak resident set size (VmHWM, reset per configuration through /proc/self/clear_refs where Linux allows).

  # the quick default table on whatever device is present (CPU: about a minute on 2 cores)
  python bench.py
  # the numbers in the README's Performance section (2 threads)
  python bench.py --threads 2 --preset small --mode infer train --lstm fused reference --cnn distinct token
  python bench.py --threads 2 --preset original --mode infer --repeats 3
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
from elmo import PRESETS, ArgumentParser, BiLM, ELMoConfig, count_parameters, pick_device, run_main


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    g = p.add_argument_group("what to measure (each flag takes several values: every combination runs)")
    g.add_argument("--preset", nargs="+", default=["small"], choices=sorted(PRESETS))
    g.add_argument("--mode", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    g.add_argument("--lstm", nargs="+", default=["fused", "reference"], choices=["fused", "reference"],
                   help="fused nn.LSTM, or the explicit reference cell (the one that can clip)")
    g.add_argument("--cnn", nargs="+", default=["distinct"], choices=["distinct", "token"],
                   help="character CNN once per distinct token of the batch, or once per token")
    g.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="autocast dtype (bfloat16 on CPU needs AVX512-BF16 or AMX to be fast)")
    g.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                   help="torch.compile the model (the first calls compile: raise --warmup)")
    g.add_argument("--batch", nargs="+", default=["32x25"], help="B x T: sentences x tokens")
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
    if any(len(b) != 2 or min(b) < 1 for b in args.batch) or args.repeats < 1 or args.warmup < 0:
        raise UserError("--batch needs BxT with B, T >= 1; --repeats >= 1; --warmup >= 0")
    return args


# ---------------------------------------------------------------------------------------------------------
# inputs and memory
# ---------------------------------------------------------------------------------------------------------
def make_batch(B, T, vocab_size, seed=0):
    """B sentences of T words (Zipf over 5,000 made-up words) -> char ids (B, T, W), LM targets (B, T+2)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(5000)]
    weights = [1 / (k + 1) for k in range(len(words))]
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
def run_config(cfg, args, device, reference_outputs):
    preset, mode, lstm, cnn, dtype_name, compiled, (B, T) = cfg
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    vocab = args.vocab_size if mode == "train" else 0
    model = BiLM(ELMoConfig(**PRESETS[preset], vocab_size=vocab), impl=lstm).to(device)
    model.token_encoder.unique = cnn == "distinct"
    ids, targets = (t.to(device) for t in make_batch(B, T, max(vocab, 5)))
    run = torch.compile(model) if compiled == "on" else model
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if mode == "infer":
        model.eval()

        def call():
            with torch.no_grad(), autocast:
                return run(ids)["activations"][-1]
    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        lm_nll = torch.compile(model.lm_nll) if compiled == "on" else model.lm_nll

        def call():
            with autocast:
                nll_f, nll_b, n = lm_nll(ids, targets)
            loss = (nll_f + nll_b) / (2 * n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            return loss

    def synced():
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    reset_peak(device)
    for _ in range(args.warmup):
        synced()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = synced()
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    result = {"preset": preset, "mode": mode, "lstm": lstm, "cnn": cnn, "dtype": dtype_name,
              "compile": compiled, "batch": f"{B}x{T}", "ms": round(1000 * seconds, 2),
              "tokens_per_s": round(B * T / seconds), "peak_mib": round(peak_mib(device)),
              "parameters": count_parameters(model)["bilm"]}
    if mode == "infer":
        key = (preset, lstm, cnn, compiled, B, T)
        if dtype == torch.float32:
            reference_outputs[key] = out.float().cpu()
        elif key in reference_outputs:
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
    # fp32 before bf16, so that each bf16 inference line can report its drift from the fp32 one
    dtypes = sorted(args.dtype, key=lambda d: d != "float32")
    configs = list(itertools.product(args.preset, args.mode, args.lstm, args.cnn, dtypes, args.compile,
                                     args.batch))
    print(f"{'preset':9} {'mode':5} {'lstm':9} {'cnn':8} {'dtype':8} {'compile':7} {'batch':7} "
          f"{'ms':>9} {'tokens/s':>10} {'peak MiB':>9}  drift", flush=True)
    results, reference_outputs = [], {}
    for cfg in configs:
        r = run_config(cfg, args, device, reference_outputs)
        results.append(r)
        drift = f"{r['drift_max_abs']:.1e}" if "drift_max_abs" in r else ""
        print(f"{r['preset']:9} {r['mode']:5} {r['lstm']:9} {r['cnn']:8} {r['dtype']:8} {r['compile']:7} "
              f"{r['batch']:7} {r['ms']:9.1f} {r['tokens_per_s']:10,} {r['peak_mib']:9,}  {drift}", flush=True)
    with open(args.json + ".tmp", "w") as f:
        json.dump({"device": str(device), "device_name": name, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "results": results}, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
