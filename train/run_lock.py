"""One run per output_dir, and no trainer outliving its launcher.

The main process holds a POSIX lock on ``output_dir/.bertfit.lock`` for the run's whole life. The kernel drops it
when the process dies, SIGKILL included, so a crashed run never leaves a stale lock behind; and POSIX (fcntl)
locks belong to the process, so DataLoader workers forked from it do not keep it alive. The file records who
holds it, so a refused second launch can say which host and pid to look at.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".bertfit.lock"
_held: dict[str, int] = {}  # resolved output_dir -> open fd holding its lock


def _key(output_dir: str | Path) -> str:
    return str(Path(output_dir).resolve())


def acquire_run_lock(output_dir: str | Path) -> str | None:
    """Create output_dir if needed and take its run lock. Returns None, or the one-line reason it cannot."""
    out = Path(output_dir)
    if _key(out) in _held:
        return None
    if out.exists() and not out.is_dir():
        return f"output_dir {out}: exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        return f"output_dir {out}: cannot write there ({exc.strerror or exc})"
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown holder"
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return (f"output_dir {out} is in use by another bertfit run ({holder}); wait for it to end, stop it, "
                    "or choose another output_dir")
        return f"output_dir {out}: cannot lock {LOCK_NAME} ({exc.strerror or exc})"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
    except OSError as exc:  # e.g. a full disk: better to learn it now than at the first checkpoint
        os.close(fd)
        return f"output_dir {out}: cannot write there ({exc.strerror or exc})"
    _held[_key(out)] = fd
    return None


def holds_run_lock(output_dir: str | Path) -> bool:
    return _key(output_dir) in _held


def release_run_lock(output_dir: str | Path) -> None:
    fd = _held.pop(_key(output_dir), None)
    if fd is not None:
        os.close(fd)  # closing any fd of the file drops the process's POSIX lock on it


def lock_is_free_or_ours(output_dir: str | Path) -> bool:
    """Whether this process may write run_status.json there: never into another live run's folder."""
    if holds_run_lock(output_dir):
        return True
    if acquire_run_lock(output_dir) is not None:
        return False
    release_run_lock(output_dir)
    return True


def die_with_launcher() -> None:
    """Under a launcher (torchrun / accelerate launch), have the kernel SIGKILL this worker when the launcher dies.

    torch elastic starts each worker in its own session, so a SIGKILLed launcher would otherwise leave its
    workers training on, beside the relaunch. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
