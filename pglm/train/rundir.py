"""The run directory a command writes, from the moment it is checked to the moment the command ends.

Three rules, so that no run is lost and no two processes write one directory:

- **Locked.** The process that writes a run holds an exclusive lock on RUN/.pglm.lock (`fcntl.flock`,
  released by the kernel when the process dies, so a crash never leaves a stale lock). A second
  `--resume`, or an `--overwrite`, of a run in use is refused with the process that holds it.
- **New until its first checkpoint.** A new run that ends before it has written a checkpoint (bad
  data found after set-up, a reward that fails at step 1, Ctrl-C or SIGTERM during the first
  evaluation) leaves nothing behind: what it created is removed, so a plain rerun is accepted. One
  killed outright (kill -9) before then cannot clean up, so the next new run in that directory
  takes its place.
- **`--overwrite` replaces only what succeeds.** The old run is set aside, not deleted, until the new
  one has written its first checkpoint; a new run that fails before then puts it back.

A resumed run is never removed: whatever happens, its checkpoints stay and `--resume` goes on.
With several processes only rank 0 holds the run directory (`run_directory`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

from pglm.errors import UserError

LOCK = ".pglm.lock"


class RunDir:
    """`with RunDir(out, resume, overwrite) as out:` around everything a command does to `out`."""

    def __init__(self, out: str | Path, resume: bool = False, overwrite: bool = False):
        self.out, self.resume, self.overwrite = Path(out), resume, overwrite
        self.backup: Path | None = None
        self.existed = False
        self.locks: list[int] = []

    def __enter__(self) -> Path:
        from pglm.train.checkpoint import prepare_out_dir

        out = self.out
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        try:
            if (out / "config.json").is_file():  # a run: nobody else may be writing it
                self.locks.append(_lock(out))
                if not self.resume and _never_started(out):
                    # Set up, then killed (kill -9, a power cut) before its first checkpoint: nothing
                    # was trained, so a plain rerun takes its place, as after any other early stop.
                    for child in out.iterdir():
                        if child.name != LOCK:
                            shutil.rmtree(child) if child.is_dir() else child.unlink()
            if self.overwrite and not self.resume and (out / "config.json").is_file():
                self.backup = out.with_name(f".{out.name}.replaced")
                shutil.rmtree(self.backup, ignore_errors=True)
                os.replace(out, self.backup)  # its lock goes with it, still held
            self.existed = out.exists()
            prepare_out_dir(out, self.resume, overwrite=False)
            if not self.locks or self.backup is not None:
                self.locks.append(_lock(out))
        except BaseException:
            self._restore()
            self._unlock()
            raise
        return out

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            started = (self.out / "checkpoints" / "latest").is_file()
            if exc_type is not None and not self.resume and not started:
                self._remove_created()
                self._restore()
            elif self.backup is not None:
                shutil.rmtree(self.backup, ignore_errors=True)  # the new run has started: the old one goes
        finally:
            self._unlock()
        return False

    def _remove_created(self) -> None:
        if not self.out.exists():
            return
        for child in list(self.out.iterdir()) if self.existed else [self.out]:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)

    def _restore(self) -> None:
        if self.backup is not None and self.backup.exists():
            if self.out.exists():
                shutil.rmtree(self.out, ignore_errors=True)
            os.replace(self.backup, self.out)
            self.backup = None

    def _unlock(self) -> None:
        for fd in self.locks:
            os.close(fd)  # closing the descriptor releases its flock
        self.locks = []


def _never_started(run: Path) -> bool:
    """A training run (pretrain, sft, rl) with no checkpoint: set up, then killed before its first."""
    import json

    try:
        command = json.loads((run / "config.json").read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return False  # not ours to judge: left as it is
    return command in ("pretrain", "sft", "rl") and not (run / "checkpoints" / "latest").is_file()


def _lock(run: Path) -> int:
    """An exclusive lock on run/.pglm.lock, or one line naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock, as before
        return os.open(os.devnull, os.O_RDONLY)
    path = run / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{run} is in use by {holder}; wait for it to end or stop it, then run this again") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pglm process {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def run_directory(out: str | Path, resume: bool = False, overwrite: bool = False):
    """The RunDir of a command on rank 0; on the other ranks the same path, untouched (rank 0 writes).
    Called before the process group exists, so the rank is torchrun's RANK."""
    if int(os.environ.get("RANK", "0")) == 0:
        return RunDir(out, resume, overwrite)
    return contextlib.nullcontext(Path(out))
