"""Build, once, the C++ extensions a CPU run compiles on first use: bertfit's CPU dropout/attention kernels
(train/csrc) and DeepSpeed's shared-memory communication op. Both are cached under TORCH_EXTENSIONS_DIR.

    python -m train.build_extensions

A first training run (or the first test that needs them) would otherwise spend 30-120 s compiling on a slow
machine; `make test` runs this first, outside every test's time limit. Exit status 0 also when an extension
cannot be built here: training then says so in one line and runs the Python path (or without the op).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def build_cpu_kernels() -> str:
    from train.cpu_dropout import cpu_kernels

    return "built" if cpu_kernels() is not None else "not buildable here (the Python path is used)"


def build_deepspeed_shm_comm() -> str:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.comm.torch import build_shm_op
    except Exception as exc:  # DeepSpeed missing or broken: its tests will say so themselves
        return f"skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return "built" if build_shm_op() is not None else "not compatible with this machine (DeepSpeed runs without it)"


STALE_LOCK_S = 600  # no build here took more than ~3 min, even on a loaded 2-core machine


def remove_stale_locks(root: Path) -> None:
    """torch's extension builder waits forever on the `lock` file of a build that was killed (Ctrl-C, a
    timeout): a lock older than any real build is such a leftover."""
    for lock in root.glob("*/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
            if age > STALE_LOCK_S:
                lock.unlink()
                print(f"bertfit: removed {lock}, left {age / 60:.0f} min ago by a build that was killed", flush=True)
        except OSError:
            pass


def main() -> int:
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    remove_stale_locks(Path(os.path.expanduser(where)))
    for name, build in (("bertfit CPU kernels", build_cpu_kernels), ("DeepSpeed shm comm op", build_deepspeed_shm_comm)):
        start = time.perf_counter()
        print(f"bertfit: {name}: {build()} ({time.perf_counter() - start:.0f} s, cache {where})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
