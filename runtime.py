"""The plumbing every script shares: the argument parser, devices, checkpoints on disk, metrics files, log
and progress lines, one-line errors. Nothing here knows about ELMo; the model and the scripts build on it."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import tempfile
import time

import torch

CHECKPOINT_FORMAT = "elmo-pytorch/1"  # bump when the checkpoint layout changes incompatibly


class UserError(Exception):
    """A problem the user can fix (a bad path, a bad flag, a bad file). Scripts print it as one line and
    exit with status 2; no traceback."""


def setup(args) -> torch.device:
    """The start of every script: --threads (0 = torch's default), then the --device to run on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda > mps > cpu. Asking for a device that is not there is a user error naming those that are."""
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) \
        + (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    if name == "auto":
        return torch.device("cuda" if "cuda" in have else "mps" if "mps" in have else "cpu")
    if name.split(":")[0] not in have:
        raise UserError(f"--device {name} is not available here; available: {', '.join(have)}")
    return torch.device(name)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown or misspelt flags, bad values) are one line and exit 2, and
    whose --help shows the module docstring as written plus every default."""

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):   # append the default, where there is one worth showing
            if action.default not in (None, False, argparse.SUPPRESS) and "default" not in (action.help or ""):
                return (action.help or "") + " (default: %(default)s)"
            return action.help

    def __init__(self, description=None, **kwargs):
        super().__init__(description=description, formatter_class=self.Formatter, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def check_out_dir(path: str, flag: str = "--out"):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} directory does not exist: {folder}")


def last_path(out: str) -> str:
    """Where a script keeps its latest state for --resume: lm.pt -> lm.last.pt."""
    return out[:-3] + ".last.pt" if out.endswith(".pt") else out + ".last.pt"


def write_metrics(path, metrics: dict):
    """--metrics-json: written atomically, like the checkpoints."""
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)
        os.replace(tmp, path)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def abort_nonfinite(what: str, step: int, last: str):
    """A NaN/inf loss or weight: stop with exit status 3, naming the step and the last good checkpoint,
    which is left as it is (the scripts call this *before* writing a checkpoint)."""
    import sys
    good = last if os.path.exists(last) else "none written yet"
    print(f"error: {what} at step {step}; stopping without saving. Last good checkpoint: {good}. "
          f"Try a lower --lr.", file=sys.stderr)
    sys.exit(3)


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class StopSignal:
    """Ctrl-C or SIGTERM during training: the first finishes the current step (the loop checks `.name`),
    writes the last checkpoint and says how to resume; a second stops at once."""

    def __init__(self, log, last: str):
        self.name, self.log, self.last = None, log, last
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.name:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        self.log(f"\n{self.name}: finishing this step, then writing {self.last}")


def run_main(main):
    """Run a script's main(): a UserError becomes one line on stderr and exit status 2."""
    import sys
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: self-describing, tensors and plain containers only, loaded with weights_only=True.
# ---------------------------------------------------------------------------------------------------------
def atomic_save(obj, path: str):
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a crash or a kill
    at any instant leaves either the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: str, kind: str | tuple | None = None) -> dict:
    """Load a checkpoint written by one of our scripts, safely, with one-line errors for every failure:
    missing, not a PyTorch file, truncated, holds pickled code, wrong format version, wrong kind."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"checkpoint path is a directory, expected a .pt file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported" in str(e) or "global" in str(e).lower():
            raise UserError(f"refusing to load {path}: it contains pickled Python objects, which could run "
                            f"code; only tensors and plain containers are accepted") from None
        raise UserError(f"{path} is not a valid checkpoint (corrupt or truncated: {first[:80]})") from None
    except Exception as e:  # noqa: BLE001  (a non-checkpoint file can fail in the zip reader or unpickler)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or another kind "
                        f"of file: {first[:80]})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UserError(f"{path} is a PyTorch file but not one of our checkpoints (no 'format' key)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt['format']!r}; this code reads "
                        f"{CHECKPOINT_FORMAT!r}")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and ckpt.get("kind") not in kinds:
        raise UserError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected {' or '.join(kinds)}"
                        + (" (a biLM from train_lm.py)" if "bilm" in kinds else ""))
    return ckpt


class Progress:
    """A progress line on stderr every few seconds: done / total, rate, ETA."""

    def __init__(self, what: str, total: int, unit: str, every: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done, self.start, self.last = 0, time.time(), 0.0

    def __call__(self, n: int):
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            share = 100 * self.done / max(self.total, 1)
            log_stderr(f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({share:.0f}%)"
                       f" | {rate:,.0f} {self.unit}/s | ETA {fmt_time((self.total - self.done) / max(rate, 1e-9))}")


def log_stdout(msg):
    print(msg, flush=True)


def log_stderr(msg):
    """The commands' progress and notes go to stderr; stdout is for results."""
    import sys
    print(msg, file=sys.stderr, flush=True)
