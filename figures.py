"""The README's figures, drawn from the small measurement files committed in results/ (`python figures.py`).

    assets/model.png          the model with its shapes, for a preset (drawn from elmo.PRESETS, so it stays true)
    assets/learning_curves.png  validation perplexity against training minutes: every results/curves/*.json
                              (train_lm.py --metrics-json: its "history") and results/curves/*.csv (other
                              programs: minutes,ppl rows), one line each
    assets/layer_weights.png  the paper's Figure 2 for this project: each task model's learned softmax(s_j)
                              over the biLM's layers, from results/mix/*.json (train_sst.py / train_mnli.py
                              --metrics-json: its "mix")
    assets/probes.png         what each layer knows (paper section 5.3): per task, the dev score of a probe on
                              each layer, on the mix and the baseline, from results/probe/TASK_MODEL.json
                              (probe.py --metrics-json), one bar per MODEL

A new measurement updates a figure: put its metrics JSON in the folder and run the command again. Needs
matplotlib (`pip install matplotlib`), which nothing else in the project imports.

  python figures.py                    # all four, into assets/
  python figures.py --preset small --out /tmp/figs
"""
from __future__ import annotations

import csv
import glob
import json
import os
import textwrap

from elmo_pytorch.elmo import PRESETS, ELMoConfig
from elmo_pytorch.runtime import ArgumentParser, UserError, run_main

HERE = os.path.dirname(os.path.abspath(__file__))


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("figures.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")                      # files only, no screen
    import matplotlib.pyplot as plt
    return plt


def model_diagram(preset: str, path: str):
    """Boxes and arrows from the characters to the task model, each labelled with its shape (README legend:
    B batch, T tokens, W characters, F filters, D cell, P projection, L layers)."""
    plt = pyplot()
    c = ELMoConfig(**PRESETS[preset])
    P, D, L, Fn = c.projection_dim, c.lstm_dim, c.n_layers, c.n_filters
    widths = ", ".join(str(w) for w, _ in c.filters)
    stages = [  # (text, shape after it, colour)
        ("characters: each token's UTF-8 bytes between word marks", "(B, T, 50) ids", "#e8e8e8"),
        (f"character CNN: embed {c.char_embed_dim}, filters of widths {widths} ({Fn} in all),\n"
         f"max over positions, relu, {c.n_highway} highway layer{'s' * (c.n_highway > 1)}, projection",
         f"(B, T, {P}) = x_k, no context yet", "#cfe2f3"),
        (f"forward LSTM stack: {L} layers, cell {D} -> projection {P}, residual\n"
         f"backward LSTM stack: the same, reading each sentence right to left",
         f"{L} x (B, T, {P}) per direction", "#d9ead3"),
        (f"ELMo's layers: j = 0 is [x_k; x_k], j = 1..{L} is [forward_j; backward_j]",
         f"{L + 1} x (B, T, {2 * P}) = h_kj", "#fff2cc"),
        ("scalar mix (paper eq. 1): ELMo_k = gamma * sum_j softmax(w)_j h_kj, learned per task",
         f"(B, T, {2 * P})", "#fce5cd"),
        ("the task model: [ELMo_k; x_k] -> BiLSTM -> pooling -> classifier (SST, MultiNLI)", "(B, classes)",
         "#ead1dc"),
    ]
    fig, ax = plt.subplots(figsize=(9, 7.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, len(stages) * 1.25 + 0.4)
    ax.axis("off")
    for i, (text, shape, colour) in enumerate(stages):
        y = (len(stages) - 1 - i) * 1.25 + 0.4
        ax.add_patch(plt.Rectangle((0.2, y), 6.9, 0.85, facecolor=colour, edgecolor="#555555"))
        ax.text(0.35, y + 0.42, text, va="center", fontsize=8.5)
        ax.text(7.3, y + 0.42, shape, va="center", fontsize=9, family="monospace")
        if i:
            ax.annotate("", xy=(3.6, y + 0.85), xytext=(3.6, y + 1.25),
                        arrowprops={"arrowstyle": "->", "color": "#333333"})
    y_lstm = (len(stages) - 3) * 1.25 + 0.4
    ax.annotate("pretraining: one softmax over the vocabulary,\nshared by both directions (paper eq. 3)",
                xy=(7.1, y_lstm + 0.25), xytext=(7.3, y_lstm - 0.42), fontsize=7.5, color="#7f3f00", va="center",
                arrowprops={"arrowstyle": "->", "color": "#7f3f00"})
    ax.set_title(f"ELMo, preset `{preset}` ({L} x {D} -> {P}, {Fn} filters)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_curves(folder: str) -> list:
    """-> [(label, minutes, perplexities)]: train_lm.py metrics JSON (forward ppl of each validation) and
    CSV files with `minutes,ppl` rows (another program's curve)."""
    curves = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            m = json.load(f)
        history = m.get("history") or []
        if history:
            label = m.get("label") or os.path.splitext(os.path.basename(path))[0]
            curves.append((label, [h["trained_seconds"] / 60 for h in history],
                           [h["ppl_forward"] for h in history]))
    for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
        with open(path) as f:
            rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
        try:
            curves.append((rows[0].get("label") or os.path.splitext(os.path.basename(path))[0],
                           [float(r["minutes"]) for r in rows], [float(r["ppl"]) for r in rows]))
        except (IndexError, KeyError, TypeError, ValueError):
            raise UserError(f"{path}: expected a header with minutes and ppl (and label) and one row of numbers "
                            f"a line (quote a label that holds a comma)") from None
    return curves


def learning_curves(folder: str, path: str):
    plt = pyplot()
    from matplotlib import ticker
    curves = read_curves(folder)
    if not curves:
        raise UserError(f"no curves in {folder} (train_lm.py --metrics-json files, or minutes,ppl CSV files)")
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, minutes, ppl in curves:
        ax.plot(minutes, ppl, marker="o", markersize=3, label=label)
    ax.set_xlabel("training minutes (validation time included for train_lm.py)")
    ax.set_ylabel("validation perplexity (forward LM)")
    ax.set_yscale("log")                       # plain numbers on the log axis, not powers of ten
    ax.yaxis.set_major_locator(ticker.FixedLocator([100, 125, 150, 175, 200, 250, 300, 400, 500, 700, 1000]))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Learning curves on 2 CPU cores (RESULTS.md has the commands)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def layer_weights(folder: str, path: str):
    plt = pyplot()
    bars = []
    for p in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(p) as f:
            m = json.load(f)
        for where, mix in (m.get("mix") or {}).items():
            name = m.get("label") or os.path.splitext(os.path.basename(p))[0]
            name = textwrap.fill(name, 16)     # tick labels side by side must not overlap
            bars.append((f"{name}\n({where})" if len(m["mix"]) > 1 else name, mix["s"]))
    if not bars:
        raise UserError(f"no learned mixes in {folder} (train_sst.py / train_mnli.py --metrics-json files)")
    n_layers = max(len(s) for _, s in bars)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(bars)), 4))
    width = 0.8 / n_layers
    for j in range(n_layers):
        ax.bar([i + (j - (n_layers - 1) / 2) * width for i in range(len(bars))], [s[j] for _, s in bars], width,
               label=f"layer {j}" + (" (token, no context)" if j == 0 else ""))
    ax.axhline(1 / n_layers, color="#888888", linestyle=":", linewidth=1)
    ax.set_ylim(0, 1.35 * max(max(s) for _, s in bars))      # room for the legend above the bars
    ax.set_xticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    ax.set_ylabel("softmax(w)_j, the learned layer weight")
    ax.legend(fontsize=8)
    ax.set_title("Which biLM layers each task uses (the paper's Figure 2; dotted: an even mix)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def probes(folder: str, path: str):
    plt = pyplot()
    tasks = {}                                  # task -> [(model, metrics)], from TASK_MODEL.json
    for p in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(p) as f:
            m = json.load(f)
        if "task" not in m or "layers" not in m or "baseline" not in m:
            raise UserError(f"{p} is not a probe.py --metrics-json file (no task, layers or baseline)")
        model = os.path.splitext(os.path.basename(p))[0].split("_", 1)[-1]
        tasks.setdefault(m["task"], []).append((model, m))
    if not tasks:
        raise UserError(f"no probe results in {folder} (probe.py --metrics-json files named TASK_MODEL.json)")
    order = [t for t in ("pos", "chunk", "wsd") if t in tasks] + sorted(set(tasks) - {"pos", "chunk", "wsd"})
    fig, axes = plt.subplots(1, len(order), figsize=(4.2 * len(order), 3.6), squeeze=False)
    for ax, task in zip(axes[0], order):
        runs = tasks[task]
        names = list(runs[0][1]["layers"])
        width = 0.8 / len(runs)
        low = 1.0
        for r, (model, m) in enumerate(runs):
            values = [m["layers"][n]["dev"] for n in names]
            low = min(low, *values, m["baseline"]["dev"])
            ax.bar([i + (r - (len(runs) - 1) / 2) * width for i in range(len(names))], values, width, label=model)
        ax.axhline(runs[0][1]["baseline"]["dev"], color="#444444", linestyle="--", linewidth=1,
                   label="most frequent label")
        ax.set_xticks(range(len(names)), [("layer " + n) if n != "mix" else "mix" for n in names], fontsize=8)
        ax.set_ylim(max(0.0, low - 0.1), 1.0)
        method = " (1-nearest-neighbour sense)" if task == "wsd" else ""
        ax.set_title(f"{task}: dev {runs[0][1]['metric']}{method}", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("What each layer knows: a probe on one layer's vectors (layer 0: the character CNN, no context)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))         # room for the legend below the panels
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--preset", default="original", choices=sorted(PRESETS), help="the model diagram's sizes")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="folder with curves/, mix/ and probe/")
    p.add_argument("--out", default=os.path.join(HERE, "assets"), help="folder for the PNG files")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model_diagram(args.preset, os.path.join(args.out, "model.png"))
    learning_curves(os.path.join(args.results, "curves"), os.path.join(args.out, "learning_curves.png"))
    layer_weights(os.path.join(args.results, "mix"), os.path.join(args.out, "layer_weights.png"))
    probes(os.path.join(args.results, "probe"), os.path.join(args.out, "probes.png"))
    print(f"wrote model.png, learning_curves.png, layer_weights.png and probes.png to {args.out}")


if __name__ == "__main__":
    run_main(main)
