"""Stand-in for ``python -m train`` that honours the trainer's SLURM contract, for tests of slurm/.

Started exactly like the real trainer, by ``accelerate launch ... -m tests.slurm_fake_trainer --config RUN.yaml
[--key value ...] --resume auto`` (the sbatch scripts take the module from ``BERTFIT_TRAIN_MODULE``). It does
no learning: each "step" is a sleep plus one all-reduce, so the tests exercise SLURM, the launcher and the
signal/checkpoint/requeue protocol, not a model.

The contract (the real trainer must behave the same way; see slurm/train_multinode.sbatch):

* SIGUSR1 or SIGTERM only sets a flag (the handlers are installed after start-up, like the real trainer's
  after model and data loading: a signal before that is lost when inherited as ignored, which is what
  slurm/run_task.sh does, so the batch script forwards SIGUSR1 again). At the next optimizer-step boundary
  the ranks agree on the flag (all-reduce MAX, so one signalled rank is enough), write a checkpoint
  ``<output_dir>/checkpoints/step-N/`` atomically (staging folder + rename), rank 0 writes ``<output_dir>/run_status.json`` =
  ``{"state": "requeue", "step": N, ...}`` and every process exits with code 75 (EX_TEMPFAIL).
* Normal end: ``{"state": "completed", "step": N}`` and exit 0.
* Config error: one line ``error: ...`` on stderr, ``{"state": "failed", "error": ...}`` and exit 2.
* ``--resume auto``: continue from the newest complete ``checkpoints/step-N``; start fresh when there is none.

Config keys (YAML file, overridable as ``--key value`` or ``--key=value``): output_dir (required),
max_steps (10), step_seconds (0.5), save_every (0 = only on signal), resume ("never" | "auto" | a path),
fail_with (if set: fail with this config error, to test the failure path), startup_seconds (0: how long the
"model loading" before the signal handlers are installed takes).

The real-trainer tests (tests/test_slurm.py) cover single runs, USR1 requeue, preemption and config errors; the
stand-in remains for what is too slow with the real trainer on a 2-core CI machine: 2 processes per node on 2
nodes (a world of 4) and a SIGUSR1 that arrives while the trainers are still starting up.

Evidence it leaves for tests, all under output_dir: ``ranks.jsonl`` (one line per process and attempt: rank,
world_size, node, node_id, restart, job id), ``progress.log`` (rank 0: one line per step done, with the
restart count), ``run_status.json`` and the checkpoints (each with ``meta.json`` and one file per rank).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from datetime import timedelta

EX_TEMPFAIL = 75
DEFAULTS = {
    "output_dir": None,
    "max_steps": 10,
    "step_seconds": 0.5,
    "save_every": 0,
    "resume": "never",
    "fail_with": None,
    "startup_seconds": 0,
}

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))
_STOP = {"signal": 0}


def _on_signal(signum, _frame):
    # Only set a flag: checkpointing inside a handler can deadlock (collectives, locks, I/O).
    if not _STOP["signal"]:
        _STOP["signal"] = signum
    os.write(2, f"fake-trainer[rank {RANK}]: got {signal.Signals(signum).name}; "
                f"will checkpoint at the next step boundary\n".encode())


def say(msg: str, err: bool = False) -> None:
    """One write per line, so lines of several processes sharing the job log do not interleave."""
    stream = sys.stderr if err else sys.stdout
    stream.write(msg + "\n")
    stream.flush()


class ConfigError(Exception):
    pass


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(argv: list[str]) -> dict:
    import yaml

    cfg = dict(DEFAULTS)
    overrides: dict = {}
    config_path = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (overrides are --key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"option --{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_path = value
        else:
            overrides[key] = _parse_value(value)
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ConfigError(f"config file not found: {config_path}")
        with open(config_path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: expected a mapping at the top level")
        overrides = {**loaded, **overrides}
    for key, value in overrides.items():
        if key not in DEFAULTS:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(DEFAULTS))})")
        cfg[key] = value
    if not cfg["output_dir"]:
        raise ConfigError("output_dir is required")
    for key in ("max_steps", "save_every"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise ConfigError(f"{key} must be a non-negative integer, got {cfg[key]!r}")
    for key in ("step_seconds", "startup_seconds"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise ConfigError(f"{key} must be a non-negative number, got {cfg[key]!r}")
    cfg["output_dir"] = os.path.abspath(str(cfg["output_dir"]))
    return cfg


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_status(out: str, state: str, **extra) -> None:
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "run_status.json"), {
        "state": state,
        "world_size": WORLD,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "time": time.time(),
        **extra,
    })


def newest_checkpoint(out: str) -> tuple[int, str | None]:
    root = os.path.join(out, "checkpoints")
    best, best_path = 0, None
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = re.fullmatch(r"step-(\d+)", name)
            path = os.path.join(root, name)
            if m and os.path.isfile(os.path.join(path, "meta.json")) and int(m.group(1)) > best:
                best, best_path = int(m.group(1)), path
    return best, best_path


class Dist:
    """The few collectives needed, or no-ops in a single process."""

    def __init__(self):
        self.dist = None
        if WORLD > 1:
            import torch
            import torch.distributed as dist

            dist.init_process_group("gloo", timeout=timedelta(seconds=120))
            self.dist, self.torch = dist, torch

    def max_int(self, value: int) -> int:
        if self.dist is None:
            return value
        t = self.torch.tensor([value], dtype=self.torch.int64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast_int(self, value: int) -> int:
        if self.dist is None:
            return value
        t = self.torch.tensor([value], dtype=self.torch.int64)
        self.dist.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def close(self) -> None:
        if self.dist is not None:
            self.dist.destroy_process_group()


def save_checkpoint(dist: Dist, out: str, step: int) -> str:
    root = os.path.join(out, "checkpoints")
    final = os.path.join(root, f"step-{step}")
    staging = os.path.join(root, f".staging-step-{step}")
    if RANK == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    if not os.path.exists(final):
        write_json_atomic(os.path.join(staging, f"rank-{RANK}.json"), {"rank": RANK, "step": step})
    dist.barrier()
    if RANK == 0:
        if os.path.exists(final):
            shutil.rmtree(staging, ignore_errors=True)
        else:
            write_json_atomic(os.path.join(staging, "meta.json"), {"step": step, "world_size": WORLD})
            os.rename(staging, final)  # atomic: a checkpoint is either complete or absent
    dist.barrier()
    return final


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
        if cfg["fail_with"]:
            raise ConfigError(str(cfg["fail_with"]))
    except ConfigError as e:
        say(f"error: {e}", err=True)
        out = None
        try:  # best effort: record the failure where the sbatch script looks
            out = cfg_output_dir_guess(argv)
        except Exception:
            pass
        if out and RANK == 0:
            write_status(out, "failed", error=str(e))
        return 2

    out = cfg["output_dir"]
    os.makedirs(out, exist_ok=True)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    info = {
        "rank": RANK, "world_size": WORLD, "local_rank": LOCAL_RANK, "host": socket.gethostname(),
        "node": os.environ.get("SLURMD_NODENAME"), "node_id": os.environ.get("SLURM_NODEID"),
        "restart": restart, "job": os.environ.get("SLURM_JOB_ID"), "pid": os.getpid(),
    }
    dist = Dist()
    say(f"fake-trainer: rank={RANK} world_size={WORLD} local_rank={LOCAL_RANK} host={info['host']} "
        f"node={info['node']} SLURM_NODEID={info['node_id']} restart={restart}")
    with open(os.path.join(out, "ranks.jsonl"), "a") as f:
        f.write(json.dumps(info) + "\n")

    start, path = (newest_checkpoint(out) if cfg["resume"] == "auto" else (0, None))
    start = dist.broadcast_int(start)
    time.sleep(cfg["startup_seconds"])  # "loading the model and data"
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if RANK == 0:
        say(f"fake-trainer: {'resumed from ' + path if path else 'starting from scratch'} (step {start}); "
            "signal handlers installed")

    step = start
    while step < cfg["max_steps"]:
        time.sleep(cfg["step_seconds"])
        step += 1
        if RANK == 0:
            with open(os.path.join(out, "progress.log"), "a") as f:
                f.write(f"step {step} restart {restart}\n")
        stop = dist.max_int(_STOP["signal"])
        if stop or (cfg["save_every"] and step % cfg["save_every"] == 0):
            ckpt = save_checkpoint(dist, out, step)
            if RANK == 0:
                say(f"fake-trainer: saved {ckpt}")
        if stop:
            if RANK == 0:
                write_status(out, "requeue", step=step, signal=signal.Signals(stop).name)
                say(f"fake-trainer: {signal.Signals(stop).name} -> checkpointed at step {step}; "
                    f"exiting {EX_TEMPFAIL} (requeue me)")
            dist.barrier()
            dist.close()
            return EX_TEMPFAIL

    dist.barrier()
    if RANK == 0:
        write_status(out, "completed", step=step)
        say(f"fake-trainer: completed at step {step}")
    dist.close()
    return 0


def cfg_output_dir_guess(argv: list[str]) -> str | None:
    """output_dir from --output_dir or the config file, ignoring every other problem."""
    import yaml

    out = None
    for i, arg in enumerate(argv):
        if arg.startswith("--output_dir="):
            out = arg.split("=", 1)[1]
        elif arg == "--output_dir" and i + 1 < len(argv):
            out = argv[i + 1]
        elif arg == "--config" and i + 1 < len(argv) and out is None and os.path.isfile(argv[i + 1]):
            with open(argv[i + 1]) as f:
                loaded = yaml.safe_load(f) or {}
            out = loaded.get("output_dir") if isinstance(loaded, dict) else None
    return os.path.abspath(out) if out else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
