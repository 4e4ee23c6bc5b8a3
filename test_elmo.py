"""Tests aimed at the real bugs of an ELMo implementation. Each test's docstring names the bug it catches.

In the reading order of the code: the model, the published files, data, the scripts, robustness,
distributed training; each helper and fixture is defined before its first use.

Run: pytest test_elmo.py   (CPU, a few minutes; `-m "not slow"` skips the end-to-end subprocess runs)
"""
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from elmo_pytorch import data
from elmo_pytorch.data import UserError, batch_to_ids
from elmo_pytorch.elmo import (PRESETS, BiLM, ELMoConfig, Elmo, ScalarMix, count_parameters, load_elmo,
                               reverse_within_length)
from elmo_pytorch.runtime import atomic_save, load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "testdata")
ATOL = 1e-5  # the fixture's README: more than one thread moves values by up to ~7e-6

SENTENCES = [["The", "cat", "sat", "on", "the", "mat", "."], ["Hi"], ["naïve", "café", "!", "ok"],
             ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]]


# ---------------------------------------------------------------------------------------------------------
# Helpers and fixtures shared by the tests below
# ---------------------------------------------------------------------------------------------------------
def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = ELMoConfig(**{**PRESETS["tiny"], "dropout": 0.0, "vocab_size": 40, **overrides})
    return BiLM(config).eval()


def word_ids(sentences, vocab_size=40):
    """Deterministic fake word ids (>= 4, below the specials) for the word-encoder model."""
    T = max(len(s) for s in sentences)
    ids = torch.zeros(len(sentences), T, dtype=torch.long)
    for b, s in enumerate(sentences):
        ids[b, : len(s)] = torch.tensor([4 + sum(map(ord, w)) % (vocab_size - 4) for w in s])
    return ids


def inputs_for(model, sentences):
    return batch_to_ids(sentences) if model.config.token_encoder == "char" else word_ids(sentences)


def synthetic_corpus(n, seed):
    """Sentences with structure: each starts at a random word and counts up (mod 20), length 4-10."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(20)]
    out = []
    for _ in range(n):
        start, length = rng.randrange(20), rng.randint(4, 10)
        out.append([words[(start + i) % 20] for i in range(length)])
    return out


@pytest.fixture(scope="session", autouse=True)
def shard_cache(tmp_path_factory):
    """One temporary token-shard cache for every script the tests run (not the user's ~/.cache)."""
    os.environ["ELMO_DATA_CACHE"] = str(tmp_path_factory.mktemp("shards"))


def run_script(script, *args, env=None, timeout=300):
    """Run a script as a user would."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE, env={**os.environ, **(env or {})})


def run_inprocess(script, *args, env=None, timeout=None):
    """Call a script's entry point in this process, as `python SCRIPT ARGS` would (through run_main, so the
    exit status and stderr are the ones a user sees), for the table-driven error tests, where starting
    Python again for each row adds nothing. -> a CompletedProcess."""
    import contextlib
    import importlib
    import io
    import signal
    from elmo_pytorch import runtime
    module = importlib.import_module("elmo_pytorch." + ("tools" if script == "elmo.py" else script[:-3]))
    entry = module._cli if script == "elmo.py" else module.main
    out, err = io.StringIO(), io.StringIO()
    handlers = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runtime.run_main(lambda: entry([str(a) for a in args]))
    except SystemExit as e:
        code = e.code or 0
    finally:
        for n, handler in handlers.items():
            signal.signal(n, handler)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def assert_user_error(r, *needles):
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(directory):
    """Every file below `directory` with its bytes: what a failed command must leave exactly as it was."""
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


def assert_every_row_is_a_user_error(rows, directory, run=run_inprocess):
    """Run every (name, argv, words the message must contain) row: each must end in one line and exit
    status 2, and leave `directory` as it was, byte for byte. All rows run; the failures are listed."""
    failures = []
    for name, argv, needles in rows:
        before = snapshot(directory)
        r = run(*argv, env={"HF_HUB_OFFLINE": "1"}, timeout=120)
        try:
            assert_user_error(r, *needles)
            after = snapshot(directory)
            assert after.keys() == before.keys(), f"files added or removed: {set(after) ^ set(before)}"
            assert after == before, "a file was changed"
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    (d / "train.txt").write_text("\n".join(" ".join(s) for s in synthetic_corpus(300, 0)) + "\n")
    (d / "valid.txt").write_text("\n".join(" ".join(s) for s in synthetic_corpus(50, 1)) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny_lm(tiny_files):
    """A tiny biLM trained by train_lm.py as a subprocess (used by several tests)."""
    out = tiny_files / "lm.pt"
    r = run_script("train_lm.py", "--preset", "tiny", "--train-file", tiny_files / "train.txt",
                   "--valid-file", tiny_files / "valid.txt", "--max-steps", 60, "--batch-tokens", 300,
                   "--lr", 1e-2, "--out", out, "--metrics-json", tiny_files / "train_metrics.json",
                   "--threads", 1)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def golden():
    g = np.load(os.path.join(GOLDEN, "golden.npz"))
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def official():
    return load_elmo(os.path.join(GOLDEN, "weights.hdf5"))


def published_pair(folder, prefix="elmo_tiny_"):
    """The golden fixture's two files under the published names (`X_options.json`, `X_weights.hdf5`)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(GOLDEN, "options.json"), folder / f"{prefix}options.json")
    shutil.copy(os.path.join(GOLDEN, "weights.hdf5"), folder / f"{prefix}weights.hdf5")
    return folder / f"{prefix}options.json", folder / f"{prefix}weights.hdf5"


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """Tiny SST-2 and MNLI files where the label is readable from the words."""
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    good, bad = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
    rows = ["sentence\tlabel"]
    for _ in range(120):
        y = rng.randrange(2)
        words = [rng.choice(good if y else bad)] + rng.sample(["the", "film", "was", "a", "plot"], 3)
        rng.shuffle(words)
        rows.append(" ".join(words) + f"\t{y}")
    (d / "sst.tsv").write_text("\n".join(rows) + "\n")
    rows = ["premise\thypothesis\tlabel\tgenre"]
    for i in range(120):
        y = i % 3
        p = rng.choice(["a man sleeps", "the dog runs", "kids play"])
        h = [p, "something " + p, "nobody " + p][y]
        rows.append(f"{p}\t{h}\t{['entailment', '1', 'contradiction'][y]}\t{['fiction', 'travel'][i % 2]}")
    rows.append("a\tb\t-1\tfiction")
    (d / "mnli.tsv").write_text("\n".join(rows) + "\n")
    return d


# ---------------------------------------------------------------------------------------------------------
# The model: shapes, padding, leakage, the LSTM paths, the CNN paths, the token memo
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ["char", "word"])
def test_shapes_and_mask(encoder):
    """Catches shape/alignment bugs: L+1 layers of (B, T, 2P) aligned to the input tokens, mask (B, T),
    zeros at padding, layer 0 = [e; e]."""
    model = tiny_model(token_encoder=encoder)
    ids = inputs_for(model, SENTENCES)
    with torch.no_grad():
        out = model(ids)
    B, T, P = len(SENTENCES), max(map(len, SENTENCES)), model.config.projection_dim
    assert len(out["activations"]) == model.config.n_layers + 1
    assert out["mask"].shape == (B, T) and out["mask"].dtype == torch.bool
    assert out["mask"].sum(1).tolist() == [len(s) for s in SENTENCES]
    for h in out["activations"]:
        assert h.shape == (B, T, 2 * P)
        assert torch.all(h[~out["mask"]] == 0)
    layer0 = out["activations"][0]
    assert torch.equal(layer0[..., :P], layer0[..., P:])
    targets = torch.randint(4, 40, (B, T + 2))
    nll_f, nll_b, n = model.lm_nll(ids, targets)
    assert nll_f.shape == () and n == sum(len(s) + 1 for s in SENTENCES)   # padding predicts nothing


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_padding_invariance(impl):
    """Catches padding leakage: a sentence's vectors must be identical alone and in a batch padded to a
    longer sentence (e.g. a backward LSTM that starts reading at the padding)."""
    model = tiny_model()
    model.impl = impl
    with torch.no_grad():
        batch = model(batch_to_ids(SENTENCES))["activations"]
        for b, sentence in enumerate(SENTENCES):
            alone = model(batch_to_ids([sentence]))["activations"]
            for k, h in enumerate(alone):
                n = len(sentence)
                assert torch.allclose(batch[k][b, :n], h[0, :n], atol=1e-6), (b, k)


def unchanged(a, b):
    """Equal up to float rounding (1e-6). Not bit-equal: the character CNN runs once per distinct token,
    and changing other words moves a token's row in that batch, which some CPUs round differently in the
    last bit (seen on AMD EPYC). A leak moves outputs by orders of magnitude more: see `changed`."""
    return (a - b).abs().max() <= 1e-6


def changed(a, b):
    """Clearly different (more than 1e-3): the counterpart that makes each leakage test able to fail."""
    return (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("impl,encoder", [("fused", "char"), ("reference", "char"), ("fused", "word")])
def test_no_future_leakage_in_any_layer(impl, encoder):
    """Catches the notebook's bug (a 'language model' that reads the answer): changing the tokens after
    position t changes no forward output at or before t, and changing tokens before t changes no backward
    output at or after t, in every layer."""
    model = tiny_model(token_encoder=encoder)
    model.impl = impl
    sentence = ["w%d" % i for i in range(9)]
    t = 4
    later = sentence[: t + 1] + ["changed", "x", "yy", "zzz"]
    earlier = ["changed", "x", "yy", "zzz"] + sentence[4:]
    P = model.config.projection_dim
    with torch.no_grad():
        base = model(inputs_for(model, [sentence]))["activations"]
        after = model(inputs_for(model, [later]))["activations"]
        before = model(inputs_for(model, [earlier]))["activations"]
    for k in range(1, len(base)):
        assert unchanged(base[k][0, : t + 1, :P], after[k][0, : t + 1, :P]), f"forward layer {k} saw the future"
        assert changed(base[k][0, t + 1:, :P], after[k][0, t + 1:, :P])   # the test can fail
        assert unchanged(base[k][0, t:, P:], before[k][0, t:, P:]), f"backward layer {k} saw the past"
        assert changed(base[k][0, :t, P:], before[k][0, :t, P:])


@pytest.mark.parametrize("encoder", ["char", "word"])
def test_lm_loss_cannot_see_the_word_it_predicts(encoder):
    """Catches leakage through the LM head: the forward and backward log-likelihood of word k (targets
    masked to that one word) must not change when the *input* at position k is replaced by another word."""
    model = tiny_model(token_encoder=encoder)
    sentence = ["w%d" % i for i in range(7)]
    for k in range(len(sentence)):
        targets = torch.zeros(1, len(sentence) + 2, dtype=torch.long)
        targets[0, k + 1] = 7                                  # only word k is predicted (position k+1)
        swapped = sentence[:k] + ["SOMETHING-ELSE"] + sentence[k + 1:]
        with torch.no_grad():
            f1, b1, n1 = model.lm_nll(inputs_for(model, [sentence]), targets)
            f2, b2, n2 = model.lm_nll(inputs_for(model, [swapped]), targets)
        assert n1 == n2 == 1
        assert torch.equal(f1, f2) and torch.equal(b1, b2), f"word {k} leaked into its own prediction"
    # and the check has teeth: changing the word *before* k moves the forward prediction of k
    with torch.no_grad():
        f3, _, _ = model.lm_nll(inputs_for(model, [sentence[:-2] + ["qqq", sentence[-1]]]), targets)
    assert not torch.equal(f1, f3)


@pytest.mark.parametrize("encoder", ["char", "word"])
def test_lm_loss_is_the_same_alone_and_in_a_padded_batch(encoder):
    """Catches padding leakage through the LM loss: each direction's summed NLL (and the prediction count)
    of a padded batch must equal the sum over its sentences run alone. (A backward mask built from the
    targets once scored a prediction of </S> from the padding after it.)"""
    model = tiny_model(token_encoder=encoder)
    torch.manual_seed(1)
    targets = torch.zeros(len(SENTENCES), max(map(len, SENTENCES)) + 2, dtype=torch.long)
    for b, s in enumerate(SENTENCES):
        targets[b, : len(s) + 2] = torch.cat([torch.tensor([1]), torch.randint(4, 40, (len(s),)), torch.tensor([2])])
    with torch.no_grad():
        f, b, n = model.lm_nll(inputs_for(model, SENTENCES), targets)
        alone = [model.lm_nll(inputs_for(model, [s]), targets[i: i + 1, : len(s) + 2])
                 for i, s in enumerate(SENTENCES)]
    assert n == sum(len(s) + 1 for s in SENTENCES) == sum(a[2] for a in alone)
    assert torch.allclose(f, sum(a[0] for a in alone), atol=1e-4)
    assert torch.allclose(b, sum(a[1] for a in alone), atol=1e-4)


def test_reverse_within_length():
    """Catches a backward direction that reverses the padding into the sentence."""
    x = torch.arange(1, 6).float().view(1, 5, 1).repeat(2, 1, 1)
    out = reverse_within_length(x, torch.tensor([3, 5]))
    assert out[0, :, 0].tolist() == [3, 2, 1, 4, 5]
    assert out[1, :, 0].tolist() == [5, 4, 3, 2, 1]
    assert torch.equal(reverse_within_length(out, torch.tensor([3, 5])), x)


def test_reference_and_fused_lstm_agree():
    """Catches divergence between the readable cell, its column-stepping speed path and nn.LSTM (gate order,
    bias, projection, a transpose in the column cell) with clipping off, forward and backward, outputs and
    gradients."""
    model = tiny_model(dropout=0.0)
    ids = batch_to_ids(SENTENCES)
    outs, grads = {}, {}
    for impl in ("reference", "columns", "fused"):
        model.impl = impl
        model.zero_grad()
        out = model(ids)["activations"]
        sum(h.square().sum() for h in out).backward()
        outs[impl] = out
        grads[impl] = model.forward_lstm.layers[0].lstm.weight_hh_l0.grad.clone()
    for impl in ("columns", "fused"):
        for a, b in zip(outs["reference"], outs[impl]):
            assert torch.allclose(a, b, atol=1e-5), impl
        assert torch.allclose(grads["reference"], grads[impl], atol=1e-4), impl


def test_lstm_paths_carry_state_alike_and_auto_picks_the_exact_faster_path(tmp_path):
    """Catches a cell that mishandles a carried state (stream training passes one; the column cell steps on
    columns, so a state must be transposed in and out), a column cell that clips differently from the
    reference cell, and an `auto` that picks nn.LSTM where it cannot be exact (clipping) or a path other
    than the documented one."""
    layer = tiny_model().forward_lstm.layers[0]
    x = torch.randn(3, 5, 16)
    state = (torch.randn(3, 16), torch.randn(3, 32))                 # h (B, P), c (B, D)
    with torch.no_grad():
        out_r, (h_r, c_r) = layer(x, "reference", state)
        for impl in ("columns", "fused"):
            out, (h, c) = layer(x, impl, state)
            assert torch.allclose(out_r, out, atol=1e-5) and (impl == "fused" or out.is_contiguous()), impl
            assert torch.allclose(h_r, h, atol=1e-5) and torch.allclose(c_r, c, atol=1e-5), impl
        clipping = tiny_model(cell_clip=0.5, proj_clip=0.2).forward_lstm.layers[0]
        out_r, (h_r, c_r) = clipping(3 * x, "reference", state)
        out_c, (h_c, c_c) = clipping(3 * x, "columns", state)
        assert out_r.abs().max() == pytest.approx(0.2) and c_r.abs().max() == pytest.approx(0.5)
        assert torch.allclose(out_r, out_c, atol=1e-6) and torch.allclose(c_r, c_c, atol=1e-6)
        assert torch.allclose(h_r, h_c, atol=1e-6)
    model = tiny_model()
    assert model.lstm_impl == "fused"                                 # training: nn.LSTM
    with torch.no_grad():
        assert model.lstm_impl == "columns"                           # frozen, on the CPU: the faster one
    assert tiny_model(proj_clip=3.0).lstm_impl == "columns"
    clipped = tiny_model(cell_clip=3.0)
    from dataclasses import asdict
    from elmo_pytorch.runtime import CHECKPOINT_FORMAT
    atomic_save({"format": CHECKPOINT_FORMAT, "kind": "bilm", "config": asdict(clipped.config), "vocab": None,
                 "model": clipped.state_dict()}, tmp_path / "clipped.pt")
    with pytest.raises(UserError, match="cannot"):
        load_elmo(str(tmp_path / "clipped.pt"), impl="fused")


def test_fused_refuses_clipping():
    """Catches a silent fallback: nn.LSTM cannot clip, so asking for the fused path with clipping errors."""
    model = tiny_model(cell_clip=3.0)
    assert model.lstm_impl == "columns"
    model.impl = "fused"
    with pytest.raises(ValueError, match="cannot clip"):
        model(batch_to_ids(SENTENCES))


def test_unique_token_cnn_equals_per_token():
    """Catches bugs in the character-CNN speedups (distinct tokens only, trimmed character positions):
    they must give exactly what the plain per-token CNN gives, padding rows included."""
    model = tiny_model()
    for sentences in (SENTENCES, SENTENCES + [["x" * 60, "repeated", "repeated"]]):  # trimmed; not trimmed
        ids = batch_to_ids(sentences)
        with torch.no_grad():
            fast = model.token_encoder(ids, unique=True)
            slow = model.token_encoder(ids, unique=False)
        assert torch.allclose(fast, slow, atol=1e-6)


def test_remembered_tokens_give_the_same_layers_and_skip_the_cnn():
    """Catches a token memo (CharCNN.remember_tokens) that returns another token's embedding (a key cut at
    the batch's trimmed width, so that "ab" and "abc" collide), or never hits, or breaks when full: over
    batches that share words, the ELMo layers equal those computed without it, later batches send only
    their new tokens through the CNN, a full memo still gives the right layers, and with gradients on
    (training) the memo is not used."""
    torch.manual_seed(0)
    model = tiny_model(vocab_size=0)
    rng = random.Random(0)
    words = ["w%d" % i for i in range(30)] + ["ab", "abc", "x" * 60, "naïve"]
    batches = [[[rng.choice(words) for _ in range(rng.randint(1, 9))] for _ in range(5)] for _ in range(6)]
    with torch.no_grad():
        expected = [model(batch_to_ids(b))["activations"] for b in batches]
    encode = model.token_encoder.encode_tokens
    for max_tokens in (500_000, 7):
        model.token_encoder.remember_tokens(max_tokens)
        sizes = []
        model.token_encoder.encode_tokens = lambda chars: (sizes.append(len(chars)), encode(chars))[1]
        with torch.no_grad():
            for b, layers in zip(batches, expected):
                out = model(batch_to_ids(b))["activations"]
                assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(out, layers)), max_tokens
        if max_tokens == 500_000:        # every word, <S>, </S> and the all-padding position, once
            assert len(model.token_encoder.memo) == len({w for b in batches for s in b for w in s}) + 3
            assert sizes[-1] < sizes[0] / 4 and sum(sizes) == len(model.token_encoder.memo)
            first = sizes[0]
        else:
            assert len(model.token_encoder.memo) == 7
    sizes.clear()
    model(batch_to_ids(batches[0]))                     # gradients on: every distinct token recomputed
    assert sizes == [first]
    del model.token_encoder.encode_tokens


def test_frozen_bilm_remembers_tokens_by_default_and_training_never_does(tmp_path):
    """Catches the token memo missing where the biLM is frozen (load_elmo, Elmo, so embed,
    neighbors and the task scripts' caching), present where a biLM trains, unbounded, or returning what
    older weights computed after the weights changed (a fine-tuned biLM must not meet a stale memo)."""
    from dataclasses import asdict
    from elmo_pytorch.elmo import TOKEN_MEMO_MIB
    from elmo_pytorch.runtime import CHECKPOINT_FORMAT
    model = tiny_model(vocab_size=0)
    assert model.token_encoder.memo is None                           # a biLM built to train: no memo
    atomic_save({"format": CHECKPOINT_FORMAT, "kind": "bilm", "config": asdict(model.config), "vocab": None,
                 "model": model.state_dict()}, tmp_path / "m.pt")
    frozen = load_elmo(str(tmp_path / "m.pt"))
    memo = frozen.token_encoder.memo
    assert memo is not None and memo.max_tokens == TOKEN_MEMO_MIB * 2 ** 20 // (4 * model.config.projection_dim)
    assert Elmo(tiny_model(vocab_size=0)).bilm.token_encoder.memo is not None
    ids = batch_to_ids(SENTENCES)
    with torch.no_grad():
        plain = model(ids)["activations"]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(frozen(ids)["activations"], plain))
        assert len(memo) > 0
        frozen.token_encoder.proj.bias.add_(1.0)                      # new weights: the memo starts over
        model.token_encoder.proj.bias.add_(1.0)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(frozen(ids)["activations"],
                                                                   model(ids)["activations"]))
        n = len(memo)
        frozen.train()                                                # training mode: never consulted
        frozen(batch_to_ids([["entirely", "new", "words"]]))
        assert len(memo) == n


def test_elmo_imports_only_the_model_and_the_modules_form_no_cycle():
    """Catches the model file growing its old jobs back: `import elmo` must not load the file format, the
    downstream code or the tools (nor h5py or datasets), and no project module may import one that imports
    it back, counting imports inside functions (an import under `if __name__ == "__main__":` is the
    command line's, and does not count)."""
    import ast
    code = "import sys; from elmo_pytorch import elmo; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.split())
    assert not loaded & {"elmo_pytorch." + m for m in ("published", "downstream", "tools", "train_lm")}
    assert not loaded & {"h5py", "datasets"}
    modules = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")}
    graph = {}
    for m in modules:
        tree = ast.parse(open(os.path.join(HERE, m + ".py"), encoding="utf-8").read())
        cli = {id(n) for b in tree.body if isinstance(b, ast.If) and "__main__" in ast.unparse(b.test)
               for n in ast.walk(b)}
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) and id(n) not in cli for a in n.names}
        for n in ast.walk(tree):        # `from elmo_pytorch.X import ...` and `from elmo_pytorch import X, Y`
            if isinstance(n, ast.ImportFrom) and id(n) not in cli and n.module:
                names |= {f"{n.module}.{a.name}" for a in n.names} if n.module == "elmo_pytorch" else {n.module}
        graph[m] = {name.split(".")[1] for name in names if name.startswith("elmo_pytorch.")} & modules - {m}
    assert {"data", "runtime"} <= graph["elmo"], graph        # the parser sees the package's imports

    def reaches(a, b, seen=()):
        return b in graph[a] or any(reaches(c, b, seen + (a,)) for c in graph[a] if c not in seen)
    assert not [m for m in modules if reaches(m, m)], graph


# ---------------------------------------------------------------------------------------------------------
# The model: stream context (--context stream), windows of a running text with the state carried
# ---------------------------------------------------------------------------------------------------------
def stream_outputs(model, sentences, window):
    """Run `model` over the stream of `sentences` (each as <S> w.. </S>) the way StreamBatches does: one
    row, consecutive windows from data.Corpus.window, the state of each window passed into the next.
    Returns (forward, backward) top-layer outputs, (N, P) each, indexed by stream position: the backward
    output read at reversed position r belongs to stream position N-1-r."""
    corpus = data.Corpus.from_sentences(sentences, data.build_vocab(sentences, 100))
    N, state, f, b = len(corpus.stream), None, [], []
    with torch.no_grad():
        for start in range(0, N, window):
            starts = torch.tensor([start])
            x_f, _ = corpus.window(starts, window, char_inputs=True)
            x_b, _ = corpus.window(starts, window, char_inputs=True, backward=True)
            out_f, out_b, state = model.stream_encode(x_f, x_b, state)
            f.append(out_f[0])
            b.append(out_b[0])
    return torch.cat(f)[:N], torch.cat(b)[:N].flip(0)


STREAM = [["the", "cat", "sat", "on", "a", "mat"], ["dogs", "ran", "to", "the", "old", "barn"],
          ["birds", "sang", "in", "the", "tall", "trees"]]      # stream positions: <S>=0, the=1 .. </S>=23


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_stream_has_no_leakage_across_windows(impl):
    """Catches leakage through the carried state or the stream's reading order: changing the tokens after
    stream position t (later in t's window and in the windows after it) changes no forward output at or
    before t, and changing the tokens before t changes no backward output at or after t. Would catch a
    backward LM that reads each sentence reversed but the sentences in text order (bilm-tf's layout: its
    backward state then holds the *previous* sentence), or windows fed in the wrong order."""
    model = tiny_model()
    model.impl = impl
    t = 11                                                  # "to" in sentence 2, inside window 3 of 5
    later = [STREAM[0], ["dogs", "ran", "to", "xx", "yyy", "z"], ["no", "more", "birds"]]
    earlier = [["one", "two"], ["q", "rr", "to", "the", "old", "barn"], STREAM[2]]
    base_f, base_b = stream_outputs(model, STREAM, window=5)
    later_f, _ = stream_outputs(model, later, window=5)
    _, earlier_b = stream_outputs(model, earlier, window=5)
    shift = len(STREAM[0]) + len(STREAM[1]) - len(earlier[0]) - len(earlier[1])   # earlier text is shorter
    assert unchanged(base_f[: t + 1], later_f[: t + 1]), "forward saw the future"
    assert changed(base_f[t + 1: t + 2], later_f[t + 1: t + 2])          # the test can fail
    assert unchanged(base_b[t:], earlier_b[t - shift:]), "backward saw the past"
    assert changed(base_b[t - 1: t], earlier_b[t - 1 - shift: t - shift])


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_stream_carry_equals_one_long_call(impl):
    """Catches a state that is not carried, carried from the wrong layer or direction, or reset in the
    middle: windows of 3, 5 or 8 tokens with carried state give the outputs of one call over the whole
    text (to float rounding), and dropping the state between windows does not."""
    model = tiny_model()
    model.impl = impl
    whole_f, whole_b = stream_outputs(model, STREAM, window=24)
    for window in (3, 5, 8):
        f, b = stream_outputs(model, STREAM, window)
        assert torch.allclose(f, whole_f, atol=1e-6) and torch.allclose(b, whole_b, atol=1e-6), window
    corpus = data.Corpus.from_sentences(STREAM, data.build_vocab(STREAM, 100))
    with torch.no_grad():       # without the carried state, the second window starts cold: different
        second = corpus.window(torch.tensor([8]), 8, char_inputs=True)[0]
        cold, _, _ = model.stream_encode(second, second)
    assert changed(cold[0], whole_f[8:16])


def test_stream_windows_targets_and_unscored_restarts():
    """Catches off-by-one targets and wrong scoring in stream windows: the target of each input is the
    next token in reading order (the backward window reads the text from its end), `</S> -> <S>` (and
    backwards `<S> -> </S>`) is not scored, and nothing is scored past the text's ends."""
    vocab = data.build_vocab(STREAM, 100)
    corpus = data.Corpus.from_sentences(STREAM, vocab)
    words = [w for s in STREAM for w in ["<S>", *s, "</S>"]]
    N = len(words)
    pad = data.PAD_ID
    x, y = corpus.window(torch.tensor([0, 5]), N, char_inputs=False)
    for row, start in enumerate([0, 5]):
        for j in range(N):
            here = start + j
            assert x[row, j] == (vocab.index(words[here]) if here < N else pad)
            expected = vocab.index(words[here + 1]) if here + 1 < N and words[here + 1] != "<S>" else pad
            assert y[row, j] == expected, (row, j)
    x, y = corpus.window(torch.tensor([0]), N, char_inputs=False, backward=True)
    backwards = words[::-1]
    for j in range(N):
        assert x[0, j] == vocab.index(backwards[j])
        expected = vocab.index(backwards[j + 1]) if j + 1 < N and backwards[j + 1] != "</S>" else pad
        assert y[0, j] == expected, j
    # one prediction per word and one boundary per sentence and direction: the sentence-mode count
    assert int((y != pad).sum()) == sum(len(s) + 1 for s in STREAM)


# ---------------------------------------------------------------------------------------------------------
# The model: scalar mix, sizes, checkpoints, learning
# ---------------------------------------------------------------------------------------------------------
def test_scalar_mix_is_a_softmax_weighted_sum():
    """Catches an un-normalised mix (weights must go through a softmax and sum to one) or a missing gamma."""
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.weights.copy_(torch.tensor([0.3, -1.0, 2.0]))
        mix.gamma.fill_(1.7)
    layers = [torch.randn(2, 4, 6) for _ in range(3)]
    s = torch.softmax(mix.weights, 0)
    assert torch.isclose(s.sum(), torch.tensor(1.0))
    expected = 1.7 * (s[0] * layers[0] + s[1] * layers[1] + s[2] * layers[2])
    assert torch.allclose(mix(layers), expected, atol=1e-6)


def test_scalar_mix_layer_norm_ignores_padding():
    """Catches layer-norm statistics that include padding: changing padded values must not change the
    output at real positions."""
    mix = ScalarMix(2, layer_norm=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    layers = [torch.randn(2, 3, 4) for _ in range(2)]
    noisy = [h.clone() for h in layers]
    for h in noisy:
        h[~mask] = 1000.0
    assert torch.allclose(mix(layers, mask)[mask], mix(noisy, mask)[mask], atol=1e-5)
    assert not torch.allclose(mix(layers, mask)[mask], mix(noisy, torch.ones_like(mask))[mask], atol=1e-2)


@pytest.mark.parametrize("preset,published", [("small", 13.6e6), ("original", 93.6e6)])
def test_parameter_counts_match_allennlp(preset, published):
    """Catches architecture drift from the published models (filters, highway, projection, LSTM sizes)."""
    model = BiLM(ELMoConfig(**PRESETS[preset], vocab_size=0))
    n = count_parameters(model)["bilm"]
    assert abs(n - published) / published < 0.005, n


def test_checkpoint_round_trip_weights_only(tmp_path):
    """Catches checkpoints that need pickle (weights_only=True must load them) or that lose the config."""
    from dataclasses import asdict
    from elmo_pytorch.runtime import CHECKPOINT_FORMAT
    model = tiny_model()
    path = str(tmp_path / "m.pt")
    atomic_save({"format": CHECKPOINT_FORMAT, "kind": "bilm", "config": asdict(model.config),
                 "vocab": data.SPECIALS, "model": model.state_dict(), "step": 0, "args": {}}, path)
    torch.load(path, weights_only=True)
    loaded = load_elmo(path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    ids = batch_to_ids(SENTENCES)
    with torch.no_grad():
        for a, b in zip(model(ids)["activations"], loaded(ids)["activations"]):
            assert torch.equal(a, b)
    with pytest.raises(UserError, match="expected sst"):
        load_checkpoint(path, "sst")


def test_tiny_lm_learns_structure():
    """Catches an LM that does not learn (broken targets, shifted the wrong way, loss not propagated):
    a few hundred steps on a structured corpus must get far below its unigram perplexity."""
    torch.manual_seed(0)
    sentences = synthetic_corpus(400, seed=0)
    vocab = data.build_vocab(sentences, 100)
    corpus = data.Corpus.from_sentences(sentences, vocab)
    # unigram perplexity of the same predictions (words and </S>), from the training counts
    predicted = corpus.stream[corpus.stream != 1].long()                # every word and </S>, not <S>
    counts = torch.bincount(corpus.type_vocab[predicted], minlength=len(vocab)).float()
    p = counts / counts.sum()
    unigram_ppl = math.exp(-(counts * torch.log(p.clamp(min=1e-12))).sum() / counts.sum())
    model = BiLM(ELMoConfig(**{**PRESETS["tiny"], "vocab_size": len(vocab), "dropout": 0.0}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(200):
        batch = data.bucket_batches(corpus.lengths, 400, seed=step)[0]
        nll_f, nll_b, n = model.lm_nll(*corpus.batch(batch, True))
        loss = (nll_f + nll_b) / (2 * n)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    valid = data.Corpus.from_sentences(synthetic_corpus(100, seed=1), vocab)
    with torch.no_grad():
        nll_f, nll_b, n = model.lm_nll(*valid.batch(list(range(len(valid))), True))
    ppl_f, ppl_b = math.exp(nll_f / n), math.exp(nll_b / n)
    assert unigram_ppl > 15
    assert ppl_f < unigram_ppl / 4 and ppl_b < unigram_ppl / 4, (ppl_f, ppl_b, unigram_ppl)


# ---------------------------------------------------------------------------------------------------------
# The model on other hardware, tested without it: bf16, devices, the bench, the GPU check
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_bf16_autocast_training_step_matches_fp32(impl):
    """Catches a training step that breaks under bf16 autocast, the path `--dtype auto` takes on CUDA, run
    here through the CPU's autocast: a carried stream state whose dtype no longer matches the inputs, a
    loss reduced in bf16, a non-finite gradient. Both contexts, forward and backward: the loss stays within
    1e-3 (relative) of fp32 and the gradient within 5%, and bf16 was really used (the carried state is
    bf16), so the test cannot pass with autocast silently off."""
    sentences = synthetic_corpus(60, 0)
    vocab = data.build_vocab(sentences, 40)
    corpus = data.Corpus.from_sentences(sentences, vocab)
    inputs, targets = corpus.batch(list(range(16)), True)
    starts = torch.arange(4) * 100
    windows = [[corpus.window(s, 10, True, backward) for backward in (False, True)] for s in (starts, starts + 10)]
    torch.manual_seed(0)
    model = BiLM(ELMoConfig(**{**PRESETS["tiny"], "vocab_size": len(vocab), "dropout": 0.0}), impl=impl)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            f, b, n = model.lm_nll(inputs, targets)
            first = model.stream_nll(*windows[0])
            second = model.stream_nll(*windows[1], state=first[4])
        loss = (f + b) / (2 * n) + (second[0] + second[1]) / (second[2] + second[3])
        model.zero_grad()
        loss.backward()
        grad = model.forward_lstm.layers[0].lstm.weight_hh_l0.grad.clone()
        results[dtype] = loss.item(), grad, second[4][0][0][0].dtype
    (loss32, grad32, _), (loss16, grad16, state_dtype) = results[torch.float32], results[torch.bfloat16]
    assert state_dtype == torch.bfloat16
    assert math.isfinite(loss16) and abs(loss16 - loss32) <= 1e-3 * abs(loss32)
    assert torch.isfinite(grad16).all() and (grad16 - grad32).norm() <= 0.05 * grad32.norm()


@pytest.mark.parametrize("impl,encoder", [("fused", "char"), ("reference", "char"), ("fused", "word")])
def test_model_creates_no_tensor_on_the_default_device(impl, encoder):
    """Catches a bare torch.zeros / arange / tensor inside the model or the loss: such a tensor lands on
    the default device instead of the inputs' device, which is the first crash of a CUDA run. Here the
    model and its inputs live on the CPU while the default device is 'meta', so any tensor the model makes
    without taking its device from its inputs is a meta tensor, and mixing it with the CPU ones raises.
    Covers the ELMo layers, the scalar mix with layer norm, the sentence LM loss with backward, and the
    stream loss with a carried state."""
    sentences = synthetic_corpus(20, 0)
    vocab = data.build_vocab(sentences, 40)
    corpus = data.Corpus.from_sentences(sentences, vocab)
    char = encoder == "char"
    inputs, targets = corpus.batch(list(range(8)), char)
    windows = [corpus.window(torch.tensor([0, 60]), 5, char, backward) for backward in (False, True)]
    torch.manual_seed(0)
    model = BiLM(ELMoConfig(**{**PRESETS["tiny"], "vocab_size": len(vocab), "token_encoder": encoder,
                               "softmax": "adaptive", "adaptive_cutoffs": [10]}), impl=impl)
    mix = ScalarMix(model.config.n_layers + 1, layer_norm=True)
    with torch.device("meta"):
        out = model(inputs)
        mixed = mix(out["activations"], out["mask"])
        f, b, n = model.lm_nll(inputs, targets)
        (f + b).backward()
        state = model.stream_nll(*windows)[4]
        f, b, _, _, _ = model.stream_nll(*windows, state=state)
        (f + b).backward()
    assert mixed.device.type == "cpu" and f.device.type == "cpu"


def test_bench_runs_every_configuration_and_reports_drift(tmp_path):
    """Catches a broken bench.py: every combination of the flags gives one line and one JSON record with
    tokens/s and peak memory, the per-token CNN switch reaches the model, and a bf16 inference line
    reports its drift from the fp32 one (small, not zero)."""
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--preset", "tiny", "--mode", "infer", "train", "--lstm", "fused", "--cnn",
                   "distinct", "token", "--dtype", "float32", "bfloat16", "--batch", "4x5", "--warmup", 0,
                   "--repeats", 1, "--threads", 1, "--vocab-size", 50, "--json", out)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 * 2 * 2 and len(r.stdout.strip().splitlines()) == 2 + 8 + 1
    assert all(x["tokens_per_s"] > 0 and x["peak_mib"] > 0 for x in results)
    drifts = [x["drift_max_abs"] for x in results if x["mode"] == "infer" and x["dtype"] == "bfloat16"]
    assert len(drifts) == 2 and all(0 < d < 0.5 for d in drifts)
    r = run_script("bench.py", "--batch", "32by25")
    assert_user_error(r, "--batch")


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_writes_its_report(tmp_path):
    """Catches a GPU check that breaks before it is ever run on a GPU (where time is short and dear): the
    same script on the CPU with the tiny preset runs every part (the table with the clipped published layout,
    a train_lm.py run whose loss goes down and whose checkpoint loads on the CPU, embed, train_sst.py) and
    writes the JSON and the markdown table."""
    r = run_script("bench.py", "--suite", "gpu", "--device", "cpu", "--sizes", "tiny", "--out", tmp_path / "gpu",
                   "--threads", 2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu" / "gpu_check.json").read_text())
    table = report["table"]
    assert {x["preset"] for x in table} == {"tiny", "tiny+clip"} and all("tokens_per_s" in x for x in table)
    assert {(x["mode"], x["dtype"]) for x in table if x["preset"] == "tiny"} == {
        (m, d) for m in ("infer", "train") for d in ("float32", "bfloat16")}
    assert report["train_lm"]["returncode"] == 0 and report["train_lm"]["loss_went_down"]
    assert report["train_lm"]["loads_on_cpu"] is True
    assert report["embed"]["returncode"] == 0 and report["train_sst"]["returncode"] == 0
    assert json.loads((tmp_path / "gpu" / "sst.json").read_text())["step"] == 300
    md = (tmp_path / "gpu" / "gpu_check.md").read_text()
    assert "| tiny+clip | infer | reference |" in md and "train_lm.py --device cpu" in md


def test_allennlp_suite_without_allennlp_says_how_to_get_it(tmp_path):
    """Catches the AllenNLP comparison failing with an ImportError traceback where AllenNLP's modules are
    missing (everywhere AllenNLP does not install), instead of one line saying how to get them."""
    (tmp_path / "s.txt").write_text("a b c\n")
    for extra in ([], ["--allennlp", str(tmp_path)]):
        r = run_inprocess("bench.py", "--suite", "allennlp", "--text", tmp_path / "s.txt", *extra)
        assert_user_error(r, "AllenNLP's ELMo modules", "pip download allennlp==2.10.1 --no-deps", "--allennlp")
    assert "no allennlp/modules/elmo.py in" in r.stderr


def test_other_library_suites_without_the_library_say_how_to_get_it(tmp_path, monkeypatch):
    """Catches `--suite elmoformanylangs` or `--suite simple_elmo` ending in an ImportError traceback where
    the library is not installed (this project's own environment), instead of one line saying how to get it."""
    (tmp_path / "s.txt").write_text("a b c\n")
    for name in ("elmoformanylangs", "simple_elmo", "tensorflow"):
        monkeypatch.setitem(sys.modules, name, None)                   # `import name` now fails
    r = run_inprocess("bench.py", "--suite", "elmoformanylangs", "--elmo", os.path.join(GOLDEN, "elmoformanylangs",
                      "both"), "--text", tmp_path / "s.txt")
    assert_user_error(r, "needs ELMoForManyLangs", 'pip install elmoformanylangs "overrides<5"')
    r = run_inprocess("bench.py", "--suite", "simple_elmo", "--text", tmp_path / "s.txt")
    assert_user_error(r, "needs simple_elmo", "pip install simple-elmo tensorflow-cpu", "TF_USE_LEGACY_KERAS=1")


def test_train_lm_defaults_follow_the_device():
    """Catches `python train_lm.py --device cuda` training the 2-core CPU preset (what a first GPU run got),
    the cpu preset losing its measured recipes (one thread per process; more), and a flag the user gave being overridden by a default."""
    from elmo_pytorch import train_lm
    args = train_lm.parse_args([])
    note = train_lm.resolve_defaults(args, torch.device("cuda"))
    assert (args.preset, args.batch_tokens, args.lr) == ("small", 8192, None) and "--preset small" in note
    threads = torch.get_num_threads()
    try:
        for n, recipe in ((1, (700, 2e-3)), (2, (2000, 5e-3))):    # one thread per process, or more
            torch.set_num_threads(n)
            args = train_lm.parse_args([])
            train_lm.resolve_defaults(args, torch.device("cpu"))
            assert (args.preset, args.batch_tokens, args.lr) == ("cpu", *recipe), n
    finally:
        torch.set_num_threads(threads)
    args = train_lm.parse_args(["--preset", "tiny", "--batch-tokens", "300", "--lr", "0.01"])
    assert train_lm.resolve_defaults(args, torch.device("cuda")) == ""
    assert (args.preset, args.batch_tokens, args.lr) == ("tiny", 300, 0.01)
    args = train_lm.parse_args(["--preset", "small"])
    train_lm.resolve_defaults(args, torch.device("cpu"))
    assert (args.batch_tokens, args.lr) == (2000, None)            # no measurement: the old defaults


# ---------------------------------------------------------------------------------------------------------
# The published files: AllenNLP's golden values, names, convert / export round trips, embed, neighbours
# ---------------------------------------------------------------------------------------------------------
def test_batch_to_ids_matches_allennlp(golden):
    """Catches character-id bugs: the +1 shift, word marks, 48-byte truncation (mid-character), UTF-8 bytes
    not code points, literal <S>/</S>, zero padding."""
    sentences = json.loads(str(golden["sentences_json"]))
    ids = batch_to_ids(sentences)
    assert ids.dtype == torch.long
    assert torch.equal(ids, torch.from_numpy(golden["char_ids"]))


def test_official_weights_reproduce_allennlp(golden, official):
    """Catches every TF-conversion detail: conv kernel layout, highway carry/transform roles, gate order
    (i,j,f,o -> i,f,g,o), the forget-bias +1, W_0 split into input/recurrent halves, projection transpose,
    cell and projection clipping (12% of cells clip in this model), skip connections, <S>/</S> handling."""
    ids = batch_to_ids(json.loads(str(golden["sentences_json"])))
    with torch.no_grad():
        inputs, mask, _ = official.add_boundaries(ids)
        tokens = official.token_encoder(inputs)
        out = official(ids, boundaries=True)
    assert torch.equal(mask, torch.from_numpy(golden["mask_bos_eos"]))
    assert torch.allclose(tokens, torch.from_numpy(golden["token_embedding"]), atol=ATOL)
    for k in range(3):
        assert torch.allclose(out["activations"][k], torch.from_numpy(golden[f"layer_{k}"]), atol=ATOL), k


def test_clipping_is_needed_for_golden(golden):
    """Catches a loader or cell that silently ignores cell_clip/proj_clip: without them we must NOT match."""
    model = load_elmo(os.path.join(GOLDEN, "weights.hdf5"))
    for layer in list(model.forward_lstm.layers) + list(model.backward_lstm.layers):
        layer.cell_clip = layer.proj_clip = 0.0
    ids = batch_to_ids(json.loads(str(golden["sentences_json"])))
    with torch.no_grad():
        out = model(ids, boundaries=True)
    assert not torch.allclose(out["activations"][2], torch.from_numpy(golden["layer_2"]), atol=1e-3)


def test_stateless_matches_first_call_not_second(golden, official):
    """Catches AllenNLP's silent statefulness: calling twice must give the same output, equal to
    AllenNLP's first call and different from its second (which starts from the first call's states)."""
    ids = batch_to_ids(json.loads(str(golden["sentences_json"])))
    with torch.no_grad():
        first = official(ids, boundaries=True)["activations"]
        second = official(ids, boundaries=True)["activations"]
    for k in range(3):
        assert torch.equal(first[k], second[k])
    assert not torch.allclose(second[2], torch.from_numpy(golden["call2_layer_2"]), atol=1e-2)


def test_elmo_embedder_matches_allennlp(golden, official):
    """Catches scalar-mix bugs (softmax of the weights, gamma, layer norm over masked elements, removing
    <S>/</S> after mixing) against AllenNLP's `Elmo` output, with and without layer norm."""
    ids = batch_to_ids(json.loads(str(golden["sentences_json"])))
    for layer_norm, key in ((False, "elmo_representation"), (True, "elmo_representation_layer_norm")):
        embedder = Elmo(official, n_outputs=1, layer_norm=layer_norm, dropout=0.0)
        with torch.no_grad():
            embedder.mixes[0].weights.copy_(torch.from_numpy(golden["mix_weights"]))
            out = embedder(ids)
        assert torch.equal(out["mask"], torch.from_numpy(golden["mask"]))
        assert torch.allclose(out["elmo_representations"][0], torch.from_numpy(golden[key]), atol=ATOL), key


def test_published_names_find_their_options(tmp_path, golden):
    """Catches the rename users had to guess: `X_weights.hdf5` loads with `X_options.json` beside it, else
    with `options.json`, else with an explicit options path; with none of them, the error names all three."""
    from elmo_pytorch.published import find_options
    ids = batch_to_ids(json.loads(str(golden["sentences_json"])))
    expected = torch.from_numpy(golden["layer_2"])
    options, weights = published_pair(tmp_path / "published")
    assert find_options(str(weights)) == str(options)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(weights, plain / "elmo_tiny_weights.hdf5")
    shutil.copy(options, plain / "options.json")
    assert find_options(str(plain / "elmo_tiny_weights.hdf5")) == str(plain / "options.json")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(weights, alone / "elmo_tiny_weights.hdf5")
    with pytest.raises(UserError) as e:
        load_elmo(str(alone / "elmo_tiny_weights.hdf5"))
    assert all(s in str(e.value) for s in ("elmo_tiny_options.json", "/options.json", "--elmo-options"))
    for path, opts in ((weights, None), (plain / "elmo_tiny_weights.hdf5", None),
                       (alone / "elmo_tiny_weights.hdf5", options)):
        with torch.no_grad():
            out = load_elmo(str(path), options=opts and str(opts))(ids, boundaries=True)["activations"][2]
        assert torch.allclose(out, expected, atol=ATOL), path


def test_convert_and_export_round_trips_are_bit_exact(tmp_path, tiny_lm):
    """Catches a conversion that is not the inverse of the other direction: a transposed kernel, the TF gate
    order not restored, the forget gate's +1.0 folded twice or lost, the padding row of the character
    embedding kept, a clip value that is not remembered. (1) published file -> convert -> export gives the
    same datasets, bit for bit, and the same options; (2) a biLM trained here -> export -> convert computes
    what it computed, and exporting that again gives identical files."""
    import h5py
    from dataclasses import asdict
    from elmo_pytorch.published import convert_official, export_official
    options, weights = published_pair(tmp_path / "published")
    ckpt = convert_official(str(options), str(weights))
    atomic_save(ckpt, tmp_path / "converted.pt")
    converted = load_checkpoint(str(tmp_path / "converted.pt"), "bilm")           # weights_only=True inside
    assert converted["config"]["cell_clip"] == 3.0 and converted["config"]["proj_clip"] == 3.0
    back = load_elmo(str(tmp_path / "converted.pt"))
    export_official(asdict(back.config), back.state_dict(), str(tmp_path / "back"))

    def datasets(path):
        with h5py.File(path, "r") as h5:
            out = {}
            h5.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset)
                          else None)
            return out
    original, back = datasets(weights), datasets(tmp_path / "back" / "weights.hdf5")
    assert original.keys() == back.keys()
    for name in original:
        assert original[name].dtype == back[name].dtype == np.float32, name
        assert np.array_equal(original[name], back[name]), name
    assert json.loads((tmp_path / "back" / "options.json").read_text()) == json.loads(options.read_text())

    ours = load_elmo(str(tiny_lm))
    export_official(asdict(ours.config), ours.state_dict(), str(tmp_path / "ours"))
    again = load_elmo(str(tmp_path / "ours" / "weights.hdf5"), options=str(tmp_path / "ours" / "options.json"))
    ids = batch_to_ids(SENTENCES)
    with torch.no_grad():
        for a, b in zip(ours(ids)["activations"], again(ids)["activations"]):
            assert torch.allclose(a, b, atol=1e-6)
    export_official(asdict(again.config), again.state_dict(), str(tmp_path / "ours2"))
    first, second = datasets(tmp_path / "ours" / "weights.hdf5"), datasets(tmp_path / "ours2" / "weights.hdf5")
    assert all(np.array_equal(first[n], second[n]) for n in first)


def test_embed_file_writes_allennlp_layout_and_continues_after_interruption(tmp_path, official, monkeypatch):
    """Catches an `embed` file code written for AllenNLP's command cannot read (dataset names, shapes,
    dtype, the sentence_to_index map), vectors that differ from the model's own (length-sorted batching
    mixing sentences up), an empty line that shifts the indices, a half file under the final name, and a
    rerun that starts over instead of continuing."""
    import h5py
    from elmo_pytorch import tools
    lines = ["the cat sat on the mat .", "", "a", "naïve café !", "the dog ran after the cat"] * 3
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    sentences = [line.split() for line in lines]
    L, width = official.config.n_layers + 1, 2 * official.config.projection_dim
    for layers in ("all", "top", "average"):
        out = tmp_path / f"{layers}.hdf5"
        assert tools.embed_file(official, str(tmp_path / "in.txt"), str(out), layers, batch_size=4,
                               log=lambda m: None) == len(lines)
        with h5py.File(out, "r") as h5:
            assert set(h5.keys()) == {str(i) for i in range(len(lines))} | {"sentence_to_index"}
            index = json.loads(h5["sentence_to_index"][0])
            assert index["naïve café !"] == "13" and index[""] == "11"         # the last occurrence, as AllenNLP
            for i, tokens in enumerate(sentences):
                v = h5[str(i)]
                assert v.dtype == np.float32
                assert v.shape == ((L, len(tokens), width) if layers == "all" else (len(tokens), width))
                if tokens:
                    with torch.no_grad():
                        alone = torch.stack(official(batch_to_ids([tokens]))["activations"])[:, 0]  # (L, n, 2P)
                    expected = {"all": alone, "top": alone[-1], "average": alone.mean(0)}[layers]
                    assert np.allclose(v[...], expected.numpy(), atol=1e-5), (layers, i)
    # interrupted after the first batch: no final file; the rerun computes only the rest
    real = tools.embed_by_length

    def interrupted(bilm, sentences, batch_size, progress=None):
        for n, item in enumerate(real(bilm, sentences, batch_size, progress)):
            if n == 7:
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(tools, "embed_by_length", interrupted)
    out = tmp_path / "resumed.hdf5"
    with pytest.raises(KeyboardInterrupt):
        tools.embed_file(official, str(tmp_path / "in.txt"), str(out), "all", batch_size=4, job={"a": 1})
    assert not out.exists() and (tmp_path / "resumed.hdf5.partial").exists()
    seen = []

    def counting(bilm, sentences, batch_size, progress=None):
        seen.extend(sentences)
        yield from real(bilm, sentences, batch_size, progress)
    monkeypatch.setattr(tools, "embed_by_length", counting)
    tools.embed_file(official, str(tmp_path / "in.txt"), str(out), "all", batch_size=4, job={"a": 1},
                    log=lambda m: None)
    assert 0 < len(seen) < len(lines)
    with h5py.File(out, "r") as h5, h5py.File(tmp_path / "all.hdf5", "r") as clean:
        assert all(np.allclose(h5[k][...], clean[k][...], atol=1e-6) for k in clean if k != "sentence_to_index")
    assert not (tmp_path / "resumed.hdf5.partial").exists()


def test_neighbors_context_free_layer_cannot_tell_uses_apart(official):
    """Catches a neighbours table that compares the wrong vectors: at layer 0 (the character CNN, no
    context) every occurrence of a word has the same vector, so all its neighbours have cosine 1; at the
    top layer the context separates them. Occurrences in the same sentence are never each other's
    neighbours."""
    from elmo_pytorch.tools import nearest_occurrences, nearest_words
    sentences = [s.split() for s in ["we play chess", "they play in the park", "a play by shakespeare",
                                     "play it again", "play and play again"]]
    occurrences, top = nearest_occurrences(official, sentences, "play", layer=-1, k=3)
    assert len(occurrences) == 6
    _, flat = nearest_occurrences(official, sentences, "play", layer=0, k=3)
    assert all(abs(c - 1.0) < 1e-5 for row in flat for _, c in row)
    assert not all(abs(c - 1.0) < 1e-3 for row in top for _, c in row)
    for o, row in enumerate(top):
        assert [c for _, c in row] == sorted((c for _, c in row), reverse=True)
        assert all(occurrences[j][0] != occurrences[o][0] for j, _ in row)
    words = nearest_words(official, "play", [w for s in sentences for w in s], k=4)
    assert len(words) == 4 and "play" not in [w for w, _ in words]


@pytest.mark.slow
def test_elmo_cli_subcommands_end_to_end(tmp_path):
    """Catches a broken command line: `python elmo.py convert | export | embed | neighbors` run as a user
    would, and the published pair used directly by train_sst.py --elmo."""
    options, weights = published_pair(tmp_path / "pub")
    r = run_script("elmo.py", "convert", "--options", options, "--weights", weights, "--out", tmp_path / "c.pt")
    assert r.returncode == 0 and "clip 3.0/3.0" in r.stdout, r.stderr
    r = run_script("elmo.py", "export", "--elmo", tmp_path / "c.pt", "--out-dir", tmp_path / "exp")
    assert r.returncode == 0 and (tmp_path / "exp" / "weights.hdf5").exists(), r.stderr
    (tmp_path / "s.txt").write_text("we play chess\nthey play in the park\n\na play by shakespeare\n")
    r = run_script("elmo.py", "embed", "--elmo", weights, "--input", tmp_path / "s.txt", "--output",
                   tmp_path / "v.hdf5", "--layers", "top")
    assert r.returncode == 0 and "4 lines" in r.stdout and "embed:" in r.stderr, r.stderr
    r = run_script("elmo.py", "neighbors", "--elmo", tmp_path / "c.pt", "--sentences", tmp_path / "s.txt",
                   "--word", "play", "--k", "2")
    assert r.returncode == 0 and "3 occurrences" in r.stdout and "[play]" in r.stdout, r.stderr
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\na fine film\t1\nawful\t0\n")
    r = run_script("train_sst.py", "--elmo", weights, "--train-file", tmp_path / "sst.tsv", "--dev-file",
                   tmp_path / "sst.tsv", "--max-steps", 2, "--out", tmp_path / "sst.pt")
    assert r.returncode == 0, r.stderr


def bad_published_files(d):
    """(name, argv, words the message must contain) for every way a published pair can be broken."""
    import h5py
    options, weights = published_pair(d / "pub")
    convert = ["elmo.py", "convert", "--out", str(d / "out.pt")]
    (d / "broken.json").write_text('{"lstm": {"dim": 64,, }')
    (d / "nodim.json").write_text(json.dumps({**json.loads(options.read_text()), "lstm": {"projection_dim": 16}}))
    other = json.loads(options.read_text())
    other["lstm"]["projection_dim"] = 8
    (d / "other.json").write_text(json.dumps(other))
    shutil.copy(weights, d / "missing.hdf5")
    with h5py.File(d / "missing.hdf5", "a") as h5:
        del h5["CNN_proj/W_proj"]
    full = weights.read_bytes()
    (d / "truncated.hdf5").write_bytes(full[: len(full) // 3])
    (d / "ok.tsv").write_text("sentence\tlabel\na fine film\t1\nawful\t0\n")
    from elmo_pytorch.published import convert_official
    atomic_save(convert_official(str(options), str(weights)), d / "converted.pt")
    (d / "text.txt").write_text("the cat sat\n" * 30)
    (d / "lonely").mkdir()
    shutil.copy(weights, d / "lonely" / "x_weights.hdf5")
    return [
        ("malformed options JSON", convert + ["--options", str(d / "broken.json"), "--weights", str(weights)],
         ["broken.json", "not valid JSON", "line 1"]),
        ("options missing a key", convert + ["--options", str(d / "nodim.json"), "--weights", str(weights)],
         ["nodim.json", "'lstm.dim'"]),
        ("HDF5 missing a dataset", convert + ["--options", str(options), "--weights", str(d / "missing.hdf5")],
         ["missing.hdf5", "'CNN_proj/W_proj'"]),
        ("truncated HDF5", convert + ["--options", str(options), "--weights", str(d / "truncated.hdf5")],
         ["truncated.hdf5", "not a readable HDF5"]),
        ("options of another model", convert + ["--options", str(d / "other.json"), "--weights", str(weights)],
         ["'CNN_proj/W_proj'", "(28, 16)", "(28, 8)"]),
        ("no options beside the weights", ["elmo.py", "embed", "--elmo", str(d / "lonely" / "x_weights.hdf5"),
                                           "--input", str(d / "nodim.json"), "--output", str(d / "v.hdf5")],
         ["x_options.json", "options.json", "--elmo-options"]),
        ("fine-tuning a converted biLM", ["train_lm.py", "--init-from", str(d / "converted.pt"), "--train-file",
                                          str(d / "text.txt"), "--out", str(d / "ft.pt")], ["no LM softmax"]),
        ("perplexity of a converted biLM", ["train_lm.py", "--eval-only", "--ckpt", str(d / "converted.pt"),
                                            "--valid-file", str(d / "text.txt")], ["no LM softmax"]),
        ("bad file through train_sst.py", ["train_sst.py", "--elmo", str(weights), "--elmo-options",
                                           str(d / "broken.json"), "--train-file", str(d / "ok.tsv"),
                                           "--dev-file", str(d / "ok.tsv")], ["not valid JSON"]),
    ]


def test_bad_published_files_are_one_line_exit_2_and_write_nothing(tmp_path):
    """Catches a traceback (JSONDecodeError, h5py's KeyError or OSError, an IndexError deep in the
    conversion) where a user needs one line naming the file and what is wrong, and outputs left behind."""
    assert_every_row_is_a_user_error(bad_published_files(tmp_path), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# AllenNLP's ELMo API (allennlp_compat.py): the cases of AllenNLP's own tests, on the golden fixture
# ---------------------------------------------------------------------------------------------------------
FIXTURE_OPTIONS, FIXTURE_WEIGHTS = os.path.join(GOLDEN, "options.json"), os.path.join(GOLDEN, "weights.hdf5")


def golden_layers(golden, i):
    """AllenNLP's three layers of golden sentence i without <S>/</S>: (3, n, 2P)."""
    n = int(golden["lengths"][i])
    return np.stack([golden[f"layer_{k}"][i, 1:n + 1] for k in range(3)])


def test_compat_elmo_gives_allennlps_numbers_and_shapes(golden):
    """Catches a compatibility layer that has AllenNLP's names but not its numbers: `Elmo` with fixed
    `scalar_mix_parameters`, with and without `do_layer_norm`, against AllenNLP's `Elmo` outputs; the fixed
    mix training after all (AllenNLP's trainable=False); `keep_sentence_boundaries` dropping them anyway or
    with the wrong mask; input with extra leading dimensions (AllenNLP's 4-D case) giving other numbers."""
    from allennlp_compat import Elmo, batch_to_ids as compat_ids
    sentences = json.loads(str(golden["sentences_json"]))
    ids = compat_ids(sentences)
    assert torch.equal(ids, torch.from_numpy(golden["char_ids"]))
    w = golden["mix_weights"].tolist()
    for layer_norm, key in ((False, "elmo_representation"), (True, "elmo_representation_layer_norm")):
        elmo = Elmo(FIXTURE_OPTIONS, FIXTURE_WEIGHTS, 2, do_layer_norm=layer_norm, dropout=0.0,
                    scalar_mix_parameters=w)
        out = elmo(ids)
        assert set(out) == {"elmo_representations", "mask"} and len(out["elmo_representations"]) == 2
        assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], torch.from_numpy(golden["mask"]))
        for r in out["elmo_representations"]:
            assert np.allclose(r.detach().numpy(), golden[key], atol=ATOL), key
        assert elmo.get_output_dim() == 32 and not [p for p in elmo.parameters() if p.requires_grad]
    kept = Elmo(FIXTURE_OPTIONS, FIXTURE_WEIGHTS, 1, dropout=0.0, keep_sentence_boundaries=True,
                scalar_mix_parameters=w)(ids)
    assert torch.equal(kept["mask"], torch.from_numpy(golden["mask_bos_eos"]))
    assert np.allclose(kept["elmo_representations"][0].detach().numpy(), golden["scalar_mix_bos_eos"], atol=ATOL)
    trainable = Elmo(FIXTURE_OPTIONS, FIXTURE_WEIGHTS, 1, dropout=0.0)
    assert sorted(n for n, p in trainable.named_parameters() if p.requires_grad) == ["mixes.0.gamma",
                                                                                      "mixes.0.weights"]
    four_d = trainable(torch.stack([ids[:6]] * 3, dim=1))                     # (6, 3, T, 50)
    alone = trainable(ids[:6])
    assert four_d["mask"].shape == (6, 3, ids.shape[1]) and four_d["elmo_representations"][0].shape[:3] == (6, 3, 30)
    for k in range(3):
        assert torch.allclose(four_d["elmo_representations"][0][:, k], alone["elmo_representations"][0], atol=1e-6)


def test_compat_elmo_word_inputs_module_and_requires_grad(golden):
    """Catches `vocab_to_cache` + `word_inputs` giving other numbers than the characters (or reading the
    characters where AllenNLP reads the words), an id outside the cached list not falling back to the
    characters, `module=` refusing one of our biLMs or accepting files beside it, and `requires_grad`
    not reaching the biLM (or leaking into it when False), AllenNLP's TestElmoRequiresGrad."""
    from allennlp_compat import ConfigurationError, Elmo, batch_to_ids as compat_ids
    sentences = [["This", "is", "a", "sentence"], ["Here", "'s", "one"], ["Another", "one"]]
    vocab = ["@@PADDING@@", "@@UNKNOWN@@"] + sorted({w for s in sentences for w in s})
    word_ids = torch.tensor([[vocab.index(w) for w in s] + [0] * (4 - len(s)) for s in sentences])
    chars = compat_ids(sentences)
    plain = Elmo(FIXTURE_OPTIONS, FIXTURE_WEIGHTS, 1, dropout=0.0)(chars)["elmo_representations"][0]
    cached = Elmo(FIXTURE_OPTIONS, FIXTURE_WEIGHTS, 1, dropout=0.0, vocab_to_cache=vocab)
    assert torch.allclose(cached(chars, word_ids)["elmo_representations"][0], plain, atol=1e-6)
    # AllenNLP's cached path reads the words and ignores the characters ...
    assert torch.allclose(cached(compat_ids([["x"] * 4] * 3), word_ids)["elmo_representations"][0], plain,
                          atol=1e-6)
    # ... unless an id is outside the cached list: then the characters run
    other = compat_ids([["x"] * 4] * 3)
    out_of_range = cached(other, torch.full((3, 4), len(vocab)))["elmo_representations"][0]
    assert torch.allclose(out_of_range, cached(other)["elmo_representations"][0]) and not torch.allclose(
        out_of_range, plain, atol=1e-3)
    four_d = cached(torch.stack([chars] * 2, 1), torch.stack([word_ids] * 2, 1))["elmo_representations"][0]
    assert torch.allclose(four_d[:, 1], plain, atol=1e-6)
    bilm = load_elmo(FIXTURE_WEIGHTS)
    assert torch.allclose(Elmo(None, None, 1, dropout=0.0, module=bilm)(chars)["elmo_representations"][0],
                          plain, atol=1e-6)
    with pytest.raises(ConfigurationError, match="Don't provide options_file or weight_file"):
        Elmo(FIXTURE_OPTIONS, FIXTURE_WEIGHTS, 1, module=bilm)
    torch.manual_seed(0)
    random_chars = torch.randint(0, 262, (3, 4, 50))
    for requires_grad in (True, False):
        elmo = Elmo(FIXTURE_OPTIONS, FIXTURE_WEIGHTS, 1, requires_grad=requires_grad)
        elmo(random_chars)["elmo_representations"][0].sum().backward()
        grads = [p.grad for p in elmo.bilm.parameters()]
        assert all(g is not None for g in grads) if requires_grad else all(g is None for g in grads)
        assert elmo.mixes[0].weights.grad is not None


def test_compat_embedder_numbers_order_laziness_and_empty_sentences(golden):
    """Catches ElmoEmbedder arrays that differ from AllenNLP's layers, come back in another order than
    the sentences (our batches are sorted inside), read the whole iterable before yielding (AllenNLP's
    `embed_sentences` is lazy), an empty sentence that crashes or gets AllenNLP's hard-coded (3, 0, 1024)
    instead of the model's width, and a batch that holds an empty sentence shifting the others."""
    from allennlp_compat import ElmoEmbedder
    import pathlib
    embedder = ElmoEmbedder(pathlib.Path(FIXTURE_OPTIONS), pathlib.Path(FIXTURE_WEIGHTS))
    sentences = json.loads(str(golden["sentences_json"]))
    consumed = []

    def stream():
        for s in sentences:
            consumed.append(s)
            yield s
    arrays = embedder.embed_sentences(stream(), batch_size=3)
    first = next(arrays)
    assert len(consumed) == 3                                   # one batch read, not the whole input
    arrays = [first, *arrays]
    assert len(arrays) == len(sentences)
    for i, a in enumerate(arrays):
        assert a.dtype == np.float32 and a.shape == (3, len(sentences[i]), 32)
        assert np.allclose(a, golden_layers(golden, i), atol=ATOL), i
    assert np.allclose(embedder.embed_sentence(sentences[4]), golden_layers(golden, 4), atol=ATOL)
    activations, mask = embedder.batch_to_embeddings(sentences[:2])
    assert activations.shape == (2, 3, max(map(len, sentences[:2])), 32) and mask.shape == activations.shape[::2]
    assert embedder.embed_batch([[]])[0].shape == (3, 0, 32)
    mixed = embedder.embed_batch([sentences[0], [], sentences[1]])
    assert [a.shape[1] for a in mixed] == [len(sentences[0]), 0, len(sentences[1])]
    assert np.allclose(mixed[2], golden_layers(golden, 1), atol=ATOL)


def test_compat_embed_file_formats_keys_and_refusals(tmp_path, golden):
    """Catches AllenNLP's embed_file cases (its tests): the three output formats with the wrong shape or
    numbers, sentence keys, `forget_sentences` still writing the index, an open file not accepted (or a
    path not accepted), and a blank line or a repeated sentence key found after part of the file was
    written instead of before anything is."""
    import h5py
    from allennlp_compat import ConfigurationError, ElmoEmbedder
    embedder = ElmoEmbedder(FIXTURE_OPTIONS, FIXTURE_WEIGHTS)
    sentences = json.loads(str(golden["sentences_json"]))[:6]
    (tmp_path / "in.txt").write_text("\n".join(" ".join(s) for s in sentences) + "\n")
    for fmt in ("all", "top", "average"):
        out = tmp_path / f"{fmt}.hdf5"
        with open(tmp_path / "in.txt") as f:
            embedder.embed_file(f, out, output_format=fmt, batch_size=4)
        with h5py.File(out, "r") as h5:
            assert set(h5) == {str(i) for i in range(6)} | {"sentence_to_index"}
            index = json.loads(h5["sentence_to_index"][0])
            assert index == {" ".join(s): str(i) for i, s in enumerate(sentences)}
            for i in range(6):
                want = golden_layers(golden, i)
                want = {"all": want, "top": want[-1], "average": want.mean(0)}[fmt]
                assert h5[str(i)].dtype == np.float32 and np.allclose(h5[str(i)][...], want, atol=ATOL)
    with pytest.raises(ConfigurationError, match="cannot name an HDF5 dataset"):   # the sentence "."
        embedder.embed_file(str(tmp_path / "in.txt"), str(tmp_path / "keys.hdf5"), use_sentence_keys=True)
    keyed = [" ".join(s) for s in sentences if s != ["."]]
    (tmp_path / "keyed.txt").write_text("\n".join(keyed) + "\n")
    embedder.embed_file(str(tmp_path / "keyed.txt"), str(tmp_path / "keys.hdf5"), use_sentence_keys=True)
    with h5py.File(tmp_path / "keys.hdf5", "r") as h5:
        assert set(h5) == set(keyed) and len(keyed) == 5
        assert np.allclose(h5[" ".join(sentences[0])][...], golden_layers(golden, 0), atol=ATOL)
    embedder.embed_file(tmp_path / "in.txt", tmp_path / "forget.hdf5", forget_sentences=True)
    with h5py.File(tmp_path / "forget.hdf5", "r") as h5:
        assert set(h5) == {str(i) for i in range(6)}
    (tmp_path / "dup.txt").write_text("a b\nc\na b\n")
    embedder.embed_file(tmp_path / "dup.txt", tmp_path / "dup.hdf5")            # duplicates: fine by index
    with h5py.File(tmp_path / "dup.hdf5", "r") as h5:
        assert json.loads(h5["sentence_to_index"][0]) == {"a b": "2", "c": "1"}   # the last one, as AllenNLP
    with pytest.raises(ConfigurationError, match="Key already exists"):
        embedder.embed_file(tmp_path / "dup.txt", tmp_path / "dupkeys.hdf5", use_sentence_keys=True)
    (tmp_path / "blank.txt").write_text("a b\n\nc\n   \n")
    with pytest.raises(ConfigurationError, match=r"empty lines at indexes \[1, 3\]"):
        embedder.embed_file(tmp_path / "blank.txt", tmp_path / "blank.hdf5")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("dupkeys", "blank.hdf5", "keys.hdf5.partial"))]


def test_compat_urls_download_once_and_offline_is_one_line(tmp_path, monkeypatch):
    """Catches URLs passed to AllenNLP's API not working (the published defaults are URLs), a download
    repeated on every construction, a half download left under the final name, and an unreachable URL
    giving a traceback instead of one line naming it and what to do. The server is started here, on
    127.0.0.1; nothing reaches the internet."""
    import functools
    import http.server
    import socket
    import threading
    from allennlp_compat import ElmoEmbedder
    monkeypatch.setenv("ELMO_DATA_CACHE", str(tmp_path / "cache"))
    published_pair(tmp_path / "www" / "elmo")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/elmo/elmo_tiny_"
        embedder = ElmoEmbedder(base + "options.json", base + "weights.hdf5")
        assert np.allclose(embedder.embed_sentence(["a", "b"]),
                           ElmoEmbedder(FIXTURE_OPTIONS, FIXTURE_WEIGHTS).embed_sentence(["a", "b"]))
        assert len(requests) == 2
        ElmoEmbedder(base + "options.json", base + "weights.hdf5")
        assert len(requests) == 2                                         # the cached copies, reused
        cached = [f for _, _, files in os.walk(tmp_path / "cache") for f in files]
        assert sorted(cached) == ["elmo_tiny_options.json", "elmo_tiny_weights.hdf5"]
        with pytest.raises(UserError) as e:
            ElmoEmbedder(base + "options.json", base + "missing_weights.hdf5")
    finally:
        server.shutdown()
    message = str(e.value)
    assert "\n" not in message and "missing_weights.hdf5" in message and "local file" in message
    with socket.socket() as s:                                            # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(UserError, match=f"cannot download http://127.0.0.1:{closed}/x_weights.hdf5"):
        ElmoEmbedder(base + "options.json", f"http://127.0.0.1:{closed}/x_weights.hdf5")
    assert not [f for _, _, files in os.walk(tmp_path / "cache") for f in files if f.endswith(".tmp")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_compat_cuda_device_without_a_gpu_is_one_line():
    """Catches `ElmoEmbedder(..., cuda_device=0)` on a machine without a GPU failing deep in torch with a
    traceback about CUDA initialisation, instead of one line saying what to pass."""
    from allennlp_compat import ElmoEmbedder
    with pytest.raises(UserError, match="cuda_device=0: this machine has no CUDA GPUs; pass cuda_device=-1"):
        ElmoEmbedder(FIXTURE_OPTIONS, FIXTURE_WEIGHTS, cuda_device=0)


# ---------------------------------------------------------------------------------------------------------
# ELMoForManyLangs' models and API (elmoformanylangs_compat.py): its own outputs on the folders in testdata/
# ---------------------------------------------------------------------------------------------------------
EFML = os.path.join(GOLDEN, "elmoformanylangs")          # both/ (words + characters), chars/, words/


@pytest.fixture(scope="module")
def efml_golden():
    """What ELMoForManyLangs computed (testdata/make_elmoformanylangs.py --golden): per folder and output
    layer, one array per sentence."""
    g = np.load(os.path.join(GOLDEN, "elmoformanylangs_golden.npz"))
    return {k: g[k] for k in g.files}


def efml_sentences(golden):
    return json.loads(str(golden["sentences_json"]))


def efml_all_layers(bilm, sentences):
    """Our biLM's layers for `sentences` in one batch: one (L+1, n, 2P) array each, as sents2elmo(-2)."""
    with torch.no_grad():
        out = bilm(bilm.lexicon.ids(sentences))
    layers = torch.stack(out["activations"], dim=1)                          # (B, L+1, T, 2P)
    return [layers[i, :, :len(s)].numpy() for i, s in enumerate(sentences)]


def efml_max_diff(ours, golden, kind, layer=-2):
    return max(float(np.abs(a - golden[f"{kind}_layer{layer}_{i}"]).max()) for i, a in enumerate(ours))


@pytest.mark.parametrize("kind", ["both", "chars", "words"])
def test_elmoformanylangs_embedder_gives_its_numbers_for_every_output_layer(efml_golden, kind):
    """Catches a model folder read wrong in any way that changes numbers (dictionaries, the word embedding
    beside the CNN or alone, highway, LSTM weights, boundaries), and an API that differs from
    ELMoForManyLangs' in what sents2elmo returns: every output_layer, the same shapes, float32, input order,
    the same numbers, with clipping biting in the folders' LSTMs."""
    from elmoformanylangs_compat import Embedder
    sentences = efml_sentences(efml_golden)
    embedder = Embedder(os.path.join(EFML, kind))
    for layer in (-1, 0, 1, 2, -2):
        out = embedder.sents2elmo(sentences, output_layer=layer)
        assert isinstance(out, list) and len(out) == len(sentences)
        for i, a in enumerate(out):
            expected = efml_golden[f"{kind}_layer{layer}_{i}"]
            assert a.dtype == np.float32 and a.shape == expected.shape, (layer, i, a.shape, expected.shape)
            np.testing.assert_allclose(a, expected, atol=ATOL, rtol=0)
    assert embedder.bilm.config.cell_clip == embedder.bilm.config.proj_clip == 3.0
    assert embedder.sents2elmo(sentences)[0].shape == (7, 16)                # the default: the average


def test_elmoformanylangs_default_network_is_the_one_it_ships(efml_golden, tmp_path):
    """Catches a wrong fallback for published folders, whose config.json names the network configuration by
    a path of its authors' machines: ELMoForManyLangs then reads its own file of that name, and ours must
    hold the same values; a name that is neither in the folder nor its own is one line naming it."""
    from elmo_pytorch.published import EFML_NETWORK, EFML_NETWORKS, ModelFiles, efml_network
    for name in EFML_NETWORKS:
        shipped = json.loads(str(efml_golden[f"config_{name}"]))
        assert {k: shipped[k] for k in ("encoder", "token_embedder")} == EFML_NETWORK, name
        assert efml_network(ModelFiles(os.path.join(EFML, "both")), f"/users4/conll18st/elmo/{name}") \
            == EFML_NETWORK
    folder = tmp_path / "m"
    shutil.copytree(os.path.join(EFML, "both"), folder)
    (folder / "config.json").write_text(json.dumps({"config_path": "/home/someone/other_network.json"}))
    with pytest.raises(FileNotFoundError, match="other_network.json, which is neither in"):
        load_elmo(str(folder))


def efml_bilm(kind="both"):
    return load_elmo(os.path.join(EFML, kind))


def test_elmoformanylangs_words_start_with_eow_id_as_its_batcher_swaps_them(efml_golden):
    """Catches the word marks taken by their names: ELMoForManyLangs' batcher reads <eow>'s id where a word
    begins and <bow>'s where it ends, and its models learnt that."""
    sentences, bilm = efml_sentences(efml_golden), efml_bilm()
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") < ATOL
    chars = bilm.config.chars
    chars["<bow>"], chars["<eow>"] = chars["<eow>"], chars["<bow>"]        # the names as the file has them
    bilm.lexicon = data.Dictionaries(chars, bilm.config.words)
    bilm.token_encoder.memo = None
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") > 1e-3


def test_elmoformanylangs_padding_character_is_learnt_and_read_by_the_cnn(efml_golden):
    """Catches a padding character embedded as zeros (AllenNLP's id 0) instead of its trained row, and a
    CNN that skips the padded positions of a token: ELMoForManyLangs runs it over all 50; the speed path
    (distinct tokens, trimmed positions) must equal the plain per-token one on this model too."""
    sentences, bilm = efml_sentences(efml_golden), efml_bilm()
    cnn = bilm.token_encoder
    ids = bilm.lexicon.ids(sentences)
    assert cnn.pad_char == bilm.config.chars["<pad>"] + 1 and bool((ids[..., 1:] == cnn.pad_char).any())
    with torch.no_grad():
        torch.testing.assert_close(cnn(ids, unique=True), cnn(ids, unique=False), atol=1e-6, rtol=0)
        cnn.memo = None
        cnn.char_embed.weight[cnn.pad_char].zero_()
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") > 1e-3


def test_elmoformanylangs_dictionary_ids_are_remembered_within_a_bound(efml_golden):
    """Catches the lexicon's memo of token ids growing without bound over a corpus of new words, or failing
    (or answering for another token) when it is full: emptied at the bound, every answer as computed."""
    bilm = efml_bilm()
    fresh = data.Dictionaries(bilm.config.chars, bilm.config.words)
    bounded = data.Dictionaries(bilm.config.chars, bilm.config.words)
    bounded.memo_tokens = 3
    words = [w for s in efml_sentences(efml_golden) for w in s]
    for word in words + words[::-1]:
        assert bounded.token(word) == fresh.token(word), word
        assert len(bounded.memo) <= 3
    assert len(fresh.memo) == len(set(words))


def test_elmoformanylangs_cuts_tokens_to_48_characters_also_for_the_word_lookup(efml_golden):
    """Catches a long token looked up whole in word.dic (where only its first 48 characters are), or cut by
    bytes as AllenNLP cuts: ELMoForManyLangs cuts characters, before both lookups."""
    sentences, bilm = efml_sentences(efml_golden), efml_bilm()
    long_word = sentences[6][0]
    assert len(long_word) > 48 and long_word[:48] in bilm.config.words and len(long_word[:48].encode()) > 48
    ids = bilm.lexicon.token(long_word)
    assert ids[0] == bilm.config.words[long_word[:48]] + 1 and ids[1 + 1 + 48] == bilm.config.chars["<eow>"] + 1
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") < ATOL
    bilm.lexicon.memo[long_word] = [bilm.config.words["<oov>"] + 1] + ids[1:]   # looked up whole: <oov>
    bilm.token_encoder.memo = None
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") > 1e-3


def test_elmoformanylangs_dictionary_space_entry_is_the_ideographic_space(efml_golden):
    """Catches a dictionary read without ELMoForManyLangs' quirk: a line whose token is whitespace loses it
    to the line's stripping, and the id is filed under U+3000; text with U+3000 must find it."""
    sentences, bilm = efml_sentences(efml_golden), efml_bilm()
    raw = open(os.path.join(EFML, "both", "char.dic"), encoding="utf-8").read()
    assert " \t" in raw and "\u3000" not in raw                               # the file holds a plain space
    assert "\u3000" in bilm.config.chars and "\u3000" in bilm.config.words
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") < ATOL
    for table in (bilm.config.chars, bilm.config.words):
        table[" "] = table.pop("\u3000")                                       # read as written
    bilm.lexicon = data.Dictionaries(bilm.config.chars, bilm.config.words)
    bilm.token_encoder.memo = None
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") > 1e-3


def test_elmoformanylangs_sentences_are_wrapped_in_its_own_bos_and_eos(efml_golden):
    """Catches ELMoForManyLangs' models given AllenNLP's <S>/</S> (or none): they read <bos> and <eos> from
    their own dictionaries, stripped again from the output; and a literal "<bos>" in the text is that
    token, as in ELMoForManyLangs."""
    sentences, bilm = efml_sentences(efml_golden), efml_bilm()
    bos, eos = bilm.lexicon.boundaries()
    assert bos.tolist() == bilm.lexicon.token("<bos>") and bos[2] == bilm.config.chars["<bos>"] + 1
    assert "<bos>" in sentences[7]
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") < ATOL
    oov = bilm.lexicon.token("\u2603")                                        # an unknown token's ids
    bilm.lexicon.boundaries = lambda device=None: (torch.tensor(oov), torch.tensor(oov))
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") > 1e-3


def test_elmoformanylangs_layer0_twice_residual_and_no_forget_bias(efml_golden):
    """Catches three details of ELMoForManyLangs' network: layer 0 is the token vector twice; the second
    LSTM layer adds its input (a residual connection); the stored LSTM bias is the whole bias (adding
    TensorFlow's forget-gate 1.0, as for AllenNLP's files, changes the numbers)."""
    sentences = efml_sentences(efml_golden)
    P = efml_bilm().config.projection_dim
    for i in range(len(sentences)):
        layer0 = efml_golden[f"both_layer-2_{i}"][0]
        np.testing.assert_array_equal(layer0[:, :P], layer0[:, P:])
    bilm = efml_bilm()
    bilm.forward_lstm.residual = bilm.backward_lstm.residual = False
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") > 1e-3
    bilm = efml_bilm()
    D = bilm.config.lstm_dim
    with torch.no_grad():
        for stack in (bilm.forward_lstm, bilm.backward_lstm):
            for layer in stack.layers:
                assert not layer.lstm.bias_hh_l0.any()
                layer.lstm.bias_hh_l0[D:2 * D] += 1.0
    assert efml_max_diff(efml_all_layers(bilm, sentences), efml_golden, "both") > 1e-3


@pytest.mark.parametrize("kind", ["both", "words"])
def test_elmoformanylangs_models_run_on_every_lstm_path(efml_golden, kind):
    """Catches a second copy of the network for this format: its models are `elmo.BiLM`s and run on each
    LSTM path, the column cell equal to the reference one on the clipped weights, and, with the clipping
    set to 0, torch's fused nn.LSTM equal to the reference cell too."""
    sentences = efml_sentences(efml_golden)
    bilm = efml_bilm(kind)
    assert type(bilm) is BiLM and bilm.lstm_impl == "columns"
    outputs = {}
    for impl in ("reference", "columns"):
        bilm.impl = impl
        outputs[impl] = efml_all_layers(bilm, sentences)
    for a, b in zip(outputs["reference"], outputs["columns"]):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    for stack in (bilm.forward_lstm, bilm.backward_lstm):
        for layer in stack.layers:
            layer.cell_clip = layer.proj_clip = 0.0
    for impl in ("reference", "fused"):
        bilm.impl = impl
        outputs[impl] = efml_all_layers(bilm, sentences)
    for a, b in zip(outputs["reference"], outputs["fused"]):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_elmoformanylangs_is_stateless_ordered_and_takes_empty_sentences(efml_golden):
    """Catches carried LSTM state (ELMoForManyLangs' second call differs from its first; ours must always
    give the first), vectors that depend on batch_size or the other sentences, output out of input order,
    and a crash on an empty sentence or an empty list (ELMoForManyLangs crashes on both)."""
    from elmoformanylangs_compat import Embedder
    sentences = efml_sentences(efml_golden)
    embedder = Embedder(os.path.join(EFML, "both"), batch_size=3)
    first = embedder.sents2elmo(sentences, output_layer=-2)
    second = embedder.sents2elmo(sentences, output_layer=-2)
    for i, (a, b) in enumerate(zip(first, second)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, efml_golden[f"both_layer-2_{i}"], atol=ATOL, rtol=0)
        assert np.abs(efml_golden[f"both_call2_{i}"] - efml_golden[f"both_layer-2_{i}"]).max() > 1e-3
    alone = embedder.sents2elmo([sentences[4]], output_layer=-2)[0]           # to float rounding: other
    np.testing.assert_allclose(alone, first[4], atol=ATOL, rtol=0)            # batch shapes round otherwise
    backwards = embedder.sents2elmo(sentences[::-1], output_layer=-2)
    for a, b in zip(backwards, first[::-1]):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    out = embedder.sents2elmo([[], ["ok"], []])
    assert [a.shape for a in out] == [(0, 16), (1, 16), (0, 16)] and out[0].dtype == np.float32
    assert embedder.sents2elmo([[]], output_layer=-2)[0].shape == (3, 0, 16)
    assert embedder.sents2elmo([]) == []


def test_elmoformanylangs_folder_as_zip_and_everywhere_a_biLM_goes(tmp_path, efml_golden):
    """Catches a format that only the compat module reads: load_elmo takes the folder and its .zip (the
    NLPL repository's CoNLL 2017 models come zipped, in a folder of their own) with identical outputs;
    the model keeps its dictionaries through a task checkpoint's spec (asdict(config))."""
    import zipfile
    from dataclasses import asdict
    sentences = efml_sentences(efml_golden)
    archive = tmp_path / "142.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for name in os.listdir(os.path.join(EFML, "both")):
            z.write(os.path.join(EFML, "both", name), f"zhs.model/{name}")
    folder, zipped = efml_all_layers(efml_bilm(), sentences), efml_all_layers(load_elmo(str(archive)), sentences)
    for a, b in zip(folder, zipped):
        np.testing.assert_array_equal(a, b)
    bilm = efml_bilm()
    rebuilt = BiLM(ELMoConfig.from_dict(asdict(bilm.config)))
    rebuilt.load_state_dict(bilm.state_dict())
    for a, b in zip(efml_all_layers(rebuilt.eval(), sentences), folder):
        np.testing.assert_array_equal(a, b)


def test_elmoformanylangs_bad_inputs_are_one_clear_error(tmp_path):
    """Catches a traceback from deep inside (torch.load, json, a KeyError in a dictionary) for what a user
    can fix: a missing folder or file, a damaged pickle, impossible sizes, dictionaries that do not fit the
    weights, input that is not a list of token lists, an output_layer or batch_size out of range."""
    from elmoformanylangs_compat import Embedder

    def broken(change):
        folder = tmp_path / f"m{len(os.listdir(tmp_path))}"
        shutil.copytree(os.path.join(EFML, "both"), folder)
        change(folder)
        return str(folder)

    def network(folder, **changes):
        path = folder / "tiny_network.json"
        config = json.loads(path.read_text())
        for section, values in changes.items():
            config[section].update(values)
        path.write_text(json.dumps(config))
    cases = [
        (str(tmp_path / "absent"), FileNotFoundError, "not found"),
        (broken(lambda f: os.remove(f / "encoder.pkl")), FileNotFoundError, "has no encoder.pkl"),
        (broken(lambda f: (f / "encoder.pkl").write_bytes((f / "encoder.pkl").read_bytes()[:5000])),
         ValueError, "encoder.pkl is not a"),
        (broken(lambda f: (f / "config.json").write_text("{not json")), ValueError, "config.json is not valid JSON"),
        (broken(lambda f: network(f, encoder={"dim": 4})), ValueError, "impossible sizes"),
        (broken(lambda f: network(f, encoder={"dim": 32})), ValueError, "encoder.pkl: 'forward_layer_0"),
        (broken(lambda f: network(f, token_embedder={"activation": "tanh"})), ValueError, "relu character CNN"),
        (broken(lambda f: (f / "char.dic").write_text("".join((f / "char.dic").read_text().splitlines(True)[:-2]))),
         ValueError, "does not belong|do not belong|beyond"),
        (broken(lambda f: (f / "word.dic").write_text("<oov>\t0\nthe\t1\n")), ValueError, "lacks <pad>"),
        (broken(lambda f: (f / "word.dic").write_text("<oov>\t0\n<pad>\tone\n")), ValueError, "word.dic:2: expected"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            Embedder(path)
    embedder = Embedder(os.path.join(EFML, "both"))
    for sents, layer, message in [("a sentence", -1, "not str"), (["a", "b"], -1, "sentence 0 is a str"),
                                  ([["a", 3]], -1, "sentence 0, token 1 is a int"), ([["a"]], 3, "output_layer"),
                                  ([["a"]], "top", "output_layer"), (None, -1, "not NoneType")]:
        with pytest.raises(ValueError, match=message):
            embedder.sents2elmo(sents, output_layer=layer)
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(os.path.join(EFML, "both"), batch_size=0)
    r = run_inprocess("elmo.py", "embed", "--elmo", str(tmp_path / "absent"), "--input", __file__, "--output",
                      tmp_path / "v.hdf5")
    assert_user_error(r, "not found", "absent")
    r = run_inprocess("elmo.py", "export", "--elmo", os.path.join(EFML, "both"), "--out-dir", tmp_path / "exported")
    assert_user_error(r, "reads its own dictionaries")
    assert not (tmp_path / "exported").exists()


def test_elmoformanylangs_pickle_that_runs_code_is_refused_unrun(tmp_path):
    """Catches .pkl files loaded with plain pickle: a published folder is a download, and a pickle can run
    code as it loads. One built to write a file must be refused, and the file never written."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    folder = tmp_path / "m"
    shutil.copytree(os.path.join(EFML, "both"), folder)
    with open(folder / "encoder.pkl", "wb") as f:
        pickle.dump({"forward_layer_0.input_linearity.weight": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load .*encoder.pkl: it contains pickled Python objects"):
        load_elmo(str(folder))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_elmoformanylangs_folder_in_embed_and_train_sst(tmp_path, task_files):
    """Catches a format only Python can read: `python elmo.py embed` and `train_sst.py --elmo FOLDER` take
    an ELMoForManyLangs folder, and the task checkpoint predicts again without it."""
    (tmp_path / "in.txt").write_text("中文 天气 好\nthe cat sat\n\n")
    r = run_script("elmo.py", "embed", "--elmo", os.path.join(EFML, "both"), "--input", tmp_path / "in.txt",
                   "--output", tmp_path / "v.hdf5", "--layers", "average")
    assert r.returncode == 0, r.stderr
    import h5py
    from elmoformanylangs_compat import Embedder
    expected = Embedder(os.path.join(EFML, "both")).sents2elmo([["中文", "天气", "好"], ["the", "cat", "sat"], []])
    with h5py.File(tmp_path / "v.hdf5", "r") as h5:
        for i in range(3):
            np.testing.assert_allclose(h5[str(i)][...], expected[i], atol=1e-6, rtol=0)
    r = run_script("train_sst.py", "--elmo", os.path.join(EFML, "both"), "--train-file", task_files / "sst.tsv",
                   "--dev-file", task_files / "sst.tsv", "--max-steps", 5, "--out", tmp_path / "sst.pt",
                   "--threads", 1)
    assert r.returncode == 0, r.stderr
    r = run_script("train_sst.py", "--ckpt", tmp_path / "sst.pt", "--predict", "the film was good")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


# ---------------------------------------------------------------------------------------------------------
# The NLPL repository's models and simple_elmo's API (simple_elmo_compat.py): its own outputs on testdata/nlpl
# ---------------------------------------------------------------------------------------------------------
NLPL = os.path.join(GOLDEN, "nlpl")


@pytest.fixture(scope="module")
def nlpl_golden():
    """What simple_elmo computed on testdata/nlpl (testdata/make_nlpl.py --golden)."""
    g = np.load(os.path.join(GOLDEN, "nlpl_golden.npz"))
    return {k: g[k] for k in g.files}


def nlpl_zip(folder, path):
    """The folder as the repository ships it: one .zip, the files at its top."""
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(os.listdir(folder)):
            z.write(os.path.join(folder, name), name)
    return str(path)


def nlpl_model(path=NLPL, **kwargs):
    from simple_elmo_compat import ElmoModel
    model = ElmoModel()
    assert model.load(path, **kwargs) == "The model is now loaded."
    return model


@pytest.mark.parametrize("layers", ["average", "top", "all"])
def test_simple_elmo_vectors_are_its_numbers_for_every_layers_value(nlpl_golden, tmp_path, layers):
    """Catches the NLPL layout read wrong (options, weights, the first *.hdf5), an API that differs from
    simple_elmo's in what get_elmo_vectors returns (float64, (texts, longest, D) or (texts, layers,
    longest, D), input order), and numbers that differ from simple_elmo's on a fresh model, every text in
    one batch; and a zip that does not read as its folder does."""
    texts = json.loads(str(nlpl_golden["texts_json"]))
    expected = nlpl_golden[f"vectors_{layers}"]
    for path in (NLPL, nlpl_zip(NLPL, tmp_path / "223.zip")):
        vectors = nlpl_model(path).get_elmo_vectors(texts, layers=layers)
        assert vectors.dtype == np.float64 and vectors.shape == expected.shape
        for i, text in enumerate(texts):
            np.testing.assert_allclose(vectors[i, ..., :len(text), :], expected[i, ..., :len(text), :], atol=ATOL,
                                       rtol=0)
            assert not vectors[i, ..., len(text):, :].any()        # zeros after a text, in every layer
    if layers != "top":     # simple_elmo: the character CNN's vector of an empty token there (documented)
        assert max(np.abs(expected[i, ..., len(t):, :]).max(initial=0) for i, t in enumerate(texts)) > 0.01


@pytest.mark.parametrize("layers", ["average", "top", "all"])
def test_simple_elmo_average_is_each_texts_own_mean(nlpl_golden, layers):
    """Catches an average that counts the padding of shorter texts or depends on the other texts of its
    batch, and a vector not scaled to length 1: on texts of one length it is simple_elmo's (for "all",
    simple_elmo's reshape without a transpose mixes positions and layers: its numbers are that reshape of
    ours, ours each layer's own mean); on texts of several lengths each text's is its average alone."""
    equal, texts = json.loads(str(nlpl_golden["equal_json"])), json.loads(str(nlpl_golden["texts_json"]))
    model = nlpl_model()
    average = model.get_elmo_vector_average(equal, layers=layers)
    assert average.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(average.reshape(len(equal), -1), axis=1), 1.0, atol=1e-6)
    if layers != "all":
        np.testing.assert_allclose(average, nlpl_golden[f"average_equal_{layers}"], atol=ATOL, rtol=0)
    else:
        v = model.get_elmo_vectors(equal, layers="all")                     # (texts, L+1, T, D)
        np.testing.assert_allclose(average, v.mean(axis=2) / np.linalg.norm(
            v.mean(axis=2).reshape(len(equal), -1), axis=1)[:, None, None], atol=1e-6, rtol=0)
        theirs = v.reshape(len(equal), v.shape[2], v.shape[1], -1).mean(axis=1)
        theirs /= np.linalg.norm(theirs.reshape(len(equal), -1), axis=1)[:, None, None]
        np.testing.assert_allclose(theirs, nlpl_golden["average_equal_all"], atol=ATOL, rtol=0)
    mixed = model.get_elmo_vector_average(texts, layers=layers)
    alone = np.stack([model.get_elmo_vector_average([t], layers=layers)[0] for t in texts])
    np.testing.assert_allclose(mixed, alone, atol=ATOL, rtol=0)
    if layers == "average":                         # simple_elmo's adds the empty token's vector at padding
        assert np.abs(mixed - nlpl_golden["average_mixed_average"]).max() > 1e-3
    elif layers == "top":                           # zeros there: dividing by the longest text's length only
        np.testing.assert_allclose(mixed, nlpl_golden["average_mixed_top"], atol=ATOL, rtol=0)   # rescales


def test_simple_elmo_is_stateless_and_batch_size_changes_nothing(nlpl_golden):
    """Catches carried LSTM state: simple_elmo's vectors change with max_batch_size (state carried from
    batch to batch) and with warm-up (the first batch run twice); ours are its fresh one-batch numbers for
    any max_batch_size, with or without warmup, on every call. An empty text gives zeros."""
    texts = json.loads(str(nlpl_golden["texts_json"]))
    for other in ("vectors_average_batches_of_2", "vectors_average_warmup"):
        assert np.abs(nlpl_golden[other] - nlpl_golden["vectors_average"]).max() > 1e-2
    one = nlpl_model(max_batch_size=64).get_elmo_vectors(texts, warmup=False)
    model = nlpl_model(max_batch_size=2)
    for warmup in (True, False, True):
        np.testing.assert_allclose(model.get_elmo_vectors(texts, warmup=warmup), one, atol=ATOL, rtol=0)
    vectors = model.get_elmo_vectors([["Hei"], [], ["Det", "er", "fint"]])
    assert vectors.shape == (3, 3, 32) and not vectors[1].any()
    assert not model.get_elmo_vector_average([[], ["Hei"]])[0].any()
    assert model.get_elmo_vectors([[]]).shape == (1, 0, 32)


def test_simple_elmo_substitutes_come_from_our_checkpoints_lm(tiny_lm, tmp_path):
    """Catches substitutes that are not the LM's predictions at each word: the forward candidates at word k
    are what the forward LM gives after words 1..k-1 (their log-probabilities, best first), the backward
    ones after words k+1..n; the log-probability of the word itself, summed over the sentence with </S>'s,
    is the LM's loss (`lm_nll`). Every sentence gets its list, in input order; <S>/</S> never candidates
    with nodelimiters. And the NLPL archives (no softmax) or a TensorFlow checkpoint are one clear error."""
    sentences = ["w3 w4 w5 w6", "w10 w11", "w1 w2 w3 w4 w5 w6 w7"]
    model = nlpl_model(str(tiny_lm), full=True)
    vocab = model.vocab
    out = model.get_elmo_substitutes(sentences, topn=len(vocab) - 3)
    assert [[w["word"] for w in s] for s in out] == [s.split() for s in sentences]
    bilm = model.bilm
    for sentence, words in zip(sentences, out):
        tokens = sentence.split()
        logp_f = logp_b = 0.0
        for k, w in enumerate(words):
            for side in ("forward", "backward"):
                c = w[side]
                assert c["candidate_words"] == [vocab[i] for i in c["candidates"]]
                assert c["logp"] == sorted(c["logp"], reverse=True) and not {"<S>", "</S>", "<pad>"} & set(c["candidate_words"])
            logp_f += w["forward"]["logp"][w["forward"]["candidates"].index(vocab.index(tokens[k]))]
            logp_b += w["backward"]["logp"][w["backward"]["candidates"].index(vocab.index(tokens[k]))]
        targets = torch.tensor([[1] + [vocab.index(t) for t in tokens] + [2]])
        with torch.no_grad():
            nll_f, nll_b, _ = bilm.lm_nll(bilm.lexicon.ids([tokens]), targets)
            no_eos = targets.clone()
            no_eos[0, -1] = no_eos[0, 0] = 0                        # skip the </S> / <S> predictions
            nll_f_words, nll_b_words, _ = bilm.lm_nll(bilm.lexicon.ids([tokens]), no_eos)
        assert abs(-logp_f - float(nll_f_words)) < 1e-3 * len(tokens) and float(nll_f) > float(nll_f_words)
        assert abs(-logp_b - float(nll_b_words)) < 1e-3 * len(tokens)
    top = model.get_elmo_substitutes(sentences[:1], topn=2, nodelimiters=False)[0][0]["forward"]
    assert len(top["candidates"]) == 2 and all(isinstance(v, float) for v in top["logp"])
    with pytest.raises(ValueError, match="full=True needs the language model's softmax"):
        nlpl_model(NLPL, full=True)
    tf = tmp_path / "tf"
    tf.mkdir()
    (tf / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"\n')
    (tf / "model.ckpt-1.index").write_bytes(b"x")
    with pytest.raises(ValueError, match="TensorFlow checkpoint"):
        nlpl_model(str(tf), full=True)
    with pytest.raises(ValueError, match="full=True"):
        nlpl_model().get_elmo_substitutes(sentences)


def test_simple_elmo_bad_inputs_are_one_clear_error(tmp_path, nlpl_golden):
    """Catches a traceback from h5py, zipfile or deep inside for what a user can fix: an empty list, a str
    where a list of tokens goes, non-string tokens, an unknown `layers`, a folder without a weight file, a
    damaged or cut zip, options that do not fit the weights; nothing is written; the command line says it
    in one line. An ELMoForManyLangs archive of the repository loads (simple_elmo cannot read them)."""
    model = nlpl_model()
    for texts, layers, message in [([], "average", "texts is empty"), ("a text", "average", "not str"),
                                   (["a", "b"], "average", "text 0 is a str"), ([["a", 1]], "average", "token 1"),
                                   ([["a"]], "middle", "layers must be one of")]:
        with pytest.raises(ValueError, match=message):
            model.get_elmo_vectors(texts, layers=layers)
    with pytest.raises(ValueError, match="texts is empty"):
        model.get_elmo_vector_average([])

    def folder(change):
        f = tmp_path / f"m{len(os.listdir(tmp_path))}"
        shutil.copytree(NLPL, f)
        change(f)
        return f
    options = json.loads(open(os.path.join(NLPL, "options.json")).read())
    wider = {**options, "lstm": {**options["lstm"], "dim": 128}}
    archive = nlpl_zip(NLPL, tmp_path / "whole.zip")
    cut = tmp_path / "cut.zip"
    cut.write_bytes(open(archive, "rb").read()[:-200])
    damaged = bytearray(open(archive, "rb").read())
    damaged[200:400] = bytes(200)                                  # inside model.hdf5's compressed bytes
    (tmp_path / "damaged.zip").write_bytes(bytes(damaged))
    cases = [(folder(lambda f: os.remove(f / "model.hdf5")), FileNotFoundError, "no weight file"),
             (folder(lambda f: os.rename(f / "model.hdf5", f / "elmo_weights.hdf5")), None, None),
             (folder(lambda f: os.remove(f / "options.json")), FileNotFoundError, "has no options.json"),
             (folder(lambda f: (f / "options.json").write_text(json.dumps(wider))), ValueError, "do not belong"),
             (folder(lambda f: (f / "model.hdf5").write_bytes(b"not hdf5")), ValueError, "not a readable HDF5"),
             (str(cut), ValueError, "not a readable .zip"), (str(tmp_path / "damaged.zip"), ValueError, "cannot be read"),
             (str(tmp_path / "absent.zip"), FileNotFoundError, "not found")]
    before = snapshot(tmp_path)
    for path, error, message in cases:
        if error is None:
            nlpl_model(str(path))                                   # the first *.hdf5, as simple_elmo takes
            continue
        with pytest.raises(error, match=message):
            nlpl_model(str(path))
    assert snapshot(tmp_path) == before
    efml_zip = tmp_path / "efml.zip"
    nlpl_zip(os.path.join(EFML, "both"), efml_zip)
    assert nlpl_model(str(efml_zip)).get_elmo_vectors([["中文", "天气"]]).shape == (1, 2, 16)
    r = run_inprocess("elmo.py", "embed", "--elmo", str(cut), "--input", __file__, "--output", tmp_path / "v.hdf5")
    assert_user_error(r, "not a readable .zip")


@pytest.mark.slow
def test_nlpl_zip_in_embed(tmp_path, nlpl_golden):
    """Catches a zip that only the Python API reads: `python elmo.py embed --elmo X.zip` writes what the
    folder gives."""
    (tmp_path / "in.txt").write_text("Det er en fin dag .\nПривет , мир !\n")
    archive = nlpl_zip(NLPL, tmp_path / "223.zip")
    r = run_script("elmo.py", "embed", "--elmo", archive, "--input", tmp_path / "in.txt", "--output",
                   tmp_path / "v.hdf5", "--layers", "all")
    assert r.returncode == 0, r.stderr
    import h5py
    texts = [["Det", "er", "en", "fin", "dag", "."], ["Привет", ",", "мир", "!"]]
    expected = nlpl_model().get_elmo_vectors(texts, layers="all")
    with h5py.File(tmp_path / "v.hdf5", "r") as h5:
        for i, text in enumerate(texts):
            np.testing.assert_allclose(h5[str(i)][...], expected[i, :, :len(text)], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Installed: pip install ., then the one-line migration from a folder of the user's own
# ---------------------------------------------------------------------------------------------------------
def installed_wheel(tmp_path):
    """Build the wheel from a copy of this clone (no network: the interpreter's own setuptools), install it
    into a fresh virtual environment that sees this interpreter's packages (torch, h5py, numpy) but not this
    folder. Returns (the wheel's file names, the environment's python)."""
    import zipfile
    source = tmp_path / "source"
    shutil.copytree(HERE, source, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "build",
                                                                "*.egg-info", "runs", "*.pt"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("elmo_pytorch-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                        "-q", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return zipfile.ZipFile(wheel).namelist(), python


@pytest.mark.slow
def test_installed_package_migrates_in_one_line_from_a_folder_with_its_own_data_and_tools(tmp_path):
    """Catches a library that works only inside its clone: modules installed under generic top-level names
    (`data`, `tools`, ...), where a user's own `data.py` beside their script is imported instead of ours,
    or a compat module that cannot be imported once installed; and a console command that is not there.
    From a folder whose own data.py, tools.py, runtime.py, elmo.py and published.py raise on import, a
    program with AllenNLP's import line changed embeds with the installed package and gets the golden
    numbers, and `elmo-pytorch embed` writes its file."""
    names, python = installed_wheel(tmp_path)
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"elmo_pytorch", "allennlp_compat.py", "elmoformanylangs_compat.py", "simple_elmo_compat.py"}, top
    assert {"elmo_pytorch/elmo.py", "elmo_pytorch/data.py", "elmo_pytorch/train_lm.py"} <= set(names)
    user = tmp_path / "user"
    user.mkdir()
    for own in ("data", "tools", "runtime", "elmo", "published"):
        (user / f"{own}.py").write_text(f"raise ImportError('the user\'s own {own}.py was imported')\n")
    (user / "seqvec_like.py").write_text(
        "import sys\n"
        "from allennlp_compat import ElmoEmbedder   # was: from allennlp.commands.elmo import ElmoEmbedder\n"
        "import numpy, elmo_pytorch.elmo\n"
        "embedder = ElmoEmbedder(sys.argv[1], sys.argv[2])\n"
        "vectors = embedder.embed_sentence(['The', 'cat', 'sat'])\n"
        "numpy.save(sys.argv[3], vectors)\n"
        "print(elmo_pytorch.elmo.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(python), "seqvec_like.py", FIXTURE_OPTIONS, FIXTURE_WEIGHTS, "out.npy"], cwd=user,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith(str(tmp_path / "venv")), r.stdout           # the installed copy ran
    from allennlp_compat import ElmoEmbedder
    expected = ElmoEmbedder(FIXTURE_OPTIONS, FIXTURE_WEIGHTS).embed_sentence(["The", "cat", "sat"])
    np.testing.assert_array_equal(np.load(user / "out.npy"), expected)
    (user / "in.txt").write_text("The cat sat\nHi\n")
    r = subprocess.run([str(python.parent / "elmo-pytorch"), "embed", "--elmo", FIXTURE_WEIGHTS, "--input",
                        "in.txt", "--output", "v.hdf5"], cwd=user, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and (user / "v.hdf5").exists(), r.stderr[-3000:]
    r = subprocess.run([str(python), "-m", "elmo_pytorch.train_lm", "--help"], cwd=user, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0 and "--preset" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# Data: tokenising, token shards (a corpus tokenised once, on disk, memory-mapped), task files
# ---------------------------------------------------------------------------------------------------------
def test_ptb_tokenizer_cuts_raw_text_the_way_sst_is_cut():
    """Catches a biLM/task tokenisation mismatch: SST says "does n't"; a biLM pretrained on "doesn't" has
    never seen the negation as a token. 'ptb' turns raw text into SST's conventions and leaves text that
    already follows them unchanged; 'regex' keeps contractions whole."""
    raw = 'It\'s a film that doesn\'t work, "can\'t" win... I\'m sure we\'ll see O\'Brien\'s.'
    assert data.tokenize(raw, "ptb") == ["It", "'s", "a", "film", "that", "does", "n't", "work", ",", "``",
                                         "ca", "n't", "''", "win", "...", "I", "'m", "sure", "we", "'ll", "see",
                                         "O'Brien", "'s", "."]
    sst = "it 's a film that does n't work , `` ca n't '' win ... -- -lrb- sic -rrb- ."
    assert data.tokenize(sst, "ptb") == sst.split()
    assert data.tokenize("doesn't it's", "regex") == ["doesn't", "it's"]


def test_token_shard_equals_the_in_memory_corpus_and_is_reused(tmp_path):
    """Catches shard bugs: ids in the wrong order after parallel tokenising, a lost or merged sentence,
    boundaries in the wrong place, a word list out of frequency order, long lines not split, a shard
    rebuilt instead of reused, or reused after its source file changed."""
    lines = [" ".join(s) for s in synthetic_corpus(45_000, seed=2)]        # > 2 x 20k: two processes
    lines[7] = ""                                                           # blank lines are dropped
    lines[9] = " ".join(["long"] * 25)                                      # split at --max-length 10
    f = tmp_path / "text.txt"
    f.write_text("\n".join(lines) + "\n")
    logs = []
    path = data.token_shard({"files": [str(f)]}, str(tmp_path / "cache"), "whitespace", 10, workers=2,
                            log=logs.append)
    assert any("2 processes" in m for m in logs) and any("split 1 sentences" in m for m in logs)
    sentences = [piece for line in lines for piece in data.split_long(line.split(), 10) if piece]
    vocab = data.build_vocab(sentences, 12)                   # a small vocabulary: most words are <unk>
    shard, memory = data.Corpus.open_shard(path, vocab), data.Corpus.from_sentences(sentences, vocab)
    assert data.shard_words(path)[0][:12] == vocab            # the vocabulary is a prefix of the word list
    assert shard.types == memory.types and torch.equal(shard.stream, memory.stream)
    assert torch.equal(shard.lengths, memory.lengths) and shard.n_unk == memory.n_unk > 0
    inputs, targets = shard.batch([8, 9, 10], char_inputs=True)            # line 9, split in 10 + 10 + 5
    assert inputs[0].tolist() == [data.word_to_char_ids("long")] * 10 and inputs[2, 5:].eq(0).all()
    assert targets[0, 1:11].tolist() == [vocab.index("<unk>")] * 10 and targets[0, 11] == 2   # ... </S>
    # reused, not rebuilt; an edited file gets a new shard
    logs.clear()
    assert data.token_shard({"files": [str(f)]}, str(tmp_path / "cache"), "whitespace", 10, log=logs.append) == path
    assert any("reused" in m for m in logs)
    f.write_text("\n".join(lines[:100]) + "\n")
    assert data.token_shard({"files": [str(f)]}, str(tmp_path / "cache"), "whitespace", 10, log=logs.append) != path
    assert len(os.listdir(tmp_path / "cache")) == 2           # no temporary folders left behind


def test_rare_words_keep_their_spelling():
    """Catches a character table built from the softmax vocabulary only: a word outside the LM vocabulary
    must reach the character CNN as its own characters; only its softmax target becomes <unk>."""
    sentences = [["common"] * 5, ["common", "rarissimo"]]
    vocab = data.build_vocab(sentences, 5)                    # SPECIALS + "common"
    corpus = data.Corpus.from_sentences(sentences, vocab)
    inputs, targets = corpus.batch([1], char_inputs=True)
    assert inputs[0, 1].tolist() == data.word_to_char_ids("rarissimo")
    assert targets[0, 2] == vocab.index("<unk>")
    x, y = corpus.window(torch.tensor([7]), 2, char_inputs=True)          # <S> common -> rarissimo
    assert x[0, 1].tolist() == data.word_to_char_ids("common") and y[0, 1] == vocab.index("<unk>")
    words = ["common", "naïve", "x" * 60, "<S>", "</S>", "日本語" * 10]
    assert data.char_table(words).tolist() == [data.word_to_char_ids(w) for w in words]


def test_hub_data_takes_the_same_shard_path(tmp_path, monkeypatch):
    """Catches a hub path that differs from the local-file path: a data set with a 'text' column (what
    datasets.load_dataset returns, here made locally, so no network) gives the shard the same text as a
    file gives; one without a 'text' column is a one-line user error."""
    import datasets
    lines = ["the cat sat", "", "a dog ran far"]
    monkeypatch.setattr(data, "hub_dataset", lambda *args: datasets.Dataset.from_dict({"text": lines}))
    source = {"dataset": "someone/corpus", "config": None, "split": "train", "local_flags": "--train-file"}
    hub = data.token_shard(source, str(tmp_path), "whitespace", 100, log=lambda m: None)
    (tmp_path / "same.txt").write_text("\n".join(lines) + "\n")
    local = data.token_shard({"files": [str(tmp_path / "same.txt")]}, str(tmp_path), "whitespace", 100,
                             log=lambda m: None)
    assert data.shard_words(hub) == data.shard_words(local)
    assert (open(os.path.join(hub, "tokens.i32"), "rb").read()
            == open(os.path.join(local, "tokens.i32"), "rb").read())
    monkeypatch.setattr(data, "hub_dataset", lambda *args: datasets.Dataset.from_dict({"body": lines}))
    with pytest.raises(UserError, match="no 'text' column"):
        data.token_shard({**source, "split": "validation"}, str(tmp_path), "whitespace", 100, log=lambda m: None)


def test_maximal_phrases_keeps_each_sentence_once():
    """Catches a task text that repeats sub-phrases (SST-2's training set is every phrase of every tree)."""
    phrases = [["a", "b", "c"], ["b", "c"], ["x"], ["a", "b", "c"], ["c", "d"], ["b"]]
    assert data.maximal_phrases(phrases) == [["a", "b", "c"], ["x"], ["c", "d"]]


TREE = "(3 (2 (2 The) (2 film)) (4 (3 (2 is) (4 great)) (2 -LRB-sort-of-RRB-)))"


def test_tree_reader_root_label_and_subtrees():
    """Catches tree-reader bugs: the root label is the sentence label, every node is a labelled phrase
    (2n - 1 nodes for n leaves in a binary tree), leaves are the tokens in order."""
    root, tokens, subtrees = data.parse_tree(TREE)
    assert root == 3 and tokens == ["The", "film", "is", "great", "-LRB-sort-of-RRB-"]
    assert len(subtrees) == 2 * len(tokens) - 1 and subtrees[0] == (3, tokens)
    assert (3, ["is", "great"]) in subtrees and (2, ["The", "film"]) in subtrees
    assert data.parse_tree("(1 (2 -LRB-) (0 bad))")[1] == ["(", "bad"]
    with pytest.raises(ValueError):
        data.parse_tree("(3 (2 unclosed)")


def test_sst_tree_files_binarise_and_phrases(tmp_path):
    """Catches SST-2-from-trees mistakes (neutral roots must be dropped, 0-1 -> negative, 3-4 -> positive)
    and --phrases that keeps duplicate phrases or the root only."""
    from elmo_pytorch import train_sst
    f = tmp_path / "trees.txt"
    f.write_text(TREE + "\n(2 (2 so) (2 so))\n(0 (1 awful) (0 (2 stuff) (0 .)))\n")
    args = train_sst.parse_args(["--elmo", "none", "--max-length", "100"])
    assert [y for _, y in train_sst.read_examples(str(f), "sst5", args)] == [3, 2, 0]
    assert [y for _, y in train_sst.read_examples(str(f), "sst2", args)] == [1, 0]
    phrases = train_sst.read_examples(str(f), "sst5", args, phrases=True)
    assert len(phrases) == 9 + 2 + 5         # (["so"], 2) occurs twice in the second tree: kept once


def test_mnli_label_mapping():
    """Catches label-order bugs between names and GLUE's integer labels, and unlabeled rows kept."""
    from elmo_pytorch import train_mnli
    assert [train_mnli.parse_label(x) for x in ["entailment", "neutral", "contradiction"]] == [0, 1, 2]
    assert [train_mnli.parse_label(x) for x in ["0", "1", "2", " Neutral "]] == [0, 1, 2, 1]
    assert train_mnli.parse_label("-1") == -1 and train_mnli.parse_label("-") == -1
    assert train_mnli.parse_label("maybe") is None and train_mnli.parse_label("3") is None


# ---------------------------------------------------------------------------------------------------------
# The scripts end to end: train_lm.py, train_sst.py, train_mnli.py
# ---------------------------------------------------------------------------------------------------------
def test_train_lm_end_to_end_then_eval_only(tiny_files, tiny_lm):
    """Catches a broken script path: train -> best/last checkpoints (weights_only) -> --eval-only gives
    the same perplexity as the end of training, and the model learned something."""
    ckpt = torch.load(tiny_lm, weights_only=True)
    assert ckpt["kind"] == "bilm" and ckpt["step"] == 60 and ckpt["vocab"][:4] == data.SPECIALS
    assert os.path.exists(str(tiny_lm).replace(".pt", ".last.pt"))
    metrics = tiny_files / "eval.json"
    r = run_script("train_lm.py", "--eval-only", "--ckpt", tiny_lm, "--valid-file", tiny_files / "valid.txt",
                   "--metrics-json", metrics)
    assert r.returncode == 0, r.stderr
    m, m_train = json.loads(metrics.read_text()), json.loads((tiny_files / "train_metrics.json").read_text())
    assert set(m) >= {"ppl_forward", "ppl_backward", "ppl", "tokens"}
    assert m["context"] == m_train["context"] == ckpt["args"]["context"] == "sentence"   # the default
    assert m["tokens"] == sum(len(s) + 1 for s in synthetic_corpus(50, 1))
    assert math.isclose(m["ppl"], m_train["ppl"], rel_tol=1e-4)
    assert m["ppl_forward"] < 15   # unigram perplexity of this corpus is ~21
    # the same checkpoint evaluated as one stream: the same predictions, counted the same way
    r = run_script("train_lm.py", "--eval-only", "--ckpt", tiny_lm, "--valid-file", tiny_files / "valid.txt",
                   "--context", "stream", "--metrics-json", metrics)
    assert r.returncode == 0, r.stderr
    m_stream = json.loads(metrics.read_text())
    assert m_stream["context"] == "stream" and m_stream["tokens"] == m["tokens"]
    assert m_stream["ppl"] != m["ppl"] and m_stream["ppl_forward"] < 15


def test_hub_offline_fails_fast_naming_local_flags():
    """Catches a hub path that hangs or dies with a traceback when there is no network."""
    r = run_script("train_lm.py", "--preset", "tiny", env={"HF_HUB_OFFLINE": "1"}, timeout=60)
    assert r.returncode == 2
    assert "--train-file" in r.stderr and "Traceback" not in r.stderr


def test_corpus_without_datasets_installed_is_one_line(tmp_path, monkeypatch):
    """Catches an install without the `train` extra (no `datasets`) dying in a traceback when a corpus is
    read, instead of one line naming what to install."""
    (tmp_path / "text.txt").write_text("a corpus never tokenised before\n" * 5)   # no cached shard to reuse
    monkeypatch.setitem(sys.modules, "datasets", None)             # `import datasets` now fails
    r = run_inprocess("train_lm.py", "--preset", "tiny", "--train-file", tmp_path / "text.txt", "--valid-file",
                      tmp_path / "text.txt", "--max-steps", 1, "--out", tmp_path / "lm.pt")
    assert_user_error(r, "needs the `datasets` package", "elmo-pytorch[train]")


def documented_commands(text: str, script: str) -> list:
    """`python SCRIPT ...` commands in `text`, continuation lines (ending in a backslash) joined, comments cut."""
    commands, current = [], None
    for line in text.splitlines():
        s = line.strip()
        if current is None and not s.startswith(f"python {script} "):
            continue
        current = s if current is None else f"{current} {s}"
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        commands.append(current.split(" #")[0].strip())
        current = None
    return commands


def test_documented_commands_parse_and_keep_their_line_breaks():
    """Catches a README or --help command that no longer parses (a renamed or removed flag, a value out of
    range), and a docstring whose `\\` continuation Python swallowed, so --help shows two lines run into
    one."""
    import re
    from elmo_pytorch import bench, probe, train_lm, train_mnli, train_sst
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = "\n".join(re.findall(r"```bash\n(.*?)```", f.read(), re.S))
    checked = 0
    for module in (train_lm, train_sst, train_mnli, bench, probe):
        script = module.__name__.split(".")[-1] + ".py"
        for where, text in (("--help", module.__doc__), ("README", readme)):
            for command in documented_commands(text, script):
                assert not re.search(r"\S {3,}--", command), f"{script} {where}: lines run together: {command}"
                module.parse_args(shlex.split(command)[2:])      # a bad flag exits 2 (SystemExit)
                checked += 1
    assert checked >= 25


@pytest.mark.slow
def test_init_from_fine_tunes_on_task_text_keeping_vocabulary(tmp_path, tiny_lm):
    """Catches domain adaptation (paper 3.4) that silently starts over or rebuilds the vocabulary from the
    task text (the softmax rows would no longer mean the same words), that keeps the old optimizer state
    or step count, or that leaves the weights untouched; and a task text that is every SST phrase instead
    of every sentence once."""
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\nthe cat sat on the mat\t1\nthe cat\t1\n"
                                      "on the mat\t0\na dog ran\t0\nthe cat sat on the mat\t1\n")
    r = run_script("train_sst.py", "--task", "sst2", "--train-file", tmp_path / "sst.tsv", "--dev-file",
                   tmp_path / "sst.tsv", "--write-lm-text", tmp_path / "task.txt")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "task.txt").read_text() == "the cat sat on the mat\na dog ran\n"
    (tmp_path / "task.txt").write_text("the zebra sat on the mat\na dog ran far\n" * 20)
    r = run_script("train_lm.py", "--init-from", tiny_lm, "--train-file", tmp_path / "task.txt", "--max-steps", 3,
                   "--batch-tokens", 200, "--out", tmp_path / "ft.pt", "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert "init from" in r.stdout
    base, ft = torch.load(tiny_lm, weights_only=True), torch.load(tmp_path / "ft.last.pt", weights_only=True)
    assert ft["vocab"] == base["vocab"] and ft["config"] == base["config"]
    assert "zebra" not in ft["vocab"]
    assert ft["step"] == 3 and ft["args"]["init_from"] == str(tiny_lm)
    assert len(ft["optimizer"]["state"]) > 0 and all(int(v["step"]) == 3 for v in ft["optimizer"]["state"].values())
    changed = [k for k in base["model"] if not torch.equal(base["model"][k], ft["model"][k])]
    assert len(changed) > len(base["model"]) // 2, changed
    for k in changed:                               # moved a little from the biLM, not started over
        if base["model"][k].dim() == 2:
            assert (ft["model"][k] - base["model"][k]).norm() < 0.5 * base["model"][k].norm(), k


@pytest.mark.slow
@pytest.mark.parametrize("script,data_file", [("train_sst.py", "sst.tsv"), ("train_mnli.py", "mnli.tsv")])
def test_downstream_end_to_end_and_frozen_bilm(tiny_lm, task_files, tmp_path, script, data_file):
    """Catches a broken downstream path (LM checkpoint -> classifier -> eval-only -> predict) and a biLM
    that changes during downstream training (it must stay bit-identical)."""
    f, out = task_files / data_file, tmp_path / "clf.pt"
    r = run_script(script, "--elmo", tiny_lm, "--train-file", f, "--dev-file", f, "--epochs", 15,
                   "--batch-size", 16, "--lr", 3e-3, "--patience", 0, "--elmo-dropout", 0.1, "--hidden", 32,
                   "--out", out, "--threads", 1, "--log-every", 50, "--metrics-json", tmp_path / "train.json")
    assert r.returncode == 0, r.stderr
    mix = json.loads((tmp_path / "train.json").read_text())["mix"]          # the paper's Figure 2, per task
    assert list(mix) == ["input"] and len(mix["input"]["s"]) == 3 and abs(sum(mix["input"]["s"]) - 1) < 1e-6
    assert "scalar mix at the task model's input" in r.stdout
    clf = torch.load(out, weights_only=True)
    lm = torch.load(tiny_lm, weights_only=True)
    assert clf["bilm"].keys() == {k for k in lm["model"] if not k.startswith("head.")}
    for k, v in clf["bilm"].items():
        assert torch.equal(v, lm["model"][k]), k
    metrics = tmp_path / "m.json"
    r = run_script(script, "--eval-only", "--ckpt", out, "--test-file", f, "--metrics-json", metrics)
    assert r.returncode == 0, r.stderr
    m = json.loads(metrics.read_text())
    assert m["n"] == 120 and m["accuracy"] > 0.5
    if script == "train_mnli.py":
        assert set(m["genres"]) == {"fiction", "travel"}
    text = "the film was great" if script == "train_sst.py" else "the dog runs ||| nobody the dog runs"
    r = run_script(script, "--ckpt", out, "--predict", text)
    assert r.returncode == 0, r.stderr
    probs = [float(x.split("=")[1]) for x in r.stdout.split("\t")[1].split()]
    assert abs(sum(probs) - 1) < 1e-2


@pytest.mark.slow
def test_downstream_resume_equals_uninterrupted(tiny_lm, task_files, tmp_path):
    """Catches downstream resume bugs (optimizer state, position in the epoch's batches, dropout RNG, the
    layer cache rebuilt on resume): 11 steps, then --resume to 16, ends where 16 straight steps end."""
    common = ["--elmo", tiny_lm, "--train-file", task_files / "sst.tsv", "--dev-file", task_files / "sst.tsv",
              "--batch-size", 16, "--patience", 0, "--elmo-dropout", 0.3, "--hidden", 16, "--threads", 1,
              "--seed", 4]
    r = run_script("train_sst.py", *common, "--max-steps", 16, "--out", tmp_path / "full.pt")
    assert r.returncode == 0, r.stderr
    r = run_script("train_sst.py", *common, "--max-steps", 11, "--out", tmp_path / "cut.pt")
    assert r.returncode == 0, r.stderr
    # the final evaluation (step 11) is recorded in the last checkpoint too, so the resumed run knows it
    assert torch.load(tmp_path / "cut.last.pt", weights_only=True)["best"] == \
        torch.load(tmp_path / "cut.pt", weights_only=True)["best"]
    r = run_script("train_sst.py", *common, "--max-steps", 16, "--out", tmp_path / "cut.pt", "--resume")
    assert r.returncode == 0, r.stderr
    assert_resumed_equals_full(tmp_path, 16)


@pytest.mark.parametrize("script", ["train_sst", "train_mnli"])
def test_elmo_at_output_is_a_second_trained_mix_that_reaches_the_logits(tiny_lm, script):
    """Catches --elmo-at output|both whose output mix is not wired in (trains nothing, changes nothing),
    shares the input mix's weights, or is sized wrong; and `input` growing a second mix."""
    import importlib
    module = importlib.import_module("elmo_pytorch." + script)
    bilm = load_elmo(str(tiny_lm))
    bilm.head, bilm.config.vocab_size = None, 0
    spec = {"bilm_config": __import__("dataclasses").asdict(bilm.config), "word_vocab": ["<pad>", "<unk>", "a"],
            "word_dim": 8, "layer_norm": False, "elmo_dropout": 0.0, "labels": ["a", "b", "c"],
            "encoder": "bilstm", "hidden": 8, "pooling": "max", "dropout": 0.0, "cross_attention": True}

    def run(model):
        with torch.no_grad():
            return model(SENTENCES) if script == "train_sst" else model(SENTENCES[:2], SENTENCES[2:])
    for elmo_at, n_mixes in (("input", 1), ("output", 1), ("both", 2)):
        torch.manual_seed(0)
        model = module.build_model({**spec, "elmo_at": elmo_at}, bilm.state_dict()).eval()
        mixes = model.features.elmo.mixes
        assert len(mixes) == n_mixes
        before = run(model)
        out = model(SENTENCES) if script == "train_sst" else model(SENTENCES[:2], SENTENCES[2:])
        out.sum().backward()
        if elmo_at != "input":
            assert mixes[-1].weights.grad is not None and mixes[-1].weights.grad.abs().sum() > 0
            with torch.no_grad():
                mixes[-1].weights.copy_(torch.tensor([5.0, -5.0, 0.0]))
            assert not torch.allclose(run(model), before, atol=1e-6)      # the output mix reaches the logits
        if elmo_at == "both":
            assert mixes[0].weights.grad.abs().sum() > 0 and mixes[0] is not mixes[1]


def test_word_dropout_and_clip_norm_reach_the_model(tmp_path):
    """Catches flags that are parsed and stored but never applied: --word-dropout sets the dropout on the
    word embeddings (older checkpoints, without it, keep using --dropout), and --clip-norm bounds the step
    (with SGD, a 1e-9 gradient norm moves the weights no more than a 1e-12 learning rate does)."""
    from elmo_pytorch import train_sst
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\na fine film\t1\nawful\t0\nnot good\t0\n")
    common = ["--elmo", "none", "--word-dim", "8", "--hidden", "4", "--train-file", str(tmp_path / "sst.tsv"),
              "--dev-file", str(tmp_path / "sst.tsv"), "--optimizer", "sgd", "--max-steps", "2", "--threads", "1"]
    weights = {}
    for name, extra in (("clipped", ["--clip-norm", "1e-9", "--lr", "1.0", "--word-dropout", "0.5"]),
                        ("free", ["--lr", "1.0"]), ("frozen", ["--lr", "1e-12"])):
        train_sst.main(common + extra + ["--out", str(tmp_path / f"{name}.pt")])
        ckpt = torch.load(tmp_path / f"{name}.last.pt", weights_only=True)
        weights[name] = ckpt["model"]["features.embed.weight"]
        if name == "clipped":
            assert ckpt["spec"]["word_dropout"] == 0.5
            assert train_sst.build_model(ckpt["spec"]).features.word_dropout.p == 0.5
            old = {k: v for k, v in ckpt["spec"].items() if k != "word_dropout"}
            assert train_sst.build_model(old).features.word_dropout.p == old["dropout"]
    assert torch.allclose(weights["clipped"], weights["frozen"], atol=1e-7)
    assert not torch.allclose(weights["free"], weights["frozen"], atol=1e-4)


def tiny_bcn(tiny_lm, **spec):
    """A BCN (train_sst.build_model) over the tiny biLM and an 8-d word embedding, no dropout unless asked."""
    from elmo_pytorch import train_sst
    bilm = load_elmo(str(tiny_lm))
    bilm.head, bilm.config.vocab_size = None, 0
    spec = {"bilm_config": __import__("dataclasses").asdict(bilm.config), "word_vocab": ["<pad>", "<unk>", "a"],
            "word_dim": 8, "layer_norm": False, "elmo_dropout": 0.0, "word_dropout": 0.0, "labels": list("01234"),
            "encoder": "bcn", "hidden": 6, "pooling": "max", "dropout": 0.0, **spec}
    torch.manual_seed(0)
    return train_sst.build_model(spec, bilm.state_dict())


@pytest.mark.parametrize("elmo_at", ["input", "both"])
def test_bcn_logits_do_not_depend_on_padding_and_every_stage_trains(tiny_lm, elmo_at):
    """Catches padding leaking into the biattentive classifier (attention over padded keys, min/max/mean or
    self-attentive pooling over padding, an unpacked BiLSTM): a sentence's logits are the same alone and in
    a padded batch; and a stage that is built but not wired in (no gradient reaches it)."""
    model = tiny_bcn(tiny_lm, elmo_at=elmo_at).eval()
    with torch.no_grad():
        batch = model(SENTENCES)                                        # (4, 5), padded to 11 tokens
        alone = torch.cat([model([s]) for s in SENTENCES])
    assert batch.shape == (len(SENTENCES), 5)
    assert torch.allclose(batch, alone, atol=1e-5), (batch - alone).abs().max()
    model.train()
    model(SENTENCES).logsumexp(-1).sum().backward()
    for name in ("pre_encode.0.weight", "encoder.lstm.weight_ih_l0", "integrator.lstm.weight_ih_l0",
                 "attend.weight", "output.0.linear.weight", "output.2.linear.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("elmo_at", ["input", "both"])
def test_bcn_computes_what_allennlps_bcn_computes(tiny_lm, elmo_at):
    """Catches a BCN wired differently from AllenNLP's BiattentiveClassificationNetwork.forward, the
    reference the paper's SST-5 number came from (X - C and X * C swapped, attention over the wrong axis,
    min pooling that lets padding win, a mean over padded positions, ELMo joined before the wrong pooling,
    maxout pieces taken from the wrong axis): the logits equal a transcription of AllenNLP's forward pass
    (its masked_softmax, replace_masked_values and Maxout written out) with the same weights, in eval mode."""
    model = tiny_bcn(tiny_lm, elmo_at=elmo_at).eval()

    def masked_softmax(logits, mask):              # allennlp.nn.util.masked_softmax, memory_efficient=False
        result = torch.softmax(logits * mask, dim=-1) * mask
        return result / (result.sum(dim=-1, keepdim=True) + 1e-13)

    def maxout(layer, x):                           # allennlp.modules.Maxout, one layer
        return layer.linear(x).view(*x.shape[:-1], layer.output_dim, layer.pieces).max(dim=-1)[0]

    with torch.no_grad():
        x, mask, elmo_out = model.features(SENTENCES)
        encoded = model.encoder(model.pre_encode(x), mask)                     # (B, T, 2H)
        m = mask.float()
        attention = masked_softmax(encoded.bmm(encoded.permute(0, 2, 1)), m.unsqueeze(1))
        text = attention.bmm(encoded)
        integrated = model.integrator(torch.cat([encoded, encoded - text, encoded * text], 2), mask)
        if elmo_at == "both":
            integrated = torch.cat([integrated, elmo_out], dim=-1)
        big = torch.finfo(integrated.dtype).max
        max_pool = integrated.masked_fill(~mask.unsqueeze(2), -big).max(1)[0]
        min_pool = integrated.masked_fill(~mask.unsqueeze(2), big).min(1)[0]
        mean_pool = integrated.sum(1) / m.sum(1, keepdim=True)              # padding is 0 after the LSTM
        weights = masked_softmax(model.attend(integrated).squeeze(2), m)
        attentive_pool = weights.unsqueeze(1).bmm(integrated).squeeze(1)
        out = torch.cat([max_pool, min_pool, mean_pool, attentive_pool], 1)
        for layer in model.output:
            out = maxout(layer, out)
        ours = model(SENTENCES)
    assert torch.allclose(ours, out, atol=1e-5), (ours - out).abs().max()


def test_bcn_drops_its_token_features_once_as_allennlp_does(tiny_lm):
    """Catches ELMo dropped twice in BCN (the mix's own dropout 0.5, then BCN's embedding dropout 0.5: a
    quarter of each ELMo feature kept, at four times its size, which stalled BCN for the first 1,000 steps
    of an SST-5 run), and BCN's defaults leaking into the BiLSTM classifier's: in training mode, the first
    layer of BCN sees half of the ELMo and of the word features of real tokens zeroed, not three quarters."""
    from elmo_pytorch import train_sst
    bilstm, bcn = train_sst.parse_args([]), train_sst.parse_args(["--encoder", "bcn"])
    assert (bilstm.elmo_dropout, bilstm.word_dropout, bilstm.clip_norm, bilstm.hidden) == (0.5, 0.2, 0.0, 256)
    assert (bcn.elmo_dropout, bcn.word_dropout, bcn.clip_norm, bcn.hidden) == (0.0, 0.0, 5.0, 300)
    assert train_sst.parse_args(["--encoder", "bcn", "--elmo-dropout", "0.3"]).elmo_dropout == 0.3
    model = tiny_bcn(tiny_lm, elmo_dropout=bcn.elmo_dropout, word_dropout=bcn.word_dropout).train()
    seen = []
    model.pre_encode.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    T = max(len(s) for s in SENTENCES)
    mask = torch.tensor([[t < len(s) for t in range(T)] for s in SENTENCES])      # (B, T) real tokens
    for _ in range(20):
        model(SENTENCES)
    features = torch.stack(seen)[:, mask]                                     # (20, real tokens, F)
    elmo_dim = model.features.elmo.output_dim
    for name, part in (("ELMo", features[..., :elmo_dim]), ("words", features[..., elmo_dim:])):
        zeroed = (part == 0).float().mean().item()
        assert abs(zeroed - 0.5) < 0.05, (name, zeroed)


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_cache_gives_the_same_logits(tiny_lm, tmp_path, where):
    """Catches a layer cache that changes results (wrong sentence, lost boundaries, padding mix-up, rows
    overwritten by a neighbour): logits from cached layers equal logits computed by the biLM, to 1e-5 in
    memory (fp32) and to fp16 precision from the disk file, whose name is gone from the directory."""
    from elmo_pytorch import train_sst
    from elmo_pytorch.downstream import LayerCache
    bilm = load_elmo(str(tiny_lm))
    bilm.head, bilm.config.vocab_size = None, 0
    spec = {"bilm_config": __import__("dataclasses").asdict(bilm.config), "word_vocab": None, "word_dim": 8,
            "layer_norm": True, "elmo_dropout": 0.0, "labels": ["a", "b"], "encoder": "bilstm", "hidden": 8,
            "pooling": "max+mean", "dropout": 0.0}
    torch.manual_seed(0)
    model = train_sst.build_model(spec, bilm.state_dict()).eval()
    with torch.no_grad():
        expected = model(SENTENCES)
        path = str(tmp_path / "layers.f16") if where == "disk" else None
        model.features.cache = LayerCache(model.features.elmo, SENTENCES + SENTENCES[:2], path, batch_tokens=20)
        assert len(model.features.cache) == len(SENTENCES)
        calls = []
        hook = model.features.elmo.bilm.register_forward_hook(lambda *a: calls.append(1))
        cached = model(SENTENCES)
        again = model(list(reversed(SENTENCES)))
        assert not calls                                      # served from the cache, the biLM never ran
        model(SENTENCES[:1] + [["an", "unseen", "sentence"]])
        assert calls                                          # a sentence not cached: computed
        hook.remove()
    tol = 1e-5 if where == "memory" else 2e-2
    assert torch.allclose(cached, expected, atol=tol)
    assert torch.allclose(again, expected.flip(0), atol=tol)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# probe.py: what each layer knows (paper section 5.3)
# ---------------------------------------------------------------------------------------------------------
def test_chunk_f1_counts_chunks_as_conll2000_does():
    """Catches a chunk scorer that counts tags instead of chunks, lets a chunk with one wrong end count,
    ignores a type change inside a run of I- tags, or drops the chunk that an I-X after O opens (the
    CoNLL-2000 evaluation, conlleval, opens one there)."""
    from elmo_pytorch.probe import chunk_f1, chunks
    assert chunks(["B-NP", "I-NP", "O", "B-VP"]) == {(0, 2, "NP"), (3, 4, "VP")}
    assert chunks(["O", "I-NP", "I-NP"]) == {(1, 3, "NP")}                       # I- after O opens a chunk
    assert chunks(["B-NP", "I-VP", "I-VP"]) == {(0, 1, "NP"), (1, 3, "VP")}      # a type change opens one
    assert chunks(["B-NP", "B-NP"]) == {(0, 1, "NP"), (1, 2, "NP")}
    gold = [["B-NP", "I-NP", "O", "B-VP"], ["B-PP", "B-NP", "I-NP"]]
    assert chunk_f1(gold, gold) == 1.0
    assert chunk_f1(gold, [["B-NP", "I-NP", "O", "I-VP"], ["B-PP", "B-NP", "I-NP"]]) == 1.0
    # one end wrong: NP(0,1) instead of NP(0,2): 3 of 4 predicted chunks right, 3 of 4 gold found
    predicted = [["B-NP", "O", "O", "B-VP"], ["B-PP", "B-NP", "I-NP"]]
    assert chunk_f1(gold, predicted) == pytest.approx(2 * (3 / 4) * (3 / 4) / (3 / 4 + 3 / 4))
    # one chunk split in two: 2 of 4 gold found, 2 of 5 predicted correct (conlleval: P 40%, R 50%)
    predicted = [["B-NP", "B-NP", "O", "B-ADJP"], ["B-PP", "B-NP", "I-NP"]]
    assert chunk_f1(gold, predicted) == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert chunk_f1(gold, [["O"] * 4, ["O"] * 3]) == 0.0


def test_nearest_sense_takes_the_nearest_mean_of_the_words_own_senses():
    """Catches a 1-nearest-neighbour sense that compares with single instances instead of each sense's
    mean vector, measures by distance instead of cosine, or picks a sense of another word."""
    from elmo_pytorch.probe import nearest_sense
    train = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1, 2])                                    # senses 0, 1 of word A; 2 of word B
    queries = torch.tensor([[10.0, 1.0], [0.2, 5.0], [-1.0, 0.1]])
    allowed = torch.tensor([[True, True, False], [True, True, False], [True, True, False]])
    assert nearest_sense(train, y, queries, allowed, 3).tolist() == [0, 1, 1]   # the third: not B's sense 2
    assert nearest_sense(train, y, queries, torch.ones(3, 3, dtype=torch.bool), 3).tolist() == [0, 1, 2]
    # the mean decides, not the nearest single instance: sense 1's mean (0.45, 0.55) beats sense 0's lone far one
    train = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.6, 0.4], [0.3, 0.7]])
    assert nearest_sense(train, torch.tensor([0, 0, 1, 1]), torch.tensor([[0.95, 0.05]]),
                         torch.tensor([[True, True]]), 2).tolist() == [1]


def made_up_tags(n, seed):
    """Sentences of words from two classes; each token's tag is the class of the token *before* it: a word
    alone (layer 0) cannot know it, a layer that reads the context can."""
    rng = random.Random(seed)
    words = [f"{c}{i}" for c in "ab" for i in range(5)]
    sentences = [[rng.choice(words) for _ in range(rng.randint(6, 10))] for _ in range(n)]
    positions = [(i, t) for i, s in enumerate(sentences) for t in range(len(s))]
    return {"sentences": sentences, "positions": positions, "words": [sentences[i][t] for i, t in positions],
            "labels": ["start" if t == 0 else sentences[i][t - 1][0] for i, t in positions]}


def test_probe_reads_context_from_the_lstm_layers_and_leaves_the_bilm_untouched():
    """Catches probes fed the wrong layer or position (layer 0 is the context-free character CNN: it must
    not beat the most-frequent-tag baseline on tags that only the previous word decides, while the mix of
    the LSTM layers must), a gradient that reaches the frozen biLM, and probing that changes its weights."""
    import argparse
    from elmo_pytorch.probe import probe_task
    bilm = tiny_model(vocab_size=0)
    before = {k: v.clone() for k, v in bilm.state_dict().items()}
    splits = {"train": made_up_tags(300, 0), "dev": made_up_tags(60, 1)}
    args = argparse.Namespace(lr=1e-2, batch_size=64, epochs=30, patience=3, seed=1)
    metrics = probe_task("pos", Elmo(bilm, 1, dropout=0.0), splits, args, torch.device("cpu"), lambda m: None)
    baseline, layers = metrics["baseline"]["dev"], {k: v["dev"] for k, v in metrics["layers"].items()}
    assert layers["0"] < baseline + 0.1 and max(layers["mix"], layers["2"]) > baseline + 0.2, (layers, baseline)
    assert all(torch.equal(before[k], v) for k, v in bilm.state_dict().items())
    assert all(p.grad is None for p in bilm.parameters())
    assert len(metrics["mix_weights"]) == 3 and abs(sum(metrics["mix_weights"]) - 1) < 1e-6


@pytest.mark.slow
def test_probe_smoke_commands_write_every_tasks_table(tiny_lm, tmp_path):
    """Catches a probe.py command that does not run on its sample files, a metrics JSON without the keys
    the figure reads (layers 0..L, mix, baseline, dev and test), scores outside [0, 1], and word sense
    without its per-word table or the linear probe beside the 1-nearest-neighbour one."""
    for task, sample in (("pos", "sample_pos.txt"), ("chunk", "sample_chunk.txt"), ("wsd", "sample_wsd.tsv")):
        sample = os.path.join(GOLDEN, sample)
        r = run_inprocess("probe.py", "--elmo", tiny_lm, "--task", task, "--train-file", sample, "--dev-file",
                          sample, "--test-file", sample, "--epochs", 3, "--metrics-json", tmp_path / f"{task}.json")
        assert r.returncode == 0, r.stderr
        m = json.loads((tmp_path / f"{task}.json").read_text())
        assert m["task"] == task and set(m["layers"]) == {"0", "1", "2", "mix"} and "scalar mix" in r.stdout
        for scores in [*m["layers"].values(), m["baseline"]]:
            assert set(scores) == {"dev", "test"} and all(0 <= s <= 1 for s in scores.values())
        assert ("per_word" in m and set(m["per_word"]) == {"line", "play"} and set(m["linear"]) == set(m["layers"])) \
            == (task == "wsd")


def test_probe_bad_inputs_are_one_line_exit_2(tmp_path):
    """Catches a traceback (an IndexError on a short line, a ValueError on a position, a KeyError on a
    header) where a user needs one line naming the file, the line and the expected format."""
    d = tmp_path
    (d / "ok.txt").write_text("the\tDT\ncat\tNN\n\n")
    (d / "onecolumn.txt").write_text("the\tDT\ncat\n\n")
    (d / "twofields.txt").write_text("the DT B-NP\ncat NN\n\n")
    (d / "blank.txt").write_text("\n\n\n")
    (d / "empty.txt").write_text("")
    (d / "ok.tsv").write_text("word\tsense\tposition\ttext\nline\tphone\t2\thold the line\n")
    (d / "noposition.tsv").write_text("word\tsense\ttext\nline\tphone\thold the line\n")
    (d / "outside.tsv").write_text("word\tsense\tposition\ttext\nline\tphone\t3\thold the line\n")
    (d / "notanumber.tsv").write_text("word\tsense\tposition\ttext\nline\tphone\tthird\thold the line\n")
    probe = ["probe.py", "--elmo", "random", "--preset", "tiny", "--dev-file", str(d / "ok.txt")]
    wsd = ["probe.py", "--elmo", "random", "--preset", "tiny", "--task", "wsd", "--dev-file", str(d / "ok.tsv")]
    assert_every_row_is_a_user_error([
        ("a missing column", probe + ["--task", "pos", "--train-file", str(d / "onecolumn.txt")],
         ["onecolumn.txt:2", "word<TAB>tag"]),
        ("a chunk line of two fields", probe + ["--task", "chunk", "--train-file", str(d / "twofields.txt")],
         ["twofields.txt:2", "word POS chunk"]),
        ("only blank lines", probe + ["--task", "pos", "--train-file", str(d / "blank.txt")], ["no sentences"]),
        ("an empty file", probe + ["--task", "pos", "--train-file", str(d / "empty.txt")], ["empty (0 bytes)"]),
        ("no position column", wsd + ["--train-file", str(d / "noposition.tsv")], ["noposition.tsv", "position"]),
        ("a position outside its text", wsd + ["--train-file", str(d / "outside.tsv")],
         ["outside.tsv:2", "position 3 is outside its text (3 tokens"]),
        ("a position that is not a number", wsd + ["--train-file", str(d / "notanumber.tsv")], ["whole number"]),
        ("--elmo none", ["probe.py", "--elmo", "none", "--task", "pos", "--train-file", str(d / "ok.txt"),
                         "--dev-file", str(d / "ok.txt")], ["--elmo none has no layers"]),
        ("--epochs 0", probe + ["--task", "pos", "--train-file", str(d / "ok.txt"), "--epochs", "0"], ["--epochs"]),
    ], d)


def test_figures_render_from_the_committed_kind_of_data(tmp_path):
    """Catches a figure command that no longer runs on the files the scripts write (a renamed metrics key:
    "history", "mix", probe.py's "layers"), a figure not written, one grown past the README's size budget, or a traceback from a
    malformed curve file. Skipped without matplotlib, which only figures.py needs."""
    pytest.importorskip("matplotlib", reason="matplotlib is optional: only figures.py uses it")
    from elmo_pytorch import figures
    (tmp_path / "curves").mkdir()
    (tmp_path / "mix").mkdir()
    history = [{"trained_seconds": 60 * m, "ppl_forward": p} for m, p in ((1, 400.0), (2, 250.0), (3, 190.0))]
    (tmp_path / "curves" / "lm.json").write_text(json.dumps({"label": "a biLM", "history": history}))
    (tmp_path / "curves" / "other.csv").write_text("# another program\nlabel,minutes,ppl\nwlm,1.5,300\nwlm,3,200\n")
    (tmp_path / "mix" / "sst2.json").write_text(json.dumps({"mix": {"input": {"s": [0.2, 0.5, 0.3], "gamma": 1.1}}}))
    (tmp_path / "probe").mkdir()
    for model in ("lm", "random"):
        r = run_inprocess("probe.py", "--elmo", "random", "--preset", "tiny", "--task", "pos", "--epochs", 2,
                          "--train-file", os.path.join(GOLDEN, "sample_pos.txt"), "--dev-file",
                          os.path.join(GOLDEN, "sample_pos.txt"), "--metrics-json", tmp_path / "probe" / f"pos_{model}.json")
        assert r.returncode == 0, r.stderr
    figures.main(["--preset", "tiny", "--results", str(tmp_path), "--out", str(tmp_path / "assets")])
    for name in ("model.png", "learning_curves.png", "layer_weights.png", "probes.png"):
        png = (tmp_path / "assets" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and 1_000 < len(png) < 200_000, name
    assert figures.read_curves(str(tmp_path / "curves"))[0] == ("a biLM", [1.0, 2.0, 3.0], [400.0, 250.0, 190.0])
    (tmp_path / "curves" / "bad.csv").write_text("label,minutes,ppl\nwlm, 2 threads,1.5,300\n")   # unquoted comma
    with pytest.raises(UserError, match="bad.csv"):
        figures.read_curves(str(tmp_path / "curves"))
    (tmp_path / "mix" / "sst2.json").unlink()
    with pytest.raises(UserError, match="no learned mixes"):
        figures.layer_weights(str(tmp_path / "mix"), str(tmp_path / "x.png"))

# ---------------------------------------------------------------------------------------------------------
# Robustness: a user error is one line, exit 2 and nothing written; faults lose nothing
# ---------------------------------------------------------------------------------------------------------
def bad_inputs(d, tiny_lm):
    """(name, how to make the bad input, argv, words the message must contain) for every script."""
    d.joinpath("empty.txt").write_text("\n\n  \n")
    d.joinpath("binary.txt").write_bytes(b"hello\n\x00\x01\x02\xff garbage\n")
    d.joinpath("latin1.txt").write_bytes("ok line\ncaf\xe9 au lait\n".encode("latin-1"))
    d.joinpath("notpt.pt").write_text("this is not a checkpoint")
    full = tiny_lm.read_bytes()
    d.joinpath("truncated.pt").write_bytes(full[: len(full) // 2])
    d.joinpath("adir").mkdir(exist_ok=True)
    good = str(d / "good.txt")
    d.joinpath("good.txt").write_text("the cat sat\nthe dog ran\n")
    lm = ["train_lm.py", "--preset", "tiny", "--max-steps", "2", "--out", str(d / "out.pt")]
    ok = str(d / "ok.tsv")
    d.joinpath("ok.tsv").write_text("sentence\tlabel\na fine film\t1\nawful\t0\n")
    d.joinpath("nolabel.tsv").write_text("sentence\tscore\na fine film\t1\n")
    d.joinpath("badlabel.tsv").write_text("sentence\tlabel\na fine film\t1\nawful\t7\n")
    d.joinpath("badnli.tsv").write_text("premise\thypothesis\tlabel\na\tb\tneutral\nc\td\tmaybe\n")
    d.joinpath("nohyp.tsv").write_text("premise\tlabel\na\tneutral\n")
    from elmo_pytorch.runtime import CHECKPOINT_FORMAT
    torch.save({"format": CHECKPOINT_FORMAT, "kind": "sst", "model": {}}, d / "classifier.pt")
    torch.save({"format": "elmo-pytorch/0", "kind": "bilm"}, d / "oldformat.pt")
    sst = ["train_sst.py", "--elmo", str(tiny_lm), "--max-steps", "2", "--out", str(d / "out.pt")]
    nli = ["train_mnli.py", "--elmo", "none", "--max-steps", "2", "--out", str(d / "out.pt")]
    d.joinpath("zero.txt").write_bytes(b"")                                      # 0 bytes
    d.joinpath("finished.pt").write_bytes(b"a finished model")
    d.joinpath("finished.last.pt").write_bytes(b"its last state")
    d.joinpath("vectors.hdf5").write_bytes(b"finished vectors")
    d.joinpath("half.last.pt").write_bytes(b"the state of an interrupted run")
    d.joinpath("exported").mkdir(exist_ok=True)
    d.joinpath("exported", "weights.hdf5").write_bytes(b"an earlier export")
    embed = ["elmo.py", "embed", "--elmo", str(tiny_lm), "--output", str(d / "v.hdf5")]
    neighbors = ["elmo.py", "neighbors", "--elmo", str(tiny_lm), "--word", "the"]
    empty_rows = [
        ("0-byte --train-file", lm + ["--train-file", str(d / "zero.txt")], ["zero.txt", "empty"]),
        ("0-byte --valid-file", lm + ["--train-file", good, "--valid-file", str(d / "zero.txt")],
         ["zero.txt", "empty"]),
        ("0-byte --valid-file, eval-only", ["train_lm.py", "--eval-only", "--ckpt", str(tiny_lm), "--valid-file",
                                             str(d / "zero.txt")], ["zero.txt", "empty"]),
        ("sst: 0-byte --train-file", sst + ["--train-file", str(d / "zero.txt"), "--dev-file", ok],
         ["zero.txt", "empty"]),
        ("mnli: 0-byte --train-file", nli + ["--train-file", str(d / "zero.txt")], ["zero.txt", "empty"]),
        ("embed: 0-byte --input", embed + ["--input", str(d / "zero.txt")], ["zero.txt", "empty"]),
        ("neighbors: 0-byte --sentences", neighbors + ["--sentences", str(d / "zero.txt")], ["zero.txt", "empty"]),
    ]
    finished_rows = [     # a command run again without --resume must not replace what it finished
        ("lm: rerun over a finished --out", lm[:-1] + [str(d / "finished.pt"), "--train-file", good],
         ["finished.pt exists", "--resume", "--overwrite"]),
        ("lm: --init-from onto a finished --out", lm[:-1] + [str(d / "finished.pt"), "--train-file", good,
                                                            "--init-from", str(tiny_lm)],
         ["finished.pt exists", "--overwrite"]),
        ("lm: rerun over an interrupted run", lm[:-1] + [str(d / "half.pt"), "--train-file", good],
         ["half.last.pt exists", "--resume"]),
        ("sst: rerun over a finished --out", sst[:-1] + [str(d / "finished.pt"), "--train-file", ok,
                                                        "--dev-file", ok], ["finished.pt exists", "--resume"]),
        ("mnli: rerun over a finished --out", nli[:-1] + [str(d / "finished.pt"), "--train-file", ok],
         ["finished.pt exists", "--overwrite"]),
        ("sst: --write-lm-text over a file", ["train_sst.py", "--train-file", ok, "--write-lm-text",
                                              str(d / "good.txt")], ["good.txt exists", "--overwrite"]),
        ("convert over a checkpoint", ["elmo.py", "convert", "--options", os.path.join(GOLDEN, "options.json"),
                                       "--weights", os.path.join(GOLDEN, "weights.hdf5"), "--out",
                                       str(d / "finished.pt")], ["finished.pt exists", "--overwrite"]),
        ("export over an export", ["elmo.py", "export", "--elmo", str(tiny_lm), "--out-dir", str(d / "exported")],
         ["weights.hdf5 exists", "--overwrite"]),
        ("embed over finished vectors", ["elmo.py", "embed", "--elmo", str(tiny_lm), "--input", good, "--output",
                                         str(d / "vectors.hdf5")], ["vectors.hdf5 exists", "--overwrite"]),
    ]
    numbers = [(lm + ["--train-file", good], flag, value) for flag, value in (
        ("--batch-tokens", 0), ("--unroll", 1), ("--lr", 0), ("--lr", "nan"), ("--epochs", 0), ("--log-every", 0),
        ("--dropout", 1.5), ("--clip-norm", -1), ("--vocab-size", 2), ("--lstm-dim", 0), ("--max-steps", -1),
        ("--max-minutes", "nan"), ("--threads", -1), ("--eval-every", -1), ("--data-workers", -1),
        ("--max-length", -1), ("--cell-clip", -3), ("--n-layers", 0))]
    numbers += [(sst + ["--train-file", ok, "--dev-file", ok], flag, value) for flag, value in (
        ("--batch-size", 0), ("--hidden", 0), ("--lr", "nan"), ("--dropout", 1), ("--epochs", 0), ("--patience", -1),
        ("--log-every", 0), ("--max-length", 0), ("--word-dim", -1), ("--mix-l2", -1), ("--clip-norm", -1),
        ("--elmo-dropout", -0.1), ("--max-minutes", "inf"))]
    numbers += [(nli + ["--train-file", ok], flag, value) for flag, value in (("--batch-size", -2), ("--lr", -1))]
    numbers += [(embed + ["--input", good], "--batch-size", 0), (neighbors + ["--sentences", good], "--k", 0),
                (neighbors + ["--sentences", good], "--show", -1), (neighbors + ["--sentences", good], "--max-lines", -5),
                (["bench.py", "--preset", "tiny"], "--repeats", 0), (["bench.py", "--preset", "tiny"], "--warmup", -1)]
    number_rows = [(f"{argv[0]} {flag} {value}", argv + [flag, str(value)], [flag, str(value)])
                   for argv, flag, value in numbers]
    number_rows.append(("--batch-tokens below --unroll", lm + ["--train-file", good, "--batch-tokens", "10"],
                        ["--batch-tokens 10", "--unroll 20"]))
    return empty_rows + finished_rows + number_rows + [
        ("sst: missing label column", sst + ["--train-file", str(d / "nolabel.tsv"), "--dev-file", ok],
         ["nolabel.tsv", "label"]),
        ("sst: label outside the task", sst + ["--train-file", ok, "--dev-file", str(d / "badlabel.tsv")],
         ["badlabel.tsv:3", "'7'"]),
        ("sst: classifier passed as --elmo", ["train_sst.py", "--elmo", str(d / "classifier.pt"),
                                              "--train-file", ok, "--dev-file", ok], ["'sst'", "bilm"]),
        ("sst: LM passed to --eval-only", ["train_sst.py", "--eval-only", "--ckpt", str(tiny_lm), "--test-file",
                                           str(d / "badlabel.tsv")], ["'bilm'", "expected sst"]),
        ("sst: old checkpoint format", ["train_sst.py", "--elmo", str(d / "oldformat.pt"), "--train-file", ok,
                                        "--dev-file", ok], ["format"]),
        ("sst: --elmo missing", ["train_sst.py", "--elmo", str(d / "nope.pt"), "--train-file", ok,
                                 "--dev-file", ok], ["not found"]),
        ("sst: offline hub", sst, ["--train-file"]),
        ("mnli: bad label", nli + ["--train-file", str(d / "badnli.tsv"), "--dev-file", str(d / "badnli.tsv")],
         ["badnli.tsv:3", "'maybe'"]),
        ("mnli: missing column", nli + ["--train-file", str(d / "nohyp.tsv")], ["hypothesis"]),
        ("mnli: offline hub", nli, ["--train-file"]),
        ("mnli: bad --predict", ["train_mnli.py", "--ckpt", str(d / "classifier.pt"), "--predict", "x"],
         ["'sst'"]),
        ("missing file", lm + ["--train-file", str(d / "nope.txt")], ["not found", "nope.txt"]),
        ("directory", lm + ["--train-file", str(d / "adir")], ["directory"]),
        ("empty corpus", lm + ["--train-file", str(d / "empty.txt")], ["no usable text"]),
        ("binary file", lm + ["--train-file", str(d / "binary.txt")], ["binary.txt:2", "not a text file"]),
        ("not utf-8", lm + ["--train-file", str(d / "latin1.txt")], ["latin1.txt:2", "--encoding",
                                                                       "--skip-bad-lines"]),
        ("unknown flag", lm + ["--train-file", good, "--max-stepz", "3"], ["--max-stepz"]),
        ("negative budget", lm + ["--train-file", good, "--max-minutes", "-1"], ["--max-minutes", "-1"]),
        ("stream window of one token", lm + ["--train-file", good, "--unroll", "1"], ["--unroll"]),
        ("text shorter than two windows", lm + ["--train-file", good, "--context", "stream"],
         ["shorter than 2 x --unroll 20"]),
        ("resume without checkpoint", lm + ["--train-file", good, "--resume"], ["--resume", "out.last.pt"]),
        ("cuda without cuda", lm + ["--train-file", good, "--device", "cuda"], ["available: cpu"]),
        ("offline hub", lm, ["--train-file"]),
        ("ckpt not a pytorch file", ["train_lm.py", "--eval-only", "--ckpt", str(d / "notpt.pt"),
                                     "--valid-file", good], ["notpt.pt", "not a readable"]),
        ("ckpt truncated", ["train_lm.py", "--eval-only", "--ckpt", str(d / "truncated.pt"),
                            "--valid-file", good], ["truncated.pt"]),
        ("ckpt missing", ["train_lm.py", "--eval-only", "--ckpt", str(d / "none.pt"), "--valid-file", good],
         ["not found"]),
        ("eval-only without data", ["train_lm.py", "--eval-only", "--ckpt", str(tiny_lm)], ["--valid-file"]),
    ]


def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, tiny_lm):
    """Catches tracebacks, wrong exit codes, silent acceptance of bad input (0-byte files, numbers out of
    range or NaN, a message about another flag than the one typed), a rerun that replaces a finished
    result, and half-written outputs, for every bad input of the table (in-process, through the scripts'
    own run_main: the exit status and stderr a user sees)."""
    rows = [row for row in bad_inputs(tmp_path, tiny_lm)
            if not (row[0] == "cuda without cuda" and torch.cuda.is_available())]
    assert_every_row_is_a_user_error(rows, tmp_path)


@pytest.mark.slow
def test_user_errors_from_the_command_line_are_one_line_exit_2(tmp_path, tiny_lm):
    """Catches what only a real process shows: an import-time traceback, the exit status as the shell sees
    it, a message on stdout instead of stderr. A few rows of the table, each a real `python SCRIPT`."""
    wanted = ("missing file", "unknown flag", "0-byte --train-file", "sst: rerun over a finished --out",
              "embed: 0-byte --input", "mnli: bad label")
    rows = [row for row in bad_inputs(tmp_path, tiny_lm) if row[0] in wanted]
    assert len(rows) == len(wanted)
    assert_every_row_is_a_user_error(rows, tmp_path, run=run_script)


def test_skip_bad_lines_counts_and_continues(tmp_path):
    """Catches --skip-bad-lines that fails anyway or skips silently."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(("the cat sat\n" * 20 + "caf\xe9\n").encode("latin-1"))
    r = run_script("train_lm.py", "--preset", "tiny", "--train-file", bad, "--valid-file", bad,
                   "--skip-bad-lines", "--max-steps", 2, "--out", tmp_path / "o.pt")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 undecodable lines" in r.stdout


def test_long_tokens_and_sentences_are_truncated_not_errors(tmp_path):
    """Catches crashes on very long tokens (cut to 50 characters) and lines (split at --max-length)."""
    f = tmp_path / "long.txt"
    f.write_text(("x" * 500 + " ") * 3 + "\n" + " ".join(["w"] * 250) + "\n")
    r = run_script("train_lm.py", "--preset", "tiny", "--train-file", f, "--valid-file", f, "--max-steps", 2,
                   "--max-length", 100, "--out", tmp_path / "o.pt")
    assert r.returncode == 0, r.stderr
    assert "split 1 sentences longer than --max-length 100" in r.stdout
    assert batch_to_ids([["x" * 500]]).shape == (1, 1, 50)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_checkpoint_runs_no_code(tmp_path):
    """Catches torch.load without weights_only: a crafted checkpoint that would create a file on load
    must be refused with a one-line error, and the file must not exist."""
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "elmo-pytorch/1", "kind": "bilm", "payload": _Evil(str(target))}, evil)
    with pytest.raises(UserError, match="pickled"):
        load_checkpoint(str(evil))
    r = run_script("train_lm.py", "--eval-only", "--ckpt", evil, "--valid-file", evil)
    assert_user_error(r, "refusing")
    assert not target.exists()


@pytest.mark.slow
def test_kill_during_save_leaves_loadable_checkpoint(tmp_path):
    """Catches non-atomic checkpoint writes: SIGKILL at a random instant of a save loop must leave the
    previous checkpoint loadable."""
    path = tmp_path / "ck.pt"
    code = (f"import torch, sys; sys.path.insert(0, {HERE!r}); from elmo_pytorch.runtime import atomic_save\n"
            f"i = 0\nwhile True:\n"
            f"    atomic_save({{'format': 'elmo-pytorch/1', 'kind': 'bilm', 'i': i, "
            f"'w': torch.full((400000,), float(i))}}, {str(path)!r}); i += 1\n")
    for delay in (0.4, 0.7, 1.1):
        p = subprocess.Popen([sys.executable, "-c", code])
        try:
            import time
            time.sleep(delay)
            while not path.exists():
                time.sleep(0.05)
            time.sleep(delay / 3)
        finally:
            p.kill()
            p.wait()
        ckpt = load_checkpoint(str(path), "bilm")
        assert torch.all(ckpt["w"] == float(ckpt["i"]))


def full_disk_after(n_bytes: int):
    """A stand-in for a write that fills the disk: it writes `n_bytes`, then fails as a full disk does."""
    import errno

    def write(*args, **kwargs):
        f = next((a for a in args if hasattr(a, "write")), None)
        if f is not None:
            f.write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def assert_disk_full(r, *needles):
    """One error line, the last thing on stderr (progress lines may come before it), and exit status 4."""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 4, (r.returncode, r.stderr[-2000:])
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in r.stderr and errors == lines[-1:], r.stderr
    assert lines[-1].startswith("error: no space left"), lines[-1]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_full_disk_is_one_line_exit_4_and_keeps_what_was_there(tmp_path, tiny_files, tiny_lm, monkeypatch):
    """Catches an OSError traceback when the disk fills, a half-written checkpoint or shard under its final
    name, a temporary file left behind, and a previous checkpoint damaged by the failed write: training
    (train_lm.py, train_sst.py), `export`, `embed` (whose partial file the same command then continues)
    and a token-shard build each stop with exit status 4 and one line, and what was on disk stays."""
    import h5py
    lm = ["train_lm.py", "--preset", "tiny", "--train-file", tiny_files / "train.txt", "--max-steps", 2,
          "--threads", 1, "--out", tmp_path / "lm" / "lm.pt"]
    sst = ["train_sst.py", "--elmo", "none", "--train-file", tiny_files / "sst.tsv", "--dev-file",
           tiny_files / "sst.tsv", "--max-steps", 2, "--hidden", 8, "--word-dim", 8, "--threads", 1,
           "--out", tmp_path / "sst" / "sst.pt"]
    (tiny_files / "sst.tsv").write_text("sentence\tlabel\n" + "a fine film\t1\nawful stuff\t0\n" * 20)
    for argv in (lm, sst):
        os.makedirs(os.path.dirname(argv[-1]))
        assert run_inprocess(*argv).returncode == 0                   # a finished run: --out and .last.pt
        before = snapshot(os.path.dirname(argv[-1]))
        with monkeypatch.context() as m:
            m.setattr(torch, "save", full_disk_after(1000))
            r = run_inprocess(*argv[:argv.index("--max-steps") + 1], 4, *argv[argv.index("--max-steps") + 2:],
                              "--resume")
        assert_disk_full(r, "intact")
        assert snapshot(os.path.dirname(argv[-1])) == before            # byte for byte; no .tmp left
    # export and embed write HDF5
    with monkeypatch.context() as m:
        m.setattr(h5py.Group, "create_dataset", full_disk_after(0))
        assert_disk_full(run_inprocess("elmo.py", "export", "--elmo", tiny_lm, "--out-dir", tmp_path / "exp"),
                         "weights.hdf5", "nothing in")
        assert not os.listdir(tmp_path / "exp")
    (tmp_path / "in.txt").write_text("the cat sat\n" * 300)
    embed = ["elmo.py", "embed", "--elmo", tiny_lm, "--input", tmp_path / "in.txt", "--output",
             tmp_path / "v.hdf5", "--batch-size", 4]
    real, calls = h5py.Group.create_dataset, []

    def fills_after_100(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) > 100:
            raise OSError(28, "Can't write data (file write failed: errno = 28, error message = 'No space "
                              "left on device')")
        return real(self, name, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(h5py.Group, "create_dataset", fills_after_100)
        assert_disk_full(run_inprocess(*embed), "v.hdf5.partial", "continues")
    assert not (tmp_path / "v.hdf5").exists() and (tmp_path / "v.hdf5.partial").exists()
    r = run_inprocess(*embed)                                          # space again: it continues
    assert r.returncode == 0 and "continuing" in r.stderr, r.stderr
    with h5py.File(tmp_path / "v.hdf5", "r") as h5:
        assert len(h5) == 301
    # a token shard: no half shard under its name, the temporary folder removed, the room it needs said
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        m.setattr(data, "_build_shard", lambda source, out, *a: (open(os.path.join(out, "tokens.i32"), "wb")
                                                                 .write(b"x" * 100), full_disk_after(0)())[1])
        r = run_inprocess(*lm[:-1], tmp_path / "lm" / "other.pt", "--data-cache", cache)
    assert_disk_full(r, "token shard", "needs about")
    assert os.listdir(cache) == []


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_on_a_real_tiny_tmpfs(tmp_path, tiny_files):
    """Catches what a stand-in for the write cannot: torch.save's own error on a really full disk (it
    raises a RuntimeError from its zip writer, the OSError only as its context). A tmpfs with room for two
    checkpoints and a half: the first run writes --out and .last.pt; resumed, it cannot write a third."""
    argv = ["train_lm.py", "--preset", "tiny", "--train-file", tiny_files / "train.txt", "--max-steps", 2,
            "--threads", 1]
    assert run_inprocess(*argv, "--out", tmp_path / "probe.pt").returncode == 0
    size = os.path.getsize(tmp_path / "probe.pt")
    disk = tmp_path / "tmpfs"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.5 * size) // 1024}k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        assert run_inprocess(*argv, "--out", disk / "lm.pt").returncode == 0
        before = snapshot(disk)
        r = run_inprocess(*argv[:5], "--max-steps", 4, "--threads", 1, "--out", disk / "lm.pt", "--resume")
        assert_disk_full(r, "lm.pt", "intact")
        assert snapshot(disk) == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_killed_shard_build_leaves_no_leftovers_for_good(tmp_path):
    """Catches a shard build killed with SIGKILL whose temporary folder (Arrow files the size of the text)
    stays in the cache for good, a leftover reused for a new build, and a live build's folder taken for a
    leftover: the next build removes what the killed one left, builds what a clean build builds, and leaves
    alone a folder whose builder still holds its lock."""
    import time
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    (tmp_path / "big.txt").write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(300_000)))
    cache, clean = tmp_path / "cache", tmp_path / "clean"
    code = (f"import sys; sys.path.insert(0, {HERE!r}); from elmo_pytorch import data\n"
            f"data.token_shard({{'files': [{str(tmp_path / 'big.txt')!r}]}}, {str(cache)!r}, 'whitespace', 100,"
            f" workers=1, log=lambda m: None)")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 120
        while not any(name.endswith(".tmp") and os.path.isdir(cache / name / "arrow")
                      for name in (os.listdir(cache) if cache.exists() else [])):
            assert time.time() < deadline and p.poll() is None, "the build ended before it could be killed"
            time.sleep(0.02)
    finally:
        p.kill()
        p.wait()
    leftovers = [name for name in os.listdir(cache) if name.endswith(".tmp")]
    assert len(leftovers) == 1                                          # what a kill leaves
    live = tempfile_dir = cache / "other.shard.live.tmp"
    tempfile_dir.mkdir()
    lock = data._hold_lock(str(live))                                   # a build still running
    logs = []
    path = data.token_shard({"files": [str(tmp_path / "big.txt")]}, str(cache), "whitespace", 100,
                            log=logs.append)
    assert any("removed" in m and leftovers[0] in m for m in logs)
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(path), live.name])
    lock.close()
    reference = data.token_shard({"files": [str(tmp_path / "big.txt")]}, str(clean), "whitespace", 100,
                                 log=lambda m: None)
    for name in ("tokens.i32", "lengths.i32", "words.tsv"):
        assert (cache / os.path.basename(path) / name).read_bytes() == open(os.path.join(reference, name), "rb").read()


def _wait_for(proc, text, timeout=120):
    import time
    start, seen = time.time(), ""
    while time.time() - start < timeout:
        line = proc.stdout.readline()
        seen += line
        if text in line:
            return seen
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never saw {text!r}:\n{seen}")


def test_last_checkpoint_knows_the_final_best(tiny_files, tmp_path):
    """Catches <out>.last.pt written before the final evaluation: a later --resume would then start from a
    stale best perplexity and could overwrite a better best checkpoint with a worse one. Four steps end
    inside the first epoch, so the final evaluation is the only one."""
    out, metrics = tmp_path / "four.pt", tmp_path / "four.json"
    r = run_script("train_lm.py", "--preset", "tiny", "--train-file", tiny_files / "train.txt",
                   "--valid-file", tiny_files / "valid.txt", "--max-steps", 4, "--batch-tokens", 300,
                   "--threads", 1, "--out", out, "--metrics-json", metrics)
    assert r.returncode == 0, r.stderr
    last = torch.load(tmp_path / "four.last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["step"] == 4
    assert math.isclose(last["best"], json.loads(metrics.read_text())["ppl"], rel_tol=1e-6)
    assert last["best"] == torch.load(out, weights_only=True)["best"]


def assert_resumed_equals_full(tmp_path, steps):
    """The resume tests' verdict: cut.last.pt (stopped, then resumed) holds the parameters of full.last.pt."""
    full = torch.load(tmp_path / "full.last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut.last.pt", weights_only=True)
    assert full["step"] == cut["step"] == steps
    for k, v in full["model"].items():
        assert torch.allclose(v, cut["model"][k], atol=1e-6, rtol=0), k


@pytest.mark.slow
@pytest.mark.parametrize("context", ["stream", "sentence"])
def test_sigint_then_resume_equals_uninterrupted(tiny_files, tmp_path, context):
    """Catches resume bugs (optimizer state, step counter, data position, RNG for dropout, lr schedule,
    and in the stream context the carried LSTM state): a run stopped by SIGINT and resumed ends with the
    same parameters as an uninterrupted run."""
    import signal
    common = ["--preset", "tiny", "--train-file", tiny_files / "train.txt", "--valid-file",
              tiny_files / "valid.txt", "--max-steps", 24, "--batch-tokens", 300, "--threads", 1,
              "--log-every", 1, "--dropout", 0.3, "--seed", 3, "--context", context, "--unroll", 6]
    r = run_script("train_lm.py", *common, "--out", tmp_path / "full.pt")
    assert r.returncode == 0, r.stderr
    argv = [sys.executable, os.path.join(HERE, "train_lm.py"), *map(str, common), "--out", str(tmp_path / "cut.pt")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    _wait_for(proc, "step      9 ")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "--resume" in out
    stopped = torch.load(tmp_path / "cut.last.pt", weights_only=True)["step"]
    assert 9 <= stopped < 24
    r = run_script("train_lm.py", *common, "--out", tmp_path / "cut.pt", "--resume")
    assert r.returncode == 0, r.stderr
    assert_resumed_equals_full(tmp_path, 24)


def test_nan_loss_stops_without_overwriting(tiny_files, tmp_path):
    """Catches a run that writes NaN weights over the last good checkpoint when the loss blows up."""
    r = run_script("train_lm.py", "--preset", "tiny", "--train-file", tiny_files / "train.txt",
                   "--valid-file", tiny_files / "valid.txt", "--optimizer", "sgd", "--lr", 1e12,
                   "--clip-norm", 0, "--batch-tokens", 300, "--eval-every", 1, "--max-steps", 50,
                   "--out", tmp_path / "nan.pt")
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and "at step" in r.stderr and "Last good checkpoint" in r.stderr
    last = tmp_path / "nan.last.pt"
    if last.exists():
        for v in torch.load(last, weights_only=True)["model"].values():
            assert torch.isfinite(v).all()


# ---------------------------------------------------------------------------------------------------------
# Distributed pretraining: torchrun + DistributedDataParallel on the CPU (gloo), and compiling
# ---------------------------------------------------------------------------------------------------------
def torchrun(tmp_path, *args, nproc=2):
    """train_lm.main under `torchrun --nproc_per_node=nproc`, each rank saving the parameters it ended with
    as rank<R>.pt (what no single checkpoint can show: that the ranks agree).

    No retry: a rank that aborts at exit fails the test, as it would fail a user's job."""
    wrapper = tmp_path / "ranks.py"
    wrapper.write_text(f"import os, sys, torch\nsys.path.insert(0, {HERE!r})\nfrom elmo_pytorch import train_lm\n"
                       f"model = train_lm.main(sys.argv[1:])\n"
                       f"torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, "
                       f"'rank' + os.environ['RANK'] + '.pt'))\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", str(wrapper), *map(str, args)], capture_output=True,
                       text=True, timeout=300, cwd=HERE)
    return r


@pytest.mark.slow
@pytest.mark.parametrize("context", ["sentence", "stream"])
def test_torchrun_two_processes_equal_one(tiny_files, tmp_path, context):
    """Catches DDP bugs: ranks that drift apart (gradients not averaged), a rank reading the wrong part of
    the data or the same part as another, a loss normalised per rank instead of per global batch, more
    than one checkpoint or one with a DDP 'module.' prefix. Two processes x the same global batch must
    end where one process ends, to float rounding."""
    common = ["--preset", "tiny", "--train-file", tiny_files / "train.txt", "--valid-file",
              tiny_files / "valid.txt", "--max-steps", 3, "--batch-tokens", 300, "--unroll", 6, "--threads", 1,
              "--dropout", 0, "--context", context]
    r = torchrun(tmp_path, *common, "--out", tmp_path / "two.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' parameters differ"
    assert sorted(p.name for p in tmp_path.glob("two*")) == ["two.last.pt", "two.pt"]
    assert r.stdout.count("eval final") == 1                       # rank 0 alone logs and evaluates
    load_elmo(str(tmp_path / "two.pt"))                            # no DDP prefix: loads as any biLM
    r = run_script("train_lm.py", *common, "--out", tmp_path / "one.pt")
    assert r.returncode == 0, r.stderr
    one = torch.load(tmp_path / "one.pt", weights_only=True)["model"]
    for k, v in one.items():
        assert torch.allclose(v, rank0[k], atol=1e-5, rtol=0), k
    start = BiLM(ELMoConfig.from_dict(torch.load(tmp_path / "one.pt", weights_only=True)["config"]))
    assert not torch.allclose(start.forward_lstm.layers[0].lstm.weight_hh_l0,
                              one["forward_lstm.layers.0.lstm.weight_hh_l0"], atol=1e-5)   # it trained


@pytest.mark.slow
def test_torchrun_resume_equals_uninterrupted(tiny_files, tmp_path):
    """Catches distributed resume bugs: the carried stream state of every rank's rows (gathered into one
    checkpoint, scattered back on resume), each rank's random state, the step count. Two processes, 3
    steps, then --resume to 6, end with the parameters of 6 straight steps."""
    common = ["--preset", "tiny", "--train-file", tiny_files / "train.txt", "--valid-file",
              tiny_files / "valid.txt", "--batch-tokens", 300, "--unroll", 6, "--threads", 1,
              "--dropout", 0.2, "--context", "stream", "--lr-schedule", "constant"]
    for out, steps in (("full.pt", 6), ("cut.pt", 3)):
        r = torchrun(tmp_path, *common, "--max-steps", steps, "--out", tmp_path / out)
        assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "cut.last.pt", weights_only=True)["context_state"]["state"]
    assert state[0][0][0].shape[0] == 300 // 6                     # every row's state, from both ranks
    r = torchrun(tmp_path, *common, "--max-steps", 6, "--out", tmp_path / "cut.pt", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed_equals_full(tmp_path, 6)


@pytest.mark.slow
def test_torchrun_ctrl_c_stops_every_rank_and_resumes(tiny_files, tmp_path):
    """Catches a distributed stop that hangs or loses work: Ctrl-C to torchrun (which passes a signal on to
    its workers) stops both ranks at the same step, rank 0 writes <out>.last.pt, and --resume finishes.
    Also a NaN on the ranks stops all of them (exit status 3 from each, no hang)."""
    import signal
    common = ["--preset", "tiny", "--train-file", tiny_files / "train.txt", "--valid-file",
              tiny_files / "valid.txt", "--batch-tokens", 300, "--threads", 1, "--log-every", 1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(HERE, "train_lm.py"), *map(str, common), "--max-steps", "400", "--out",
            str(tmp_path / "cut.pt")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=HERE)
    _wait_for(proc, "step      5 ")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert "stopped by" in out and "--resume" in out
    stopped = torch.load(tmp_path / "cut.last.pt", weights_only=True)["step"]
    assert 5 <= stopped < 400
    r = torchrun(tmp_path, *common, "--max-steps", stopped + 3, "--out", tmp_path / "cut.pt", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / "cut.last.pt", weights_only=True)["step"] == stopped + 3
    r = torchrun(tmp_path, *common, "--optimizer", "sgd", "--lr", 1e12, "--clip-norm", 0, "--max-steps", 50,
                 "--out", tmp_path / "nan.pt")
    assert r.returncode != 0 and r.stderr.count("error: loss is") == 2     # both ranks, same message


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on the CPU needs "
                    "a C compiler")
def test_compile_trains_like_eager(tiny_files, tmp_path):
    """Catches a --compile that breaks training or the checkpoint (compiled modules renamed in the
    state dict): 3 compiled steps end where 3 eager steps end, and the checkpoint loads as any biLM."""
    common = ["--preset", "tiny", "--train-file", tiny_files / "train.txt", "--valid-file",
              tiny_files / "valid.txt", "--max-steps", 3, "--batch-tokens", 300, "--threads", 1, "--dropout", 0]
    for name, extra in (("eager.pt", []), ("compiled.pt", ["--compile"])):
        r = run_script("train_lm.py", *common, *extra, "--out", tmp_path / name, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    eager, compiled = (torch.load(tmp_path / n, weights_only=True)["model"] for n in ("eager.pt", "compiled.pt"))
    assert eager.keys() == compiled.keys()
    for k in eager:
        assert torch.allclose(eager[k], compiled[k], atol=1e-5, rtol=0), k
    load_elmo(str(tmp_path / "compiled.pt"))
