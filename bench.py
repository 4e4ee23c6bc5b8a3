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
  # the GPU check: one command, ~8 minutes on one GPU (its CPU dry run: --device cpu --sizes tiny)
  python bench.py --suite gpu --out gpu_check
  # the numbers in RESULTS.md's performance tables (2 threads)
  python bench.py --threads 2 --preset small --mode infer train --lstm fused columns --cnn distinct token
  python bench.py --threads 2 --preset original --mode infer --repeats 3
  # a published file (clipped: the column cell), on real sentences
  python bench.py --threads 2 --elmo elmo_2x4096_512_2048cnn_2xhighway_weights.hdf5 --lstm columns \\
      --cnn distinct remembered --text sentences.txt
  # the job users run, against AllenNLP's own ELMo (needs its modules: the command says how to get them)
  python bench.py --suite allennlp --allennlp ALLENNLP_DIR --text valid.txt --lines 600 --threads 2
  # sents2elmo against ELMoForManyLangs' own, on a model folder at the published sizes (random weights:
  # python testdata/make_elmoformanylangs.py --sizes published --out DIR), where elmoformanylangs imports
  python bench.py --suite elmoformanylangs --elmo DIR --text valid.txt --lines 600 --threads 2
  # get_elmo_vectors against simple_elmo on TensorFlow, each of --sizes in the NLPL layout (random weights),
  # where simple_elmo imports (TF_USE_LEGACY_KERAS=1)
  python bench.py --suite simple_elmo --text valid.txt --lines 600 --sizes small original --threads 2
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
import sys
import time

import torch

from elmo_pytorch import data
from elmo_pytorch.data import UserError
from elmo_pytorch.elmo import PRESETS, BiLM, ELMoConfig, count_parameters, load_elmo
from elmo_pytorch.runtime import ArgumentParser, check_numbers, pick_device, run_main


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
    g = p.add_argument_group("prepared suites (the GPU check for a short GPU session; the AllenNLP comparison)")
    g.add_argument("--suite", choices=["gpu", "allennlp", "elmoformanylangs", "simple_elmo"],
                   help="gpu: the bench table for --sizes (inference "
                   "and training, fp32 and bf16, eager and compiled, the clipped published layout), a 2-minute "
                   "train_lm.py run on a generated corpus, elmo.py embed and a train_sst.py run from its "
                   "checkpoint; writes DIR/gpu_check.json and DIR/gpu_check.md (see gpu_suite). allennlp: "
                   "allennlp_compat.ElmoEmbedder.embed_file against AllenNLP 0.9's embed_file loop on AllenNLP "
                   "2.10's own biLM, the first --lines of --text, each of --sizes exported with clipping 3 "
                   "(see allennlp_suite). elmoformanylangs: sents2elmo of ELMoForManyLangs and of "
                   "elmoformanylangs_compat on the model folder --elmo, the first --lines of --text (see "
                   "elmoformanylangs_suite). simple_elmo: get_elmo_vectors of simple_elmo (TensorFlow) and of "
                   "simple_elmo_compat on each of --sizes in the NLPL layout (see simple_elmo_suite)")
    g.add_argument("--sizes", nargs="+", default=["small", "original"], choices=sorted(PRESETS),
                   help="--suite gpu: the presets of the bench table (tiny: the CPU dry run); --suite "
                   "allennlp, simple_elmo: the architectures compared")
    g.add_argument("--out", help="--suite gpu: the folder for its files")
    g.add_argument("--allennlp", help="--suite allennlp: a folder holding the `allennlp` package (AllenNLP "
                   "2.10.1's wheel unpacked), when `import allennlp` does not work")
    g.add_argument("--lines", type=int, default=600, help="--suite allennlp, elmoformanylangs, simple_elmo: "
                   "sentences of --text")
    args = p.parse_args(argv)
    try:
        args.batch = [tuple(int(n) for n in b.lower().split("x")) for b in args.batch]
    except ValueError:
        raise UserError(f"--batch takes BxT, e.g. 32x25, not {args.batch}") from None
    if any(len(b) != 2 or min(b) < 1 for b in args.batch):
        raise UserError(f"--batch needs BxT with B, T >= 1, not {' '.join('x'.join(map(str, b)) for b in args.batch)}")
    check_numbers(args, {"threads": (0, None), "vocab_size": (5, None), "warmup": (0, None), "repeats": (1, None),
                         "lines": (1, None)})
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
        base, _, clip = preset.partition("+")     # NAME+clip: the published layout, cells and outputs clipped at 3
        model = BiLM(ELMoConfig(**PRESETS[base], vocab_size=vocab, cell_clip=3.0 if clip else 0.0,
                                proj_clip=3.0 if clip else 0.0), impl=lstm).to(device)
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
# the table
# ---------------------------------------------------------------------------------------------------------
HEADER = (f"{'preset':12} {'mode':5} {'lstm':9} {'cnn':10} {'dtype':8} {'compile':7} {'batch':7} "
          f"{'ms':>9} {'tokens/s':>10} {'peak MiB':>9}  drift")


def run_table(configs, args, device, text=None, deadline=None):
    """Every configuration, one printed line each -> the list of results. A configuration that fails (a
    compiler error, out of memory) is a line saying so, not the end of the table; past `deadline` (time.time)
    the rest are listed as skipped."""
    print(HEADER, flush=True)
    results, reference_outputs = [], {}
    for cfg in configs:
        keys = ("preset", "mode", "lstm", "cnn", "dtype", "compile", "batch")
        described = dict(zip(keys, (*cfg[:-1], "x".join(map(str, cfg[-1])))))
        if deadline and time.time() > deadline:
            results.append({**described, "skipped": "time budget"})
            continue
        try:
            r = run_config(cfg, args, device, reference_outputs,
                           [s[:cfg[-1][1]] for s in text if len(s) >= cfg[-1][1]] if text else None)
        except Exception as e:  # noqa: BLE001  (one configuration's failure is a result, not the end)
            results.append({**described, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"})
            print(f"{described['preset']:12} {described['mode']:5} ... {results[-1]['error']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results.append(r)
        drift = f"{r['drift_max_abs']:.1e}" if "drift_max_abs" in r else ""
        print(f"{r['preset']:12} {r['mode']:5} {r['lstm']:9} {r['cnn']:10} {r['dtype']:8} {r['compile']:7} "
              f"{r['batch']:7} {r['ms']:9.1f} {r['tokens_per_s']:10,} {r['peak_mib']:9,}  {drift}", flush=True)
    return results


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                           platform.machine())


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------------
# the GPU check: one command that measures what a short GPU session should, and writes it down
# ---------------------------------------------------------------------------------------------------------
SUITE_MINUTES = {"table": 3.5, "train": 2.0}   # of the 8 minutes the check may take on one GPU


def gpu_suite(args, device):
    """`--suite gpu --out DIR`, in at most ~8 minutes on one GPU (the CPU dry run, `--device cpu --sizes tiny`,
    in under 2):
      1. the bench table for --sizes: inference and a training step, fp32 and bf16 autocast, eager (and
         compiled, on CUDA); plus the published layout with clipping at 3 on the column and reference cells,
         eager and compiled (on a GPU the cell's per-step loop launches many small kernels: compiling the
         model is the first cure to measure);
      2. `train_lm.py --device D` for 2 minutes on a generated corpus, with the device's default preset and
         batch (the defaults a GPU user gets), then its checkpoint loaded on the CPU and checked to give
         the same layers;
      3. `elmo.py embed` and a 300-step `train_sst.py` on the device from that checkpoint.
    Writes DIR/gpu_check.json (everything) and DIR/gpu_check.md (tables ready for RESULTS.md)."""
    import subprocess
    import sys
    if not args.out:
        raise UserError("--suite gpu needs --out DIR")
    os.makedirs(args.out, exist_ok=True)
    t0, on_gpu = time.time(), device.type == "cuda"
    report = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
              "sizes": args.sizes}
    print(f"gpu check on {device} ({report['device_name']}), torch {torch.__version__}: writing {args.out}",
          flush=True)
    # 1) the table
    batch = [(64, 25)] if on_gpu else [(8, 10)]
    configs = [(p, m, "fused", "distinct", d, "off", b) for p in args.sizes for m in ("infer", "train")
               for d in ("float32", "bfloat16") for b in batch]
    clipped = args.sizes[-1] + "+clip"
    configs += [(clipped, "infer", lstm, "distinct", "float32", "off", b) for lstm in ("columns", "reference")
                for b in batch]
    if on_gpu:   # compiling on the CPU takes minutes a configuration: `bench.py --compile on` measures it there
        configs += [(p, m, "fused", "distinct", "bfloat16", "on", b) for p in args.sizes for m in ("infer", "train")
                    for b in batch]
        configs += [(clipped, "infer", "reference", "distinct", "float32", "on", b) for b in batch]
    args.vocab_size = min(args.vocab_size, 10_000)
    report["table"] = run_table(configs, args, device, deadline=t0 + 60 * SUITE_MINUTES["table"])
    # 2) a real training run, as a user starts it, on a generated corpus; 3) embed and a task from it
    train_text, valid_text, sst = (os.path.join(args.out, n) for n in ("corpus.txt", "valid.txt", "sst.tsv"))
    write_corpus(train_text, 400_000 if on_gpu else 20_000, seed=0)
    write_corpus(valid_text, 20_000 if on_gpu else 2_000, seed=1)
    write_sentiment(sst, 2_000 if on_gpu else 200)
    lm, run_dir = os.path.join(args.out, "lm.pt"), os.path.dirname(os.path.abspath(__file__))

    def command(name, argv, timeout):
        t, argv = time.time(), [str(a) for a in argv]
        try:
            r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=run_dir)
        except subprocess.TimeoutExpired as e:    # the report is still written, with what the run printed
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            r = subprocess.CompletedProcess(argv, 124, out, f"timed out after {timeout:.0f} s")
        with open(os.path.join(args.out, f"{name}.log"), "w") as f:
            f.write(r.stdout + r.stderr)
        report[name] = {"command": "python " + " ".join(argv), "returncode": r.returncode,
                        "wall_s": round(time.time() - t, 1), "last_line": (r.stdout.strip().splitlines() or [""])[-1]}
        print(f"{name}: exit {r.returncode} in {report[name]['wall_s']:.0f}s | {report[name]['last_line'][:110]}",
              flush=True)
        return r

    minutes = SUITE_MINUTES["train"] if on_gpu else 0.25
    preset = [] if on_gpu else ["--preset", args.sizes[0]]     # on a GPU: the defaults a user gets
    r = command("train_lm", ["train_lm.py", "--device", str(device), *preset, "--train-file", train_text,
                             "--valid-file", valid_text, "--max-minutes", minutes, "--log-every", 20,
                             "--vocab-size", 10_000, "--out", lm, "--overwrite",
                             "--metrics-json", os.path.join(args.out, "train_lm.json")], 60 * minutes + 240)
    report["train_lm"].update(training_summary(r.stdout))
    if r.returncode == 0:
        report["train_lm"]["loads_on_cpu"] = loads_on_cpu(lm, device)
        command("embed", ["elmo.py", "embed", "--elmo", lm, "--input", valid_text, "--output",
                          os.path.join(args.out, "vectors.hdf5"), "--device", str(device), "--overwrite"], 300)
        command("train_sst", ["train_sst.py", "--elmo", lm, "--train-file", sst, "--dev-file", sst, "--device",
                              str(device), "--max-steps", 300, "--epochs", 1000, "--eval-every", 100, "--patience", 0,
                              "--out", os.path.join(args.out, "sst.pt"), "--overwrite",
                              "--metrics-json", os.path.join(args.out, "sst.json")], 600)
    report["total_s"] = round(time.time() - t0, 1)
    write_json(os.path.join(args.out, "gpu_check.json"), report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(suite_markdown(report))
    print(f"wrote {args.out}/gpu_check.json and gpu_check.md in {report['total_s']:.0f}s", flush=True)


def write_corpus(path, n_lines, seed):
    """Made-up sentences of 5-25 Zipf-distributed words of 2-10 letters (the bench's vocabulary)."""
    made_up = random.Random(0)
    words = ["".join(made_up.choices("abcdefghijklmnopqrstuvwxyz", k=made_up.randint(2, 10))) for _ in range(5000)]
    weights = [1 / (k + 1) for k in range(len(words))]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_lines):
            f.write(" ".join(rng.choices(words, weights, k=rng.randint(5, 25))) + "\n")


def write_sentiment(path, n):
    """A TSV a task can learn: a label, and a sentence whose one telling word says it."""
    rng = random.Random(2)
    filler = "the a film plot story it was and of to".split()
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for i in range(n):
            label = i % 2
            words = rng.choices(filler, k=rng.randint(4, 12)) + [rng.choice((["dull", "awful", "bad"],
                                                                            ["great", "fine", "good"])[label])]
            rng.shuffle(words)
            f.write(" ".join(words) + f"\t{label}\n")


def training_summary(stdout: str) -> dict:
    """From train_lm.py's log: the defaults it filled, the first and last loss, the median tokens/s."""
    lines = stdout.splitlines()
    losses = [float(x.split("| loss ")[1].split()[0]) for x in lines if "| loss " in x and x.startswith("step")]
    speeds = sorted(int(x.split(" tok/s")[0].split("| ")[-1].replace(",", "")) for x in lines if " tok/s" in x)
    return {"defaults": next((x for x in lines if x.startswith("defaults for")), ""),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "loss_went_down": bool(losses) and losses[-1] < losses[0],
            "tokens_per_s_median": speeds[len(speeds) // 2] if speeds else None}


def loads_on_cpu(path, device) -> bool:
    """The checkpoint trained on `device` loads on the CPU and gives the layers it gives on `device`."""
    ids = data.batch_to_ids([["a", "checkpoint", "moves"], ["between", "devices"]])
    with torch.no_grad():
        on_cpu = load_elmo(path, "cpu")(ids)["activations"][-1]
        there = load_elmo(path, device)(ids.to(device))["activations"][-1].float().cpu()
    return bool(torch.allclose(on_cpu, there, atol=1e-3))


def suite_markdown(report) -> str:
    def drift(r):
        return f"{r['drift_max_abs']:.1e}" if r.get("drift_max_abs") is not None else ""
    rows = ["| preset | mode | lstm | dtype | compile | batch | tokens/s | peak MiB | drift |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        if "tokens_per_s" in r:
            rows.append(f"| {r['preset']} | {r['mode']} | {r['lstm']} | {r['dtype']} | {r['compile']} | {r['batch']} "
                        f"| {r['tokens_per_s']:,} | {r['peak_mib']:,} | {drift(r)} |")
        else:
            rows.append(f"| {r['preset']} | {r['mode']} | {r['lstm']} | {r['dtype']} | {r['compile']} | {r['batch']} "
                        f"| {r.get('error') or 'skipped: ' + r.get('skipped', '')} | | |")
    out = [f"GPU check on {report['device_name']} ({report['device']}), torch {report['torch']}, "
           f"{report['total_s']:.0f} s in all.", ""] + rows + [""]
    for name in ("train_lm", "embed", "train_sst"):
        if name in report:
            r = report[name]
            extra = ""
            if name == "train_lm":
                extra = (f"; {r.get('defaults', '')}; loss {r.get('first_loss')} -> {r.get('last_loss')}; "
                         f"median {r.get('tokens_per_s_median')} tokens/s; loads on the CPU: {r.get('loads_on_cpu')}")
            out.append(f"- `{r['command']}`: exit {r['returncode']}, {r['wall_s']} s{extra}; {r['last_line']}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# --suite allennlp: the embedding job users run, here and in AllenNLP's own code
# ---------------------------------------------------------------------------------------------------------
HOW_TO_GET_ALLENNLP = ("pip download allennlp==2.10.1 --no-deps -d W && python -m zipfile -e "
                       "W/allennlp-2.10.1-py3-none-any.whl ALLENNLP_DIR, then --allennlp ALLENNLP_DIR "
                       "(AllenNLP itself installs only on Python <= 3.9 with torch < 1.13)")


def allennlp_bilm_class(folder: str | None):
    """AllenNLP 2.10's `_ElmoBiLm`, unmodified: from a working `import allennlp`, else from `folder` (the
    2.10.1 wheel unpacked). AllenNLP's package __init__ files import all of AllenNLP (spaCy, transformers,
    ...), so the packages are entered without running them, and the few unrelated names its ELMo modules
    import (configuration registries, the dataset and vocabulary classes of `batch_to_ids`, file caching)
    are stubbed. Its modules elmo, elmo_lstm, lstm_cell_with_projection, encoder_base, highway, scalar_mix,
    data/token_indexers/elmo_indexer, nn/util, nn/initializers and common/checks run as AllenNLP wrote them."""
    import importlib
    import types
    try:
        return importlib.import_module("allennlp.modules.elmo")._ElmoBiLm
    except Exception:  # noqa: BLE001  (not installed, or installed without the packages it imports)
        for name in [m for m in sys.modules if m == "allennlp" or m.startswith("allennlp.")]:
            del sys.modules[name]
    if not folder or not os.path.isfile(os.path.join(folder, "allennlp", "modules", "elmo.py")):
        found = f"no allennlp/modules/elmo.py in {folder}" if folder else "import allennlp failed"
        raise UserError(f"--suite allennlp needs AllenNLP's ELMo modules ({found}): {HOW_TO_GET_ALLENNLP}")

    class Stub:                                     # FromParams, Registrable and the data classes
        @classmethod
        def register(cls, *args, **kwargs):
            return lambda registered: registered

    def module(name, package=False, **names):
        m = types.ModuleType(name)
        if package:
            m.__path__ = [os.path.join(folder, *name.split("."))]
        m.__dict__.update(names)
        sys.modules[name] = m

    for name in ("allennlp", "allennlp.data", "allennlp.data.token_indexers", "allennlp.modules", "allennlp.nn"):
        module(name, package=True)
    module("allennlp.common", package=True, FromParams=Stub, Registrable=Stub)
    module("allennlp.common.file_utils", cached_path=lambda path, *args, **kwargs: path)
    module("allennlp.common.util", lazy_groups_of=None, pad_sequence_to_length=None, is_distributed=lambda: False,
           is_global_primary=lambda: True, int_to_device=lambda d: d if isinstance(d, torch.device)
           else torch.device("cpu") if d < 0 else torch.device(d))
    for name, cls in (("instance", "Instance"), ("vocabulary", "Vocabulary"), ("batch", "Batch"),
                      ("fields", "TextField")):
        module(f"allennlp.data.{name}", **{cls: Stub})
    module("allennlp.data.tokenizers", package=True, Token=Stub)
    module("allennlp.data.tokenizers.token_class", Token=Stub)
    module("allennlp.data.token_indexers.token_indexer", TokenIndexer=Stub, IndexedTokenList=dict)
    return importlib.import_module("allennlp.modules.elmo")._ElmoBiLm


def allennlp_embed_file(bilm, sentences, path, batch_size=64):
    """AllenNLP 0.9's `ElmoEmbedder.embed_file` loop (format "all"), written out: the sentences in file
    order, batches of `batch_size`, the biLM's layers without <S>/</S>, one float32 dataset per sentence
    and the sentence_to_index map. Its state is reset before each batch (0.9 carried it over) so that both
    sides compute the same numbers; resetting costs nothing."""
    import h5py
    remove = sys.modules["allennlp.nn.util"].remove_sentence_boundaries
    with h5py.File(path, "w") as fout:
        for start in range(0, len(sentences), batch_size):
            batch = sentences[start: start + batch_size]
            bilm._elmo_lstm.reset_states()
            out = bilm(data.batch_to_ids(batch))          # AllenNLP's ids (test_batch_to_ids_matches_allennlp)
            without = [remove(layer, out["mask"]) for layer in out["activations"]]
            activations, mask = torch.cat([a.unsqueeze(1) for a, _ in without], dim=1), without[0][1]
            for i in range(len(batch)):
                n = int(mask[i].sum())
                fout.create_dataset(str(start + i), data=activations[i, :, :n].detach().cpu().numpy())
        index = fout.create_dataset("sentence_to_index", (1,), dtype=h5py.string_dtype())
        index[0] = json.dumps({" ".join(s): str(i) for i, s in enumerate(sentences)})


def allennlp_suite(args):
    """`--suite allennlp`: for each of --sizes, the published layout with clipping 3 (our untrained BiLM,
    seed 0, written by `export_official`), the first --lines sentences of --text embedded by
    `allennlp_compat.ElmoEmbedder.embed_file` and by AllenNLP's loop on AllenNLP's `_ElmoBiLm`, alternated
    (--repeats rounds, AllenNLP first), then the largest difference between the two files."""
    import tempfile
    from dataclasses import asdict

    import h5py
    import numpy as np
    from allennlp_compat import ElmoEmbedder
    from elmo_pytorch.published import export_official
    if not args.text:
        raise UserError("--suite allennlp needs --text FILE: one whitespace-tokenised sentence a line")
    AllenBiLM = allennlp_bilm_class(args.allennlp)
    lines = [line.strip() for _, line in data.read_lines(args.text) if line.strip()][: args.lines]
    sentences = [line.split() for line in lines]
    n_tokens = sum(map(len, sentences))
    print(f"--suite allennlp | {len(lines):,} sentences, {n_tokens:,} tokens of {args.text} | threads "
          f"{torch.get_num_threads()} | torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "input.txt")               # the sentences as ElmoEmbedder.embed_file reads them
        with open(text, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        for size in args.sizes:
            torch.manual_seed(0)
            config = ELMoConfig(**PRESETS[size], cell_clip=3.0, proj_clip=3.0, vocab_size=0)
            options, weights = export_official(asdict(config), BiLM(config).state_dict(), os.path.join(tmp, size))
            for r in range(args.repeats):
                theirs, ours = os.path.join(tmp, f"{size}_allennlp.hdf5"), os.path.join(tmp, f"{size}_ours.hdf5")
                bilm = AllenBiLM(options, weights)
                t = time.perf_counter()
                allennlp_embed_file(bilm, sentences, theirs)
                allennlp_s = time.perf_counter() - t
                embedder = ElmoEmbedder(options, weights)
                t = time.perf_counter()
                embedder.embed_file(text, ours)
                ours_s = time.perf_counter() - t
                with h5py.File(theirs, "r") as a, h5py.File(ours, "r") as b:
                    diff = max(float(np.abs(a[k][...] - b[k][...]).max(initial=0)) for k in a if k != "sentence_to_index")
                    same_index = a["sentence_to_index"][0] == b["sentence_to_index"][0]
                row = {"size": size, "round": r + 1, "allennlp_s": allennlp_s, "ours_s": ours_s,
                       "allennlp_tokens_per_s": n_tokens / allennlp_s, "ours_tokens_per_s": n_tokens / ours_s,
                       "speedup": allennlp_s / ours_s, "max_abs_diff": diff, "same_index": bool(same_index)}
                results.append(row)
                print(f"{size:>8} round {r + 1} | AllenNLP {row['allennlp_tokens_per_s']:,.0f} tokens/s "
                      f"({allennlp_s:.1f}s) | ours {row['ours_tokens_per_s']:,.0f} tokens/s ({ours_s:.1f}s) | "
                      f"{row['speedup']:.2f}x | max |diff| {diff:.1e} | same index {bool(same_index)}", flush=True)
                del bilm, embedder
    write_json(args.json, {"suite": "allennlp", "text": args.text, "sentences": len(lines), "tokens": n_tokens,
                           "threads": torch.get_num_threads(), "torch": torch.__version__, "results": results})
    print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------------------
# --suite elmoformanylangs: sents2elmo, here and in ELMoForManyLangs' own code
# ---------------------------------------------------------------------------------------------------------
HOW_TO_GET_EFML = ('pip install elmoformanylangs "overrides<5" into the environment that runs bench.py (it uses '
                   'the same torch; its last release fails to import with overrides 5 or newer)')


def suite_sentences(args, suite: str) -> list:
    """The first --lines sentences of --text, whitespace-tokenised: what the comparison suites embed."""
    if not args.text:
        raise UserError(f"--suite {suite} needs --text FILE: one whitespace-tokenised sentence a line")
    return [line.split() for _, line in data.read_lines(args.text) if line.strip()][: args.lines]


def round_line(prefix: str, key: str, name: str, row: dict, n_tokens: int) -> str:
    """One round of a comparison suite: each side's tokens/s, seconds and loading seconds, the speed-up."""
    def side(key, name):
        return (f"{name} {n_tokens / row[key + '_s']:,.0f} tokens/s ({row[key + '_s']:.1f}s, load "
                f"{row[key + '_load_s']:.1f}s)")
    return f"{prefix} | {side(key, name)} | {side('ours', 'ours')} | {row['speedup']:.2f}x"


def elmoformanylangs_suite(args):
    """`--suite elmoformanylangs`: `sents2elmo(sentences)` as its users call it (output_layer -1, batch_size
    64) on the first --lines sentences of --text, by ELMoForManyLangs' `Embedder` and by
    elmoformanylangs_compat's on the same model folder --elmo, alternated (--repeats rounds, ELMoForManyLangs
    first, each Embedder fresh; loading timed apart). Then the largest difference between the two: against
    ELMoForManyLangs' first call with every sentence in one batch, as its LSTM state carries over from batch
    to batch (and the default call's numbers, to show that)."""
    import logging

    import numpy as np
    try:
        import elmoformanylangs
    except Exception as e:  # noqa: BLE001  (not installed, or its `overrides` import fails)
        raise UserError(f"--suite elmoformanylangs needs ELMoForManyLangs (import failed: {e}): "
                        f"{HOW_TO_GET_EFML}") from None
    from elmoformanylangs_compat import Embedder
    if not args.elmo or not os.path.isdir(args.elmo):
        raise UserError("--suite elmoformanylangs needs --elmo DIR, a model folder in ELMoForManyLangs' layout "
                        "(python testdata/make_elmoformanylangs.py --sizes published --out DIR makes one)")
    logging.getLogger("elmoformanylangs").setLevel(logging.WARNING)
    sentences = suite_sentences(args, "elmoformanylangs")
    n_tokens = sum(map(len, sentences))
    print(f"--suite elmoformanylangs | {len(sentences):,} sentences, {n_tokens:,} tokens of {args.text} | "
          f"{args.elmo} | threads {torch.get_num_threads()} | torch {torch.__version__}", flush=True)
    results = []
    for r in range(args.repeats):
        row = {"round": r + 1}
        for name, cls in (("elmoformanylangs", elmoformanylangs.Embedder), ("ours", Embedder)):
            t = time.perf_counter()
            embedder = cls(args.elmo)
            row[f"{name}_load_s"] = time.perf_counter() - t
            t = time.perf_counter()
            row[f"{name}_vectors"] = embedder.sents2elmo(sentences)
            row[f"{name}_s"] = time.perf_counter() - t
            del embedder
        row["speedup"] = row["elmoformanylangs_s"] / row["ours_s"]
        print(round_line(f"round {r + 1}", "elmoformanylangs", "ELMoForManyLangs", row, n_tokens), flush=True)
        results.append(row)
    first_call = elmoformanylangs.Embedder(args.elmo, batch_size=len(sentences)).sents2elmo(sentences)
    ours = results[-1]["ours_vectors"]
    diff = max(float(np.abs(a - b).max(initial=0)) for a, b in zip(first_call, ours))
    default_diff = max(float(np.abs(a - b).max(initial=0)) for a, b in zip(results[-1]["elmoformanylangs_vectors"], ours))
    print(f"max |diff| against its first call, all sentences in one batch: {diff:.1e} (against its default call, "
          f"state carried over from batch to batch: {default_diff:.1e})")
    for row in results:
        del row["elmoformanylangs_vectors"], row["ours_vectors"]
    write_json(args.json, {"suite": "elmoformanylangs", "model": args.elmo, "text": args.text,
                           "sentences": len(sentences), "tokens": n_tokens, "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "results": results, "max_abs_diff": diff,
                           "max_abs_diff_default_call": default_diff})
    print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------------------
# --suite simple_elmo: get_elmo_vectors, here and in simple_elmo on TensorFlow
# ---------------------------------------------------------------------------------------------------------
HOW_TO_GET_SIMPLE_ELMO = ("pip install simple-elmo tensorflow-cpu, then pip install tf_keras==<TensorFlow's version> "
                          "--no-deps, into the environment that runs bench.py, and set TF_USE_LEGACY_KERAS=1")


def simple_elmo_suite(args):
    """`--suite simple_elmo`: for each of --sizes, our untrained biLM (seed 0, clipping 3) in the NLPL layout
    (model.hdf5 + options.json, written by `export_official`), and `get_elmo_vectors(sentences)` on the first
    --lines sentences of --text as its users call it (max_batch_size 32, layers "average"; warmup off, so
    simple_elmo runs each batch once) by simple_elmo on TensorFlow and by simple_elmo_compat, alternated
    (--repeats rounds, simple_elmo first, each model fresh, its graph its own; loading timed apart). Then the
    largest difference at the texts' words against simple_elmo with every text in one batch (its LSTM state
    carries over from batch to batch)."""
    import tempfile
    from dataclasses import asdict

    import numpy as np
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    try:
        import tensorflow as tf
        from simple_elmo import ElmoModel as TheirModel
    except Exception as e:  # noqa: BLE001  (not installed, or TensorFlow without its legacy Keras)
        raise UserError(f"--suite simple_elmo needs simple_elmo (import failed: {e}): {HOW_TO_GET_SIMPLE_ELMO}") \
            from None
    import logging
    from simple_elmo_compat import ElmoModel
    from elmo_pytorch.published import export_official
    sentences = suite_sentences(args, "simple_elmo")
    n_tokens = sum(map(len, sentences))
    print(f"--suite simple_elmo | {len(sentences):,} sentences, {n_tokens:,} tokens of {args.text} | threads "
          f"{torch.get_num_threads()} | torch {torch.__version__} | TensorFlow {tf.__version__}", flush=True)

    def theirs(folder, batch_size, texts):          # a fresh simple_elmo model in a graph of its own
        with tf.Graph().as_default():
            model = TheirModel()
            logging.getLogger("simple_elmo.elmo_helpers").setLevel(logging.WARNING)
            t = time.perf_counter()
            model.load(folder, max_batch_size=batch_size)
            load_s = time.perf_counter() - t
            t = time.perf_counter()
            vectors = model.get_elmo_vectors(texts, warmup=False)
            return vectors, load_s, time.perf_counter() - t
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            torch.manual_seed(0)
            config = ELMoConfig(**PRESETS[size], cell_clip=3.0, proj_clip=3.0, vocab_size=0)
            folder = os.path.join(tmp, size)
            _, weights = export_official(asdict(config), BiLM(config).state_dict(), folder)
            os.replace(weights, os.path.join(folder, "model.hdf5"))           # the NLPL repository's name
            for r in range(args.repeats):
                row = {"size": size, "round": r + 1}
                _, row["simple_elmo_load_s"], row["simple_elmo_s"] = theirs(folder, 32, sentences)
                t = time.perf_counter()
                model = ElmoModel()
                model.load(folder)
                row["ours_load_s"] = time.perf_counter() - t
                t = time.perf_counter()
                ours = model.get_elmo_vectors(sentences)
                row["ours_s"] = time.perf_counter() - t
                row["speedup"] = row["simple_elmo_s"] / row["ours_s"]
                print(round_line(f"{size:>8} round {r + 1}", "simple_elmo", "simple_elmo", row, n_tokens), flush=True)
                results.append(row)
            one_batch, _, _ = theirs(folder, len(sentences), sentences)
            diff = max(float(np.abs(ours[i, :len(s)] - one_batch[i, :len(s)]).max(initial=0))
                       for i, s in enumerate(sentences))
            results[-1]["max_abs_diff"] = diff
            print(f"{size:>8} max |diff| at the words, against simple_elmo with every text in one batch: {diff:.1e}",
                  flush=True)
            del model, ours, one_batch
    write_json(args.json, {"suite": "simple_elmo", "text": args.text, "sentences": len(sentences), "tokens": n_tokens,
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "tensorflow": tf.__version__, "results": results})
    print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.suite == "gpu":
        return gpu_suite(args, device)
    if args.suite == "allennlp":
        return allennlp_suite(args)
    if args.suite == "elmoformanylangs":
        return elmoformanylangs_suite(args)
    if args.suite == "simple_elmo":
        return simple_elmo_suite(args)
    name = device_name(device)
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
    results = run_table(configs, args, device, text)
    write_json(args.json, {"device": str(device), "device_name": name, "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "results": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
