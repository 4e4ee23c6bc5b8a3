"""The plumbing every script shares: errors and exit statuses, the argument parser, devices, files written
atomically (checkpoints, metrics) and loaded safely, the Ctrl-C/SIGTERM handler, log and progress lines.
Nothing here knows about ELMo; the model and the scripts build on it.

Exit statuses, the same for every script and tool:
    0  done
    2  a user error: a bad flag or value, a missing, empty or malformed file, an --out that exists. One line
       on stderr says what was wrong and what to do; nothing is written.
    3  the loss or the weights stopped being finite: training stops without saving and names the last good
       checkpoint, which it leaves as it is.
    4  the disk filled while writing: the half-written file is removed (an interrupted `embed` keeps its
       .partial file, to continue from), what was there before is intact, and the line says so.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import pickle
import signal
import sys
import tempfile
import time

import torch

CHECKPOINT_FORMAT = "elmo-pytorch/1"  # bump when the checkpoint layout changes incompatibly
EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_DISK_FULL = 2, 3, 4


class UserError(ValueError):
    """A problem the user can fix (a bad path, a bad flag, a bad file). Scripts print it as one line and
    exit with status 2; no traceback. From the Python API it is a ValueError (a missing file: MissingFile,
    also a FileNotFoundError), so that code written for the libraries we stand in for catches it."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder that is not there."""


class DiskFull(Exception):
    """The disk filled while a file was written. Printed as one line; exit status 4."""


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC or EDQUOT, also as libraries report it (h5py puts the errno in the message only)."""
    if not isinstance(e, OSError):
        return False
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e) \
        or "errno = 28" in str(e)


def disk_full(path: str, intact: str, needed: int = 0) -> DiskFull:
    """The one message for a full disk: the file, how much it needed when that is known, what is intact."""
    need = f" (it needs about {needed / 2 ** 20:,.0f} MiB)" if needed else ""
    return DiskFull(f"no space left on the device writing {path}{need}; {intact}. Free some space (or "
                    f"write elsewhere) and run the same command again")


def run_main(main):
    """Run a script's main(): a UserError becomes one line on stderr and exit status 2, a full disk one line
    and exit status 4. Anything else is a bug, and keeps its traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except DiskFull as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DISK_FULL)
    except OSError as e:           # a write that no atomic_write guarded (a library's own file)
        if not is_disk_full(e):
            raise
        print(f"error: no space left on the device ({e.filename or 'while writing'}): free some space and run "
              f"the same command again", file=sys.stderr)
        sys.exit(EXIT_DISK_FULL)


# ---------------------------------------------------------------------------------------------------------
# The command line: one-line usage errors, numbers checked per flag, the device
# ---------------------------------------------------------------------------------------------------------
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


def check_numbers(args, rules: dict):
    """Each numeric flag against its range, the error naming the flag that was typed. rules: {dest: (low,
    high)}, None for no bound; a low bound in a 1-tuple is exclusive: ((0,), None) means "greater than 0".
    NaN and infinity fail every rule; a flag left at None (not given, no default) or that this command does
    not have is not checked."""
    for name, (low, high) in rules.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, not {value}")
        exclusive = isinstance(low, tuple)
        bound = low[0] if exclusive else low
        if bound is not None and (value <= bound if exclusive else value < bound):
            raise UserError(f"{flag} must be {'greater than' if exclusive else 'at least'} {bound}, not {value}")
        if high is not None and value > high:
            raise UserError(f"{flag} must be at most {high}, not {value}")


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


# ---------------------------------------------------------------------------------------------------------
# Files: written atomically, never over a finished result unless asked; checkpoints loaded safely
# ---------------------------------------------------------------------------------------------------------
def last_path(out: str) -> str:
    """Where a script keeps its latest state for --resume: lm.pt -> lm.last.pt."""
    return out[:-3] + ".last.pt" if out.endswith(".pt") else out + ".last.pt"


def check_out_dir(path: str, flag: str = "--out"):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} directory does not exist: {folder}")


def refuse_overwrite(paths, overwrite: bool, resume_flag: bool = False):
    """A finished result is never replaced by accident: if one of `paths` exists, stop with one line naming
    --overwrite (and --resume, for the training scripts), unless --overwrite was given."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        also = "pass --resume to continue that run, or " if resume_flag else "pass "
        raise UserError(f"{existing[0]} exists; {also}--overwrite to replace it")


def atomic_write(path: str, write):
    """Write `path` through `write(binary_file)` into a temporary file in the same folder, fsync, then rename
    over `path`: a crash or a kill at any instant leaves either the old file or the new one, never half of
    one. A full disk removes the temporary file and raises DiskFull; `path` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if is_disk_full(e) or is_disk_full(e.__cause__) or is_disk_full(e.__context__):
            intact = f"the previous {os.path.basename(path)} is intact" if existed else "nothing was written there"
            raise disk_full(path, intact) from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def atomic_save(obj, path: str):
    """torch.save through `atomic_write`: the previous checkpoint survives a crash, a kill or a full disk."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_metrics(path, metrics: dict):
    """--metrics-json: written atomically, like the checkpoints."""
    if path:
        atomic_write(path, lambda f: f.write(json.dumps(metrics, indent=2).encode()))


def safe_load(source, where: str, what: str = "checkpoint"):
    """torch.load of a path or a binary file with weights_only=True: tensors and plain containers, never an
    object that runs code when unpickled. Each failure is one line naming `where` (the `what` it should be)."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported" in str(e) or "global" in str(e).lower():
            raise UserError(f"refusing to load {where}: it contains pickled Python objects, which could run "
                            f"code; only tensors and plain containers are accepted") from None
        raise UserError(f"{where} is not a valid {what} (corrupt or truncated: {first[:80]})") from None
    except Exception as e:  # noqa: BLE001  (a non-checkpoint file can fail in the zip reader or unpickler)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where} is not a readable PyTorch {what} (corrupt, truncated or another kind "
                        f"of file: {first[:80]})") from None


def load_checkpoint(path: str, kind: str | tuple | None = None) -> dict:
    """Load a checkpoint written by one of our scripts, safely, with one-line errors for every failure:
    missing, not a PyTorch file, truncated, holds pickled code, wrong format version, wrong kind."""
    if not os.path.exists(path):
        raise MissingFile(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"checkpoint path is a directory, expected a .pt file: {path}")
    ckpt = safe_load(path, path)
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


# ---------------------------------------------------------------------------------------------------------
# Training runs: a non-finite loss, a stop signal
# ---------------------------------------------------------------------------------------------------------
def abort_nonfinite(what: str, step: int, last: str):
    """A NaN/inf loss or weight: stop with exit status 3, naming the step and the last good checkpoint,
    which is left as it is (the scripts call this *before* writing a checkpoint)."""
    good = last if os.path.exists(last) else "none written yet"
    print(f"error: {what} at step {step}; stopping without saving. Last good checkpoint: {good}. "
          f"Try a lower --lr.", file=sys.stderr)
    sys.exit(EXIT_NONFINITE)


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


# ---------------------------------------------------------------------------------------------------------
# Output: log lines (results on stdout, the tools' notes on stderr), progress, times
# ---------------------------------------------------------------------------------------------------------
def log_stdout(msg):
    print(msg, flush=True)


def log_stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


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
