"""Checkpoints: ``accelerator.save_state`` plus a small JSON of loop state, written under a temporary name and
renamed when complete, so a process killed mid-save never leaves a checkpoint that looks whole.

Layout: output_dir/checkpoints/step-<N>/ (complete) and output_dir/checkpoints/.step-<N>.tmp/ (being written).
A checkpoint is complete when its folder has its final name; loop_state.json is written into it last.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

LOOP_STATE = "loop_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoopState:
    """Everything besides model/optimizer that an exact resume needs."""

    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # optimizer steps already taken in that epoch (batch order is derived from it)
    global_step: int = 0  # optimizer steps taken in the whole run
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early-stopping patience counter)
    world_size: int = 1
    seed: int = 0
    rng: list[dict] = field(default_factory=list)  # one entry per rank: python, numpy, torch (+cuda) states


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / LOOP_STATE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


# --------------------------------------------------------------------------------------------- RNG states
def capture_rng() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


# ------------------------------------------------------------------------------------------- save / load
def save_checkpoint(accelerator, output_dir: str | Path, state: LoopState, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{state.global_step}"
    tmp = root / f".step-{state.global_step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    state.rng = gather_object([capture_rng()]) if accelerator.num_processes > 1 else [capture_rng()]
    accelerator.save_state(str(tmp))  # model, optimizer (sharded under DeepSpeed), accelerate's own RNG files
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / LOOP_STATE, asdict(state))
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        rotate_checkpoints(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete the oldest complete checkpoints beyond ``keep_last`` (by step number, never by mtime)."""
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_partial_checkpoints(output_dir: str | Path) -> list[str]:
    """Temporary folders left by a save that was killed; they were never complete, so nothing is lost."""
    root = checkpoints_dir(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def read_loop_state(path: str | Path) -> LoopState:
    data = json.loads((Path(path) / LOOP_STATE).read_text())
    return LoopState(**data)


def load_checkpoint(accelerator, path: str | Path) -> LoopState:
    """Collective: restore model/optimizer with ``load_state`` and this rank's RNG from the loop state."""
    state = read_loop_state(path)
    accelerator.load_state(str(path))
    if state.world_size == accelerator.num_processes and len(state.rng) > accelerator.process_index:
        # accelerate restores RNG too, but silently skips it if its pickle cannot be read; do it explicitly.
        restore_rng(state.rng[accelerator.process_index])
    return state


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
