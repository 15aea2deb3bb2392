"""Checkpoints: ``accelerator.save_state`` plus a small JSON of loop state, written under a temporary name and
renamed when complete, so a process killed mid-save never leaves a checkpoint that looks whole.

Layout: output_dir/checkpoints/step-<N>/ (complete) and output_dir/checkpoints/.step-<N>.tmp/ (being written).
A checkpoint is complete when its folder has its final name and its checksums.json (size and sha256 of every
other file in it, written last, after loop_state.json); every file and folder is fsynced before the rename.
Auto-resume takes the newest checkpoint whose files still match checksums.json (``latest_usable_checkpoint``),
so a checkpoint damaged after it was written (truncated, emptied, edited) costs a few steps, not the run.
"""

from __future__ import annotations

import base64
import hashlib
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
CHECKSUMS = "checksums.json"
# loop_state.json of a checkpoint that also has checksums.json says so under this key, so a checkpoint whose
# checksums.json was lost is not mistaken for one written before bertfit recorded checksums.
_HAS_CHECKSUMS_KEY = "checksums"
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


def step_folders(output_dir: str | Path) -> list[Path]:
    """Folders with a final checkpoint name (step-<N>), complete or not, oldest first (by step number)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Complete is not verified: see ``latest_usable_checkpoint``."""
    return [p for p in step_folders(output_dir) if _is_complete(p)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, its files not verified (auto-resume uses latest_usable_checkpoint)."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def _is_complete(folder: Path) -> bool:
    if (folder / CHECKSUMS).exists():
        return True
    # Written before bertfit recorded checksums: loop_state.json was then the last file written before the rename,
    # so such a checkpoint counts as complete (but unverified) and runs started before the change still resume.
    return (folder / LOOP_STATE).exists() and not _declares_checksums(folder)


def _declares_checksums(folder: Path) -> bool:
    try:
        data = json.loads((folder / LOOP_STATE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and _HAS_CHECKSUMS_KEY in data


# --------------------------------------------------------------------------------------- verification
def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint at ``path`` can be resumed from, else a one-line reason it cannot.

    Read-only and deterministic. Checks: checksums.json parses; every file it lists exists with the recorded size
    and sha256; loop_state.json parses into a LoopState. Hashing reads the whole checkpoint (sha256 runs at about
    0.5-1 GB/s per core: ~1-3 s for a BERT-base model + AdamW state). A checkpoint without checksums.json that was
    written before bertfit recorded them passes if its loop_state.json is readable (nothing else to check)."""
    folder = Path(path)
    if not folder.is_dir():
        return "not a folder"
    if not (folder / CHECKSUMS).exists():
        if not (folder / LOOP_STATE).exists():
            return f"no {CHECKSUMS} and no {LOOP_STATE}"
        if _declares_checksums(folder):
            return f"{CHECKSUMS} missing"
        return _loop_state_problem(folder)
    try:
        listed = _read_checksums(folder)
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"{CHECKSUMS} unreadable ({_one_line(e)})"
    for rel, want in listed.items():  # sizes first: a truncated or emptied file is found without hashing anything
        f = folder / rel
        if not f.is_file():
            return f"{rel}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{rel}: {size} bytes, {want['size']} recorded"
    problem = _loop_state_problem(folder)
    if problem:
        return problem
    for rel, want in listed.items():
        try:
            size, digest = file_size_and_sha256(folder / rel)
        except OSError as e:
            return f"{rel}: unreadable ({_one_line(e)})"
        if size != want["size"] or digest != want["sha256"]:
            return f"{rel}: sha256 mismatch"
    return None


def latest_usable_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """For ``resume: auto``: the newest checkpoint that verifies (``verify_checkpoint``), or None, plus one notice
    line per newer step-<N> folder that was skipped and why. Read-only and deterministic, so every rank can call
    it on a shared filesystem and get the same answer; a damaged checkpoint is left where it is for inspection."""
    skipped = []
    chosen = None
    for folder in reversed(step_folders(output_dir)):
        reason = verify_checkpoint(folder)
        if reason is None:
            chosen = folder
            break
        skipped.append((folder, reason))
    then = f"resuming from {_shown(chosen)} instead" if chosen else "no checkpoint verifies"
    return chosen, [f"bertfit: checkpoint {_shown(p)} is damaged ({reason}); {then}" for p, reason in skipped]


def file_size_and_sha256(path: Path, fsync: bool = False) -> tuple[int, str]:
    """Chunked, so a multi-GB shard never sits in memory; ``fsync`` flushes it to disk in the same pass."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return size, digest.hexdigest()


def checksum_files(folder: Path, fsync: bool = False) -> dict[str, dict]:
    """Relative path -> size and sha256 of every file under ``folder`` (DeepSpeed's sub-folders too), except
    checksums.json itself; sorted, so the manifest of the same files is the same bytes."""
    found = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            f = Path(dirpath) / name
            rel = f.relative_to(folder).as_posix()
            if rel != CHECKSUMS:
                size, digest = file_size_and_sha256(f, fsync)
                found[rel] = {"size": size, "sha256": digest}
    return dict(sorted(found.items()))


def _read_checksums(folder: Path) -> dict[str, dict]:
    files = json.loads((folder / CHECKSUMS).read_text())["files"]
    if not isinstance(files, dict) or not files:
        raise ValueError("no files listed")
    for rel, want in files.items():
        if not (isinstance(want, dict) and isinstance(want.get("size"), int) and isinstance(want.get("sha256"), str)):
            raise ValueError(f"bad entry for {rel}")
    return files


def _loop_state_problem(folder: Path) -> str | None:
    try:
        read_loop_state(folder)
    except (OSError, ValueError, TypeError) as e:
        return f"{LOOP_STATE} unreadable ({_one_line(e)})"
    return None


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _shown(folder: Path) -> str:
    return f"{folder.parent.name}/{folder.name}"  # checkpoints/step-<N>, as the run folder's layout names it


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
    accelerator.wait_for_everyone()  # every rank's files are closed: the main process can hash and fsync them all
    if accelerator.is_main_process:
        _write_json(tmp / LOOP_STATE, {**asdict(state), _HAS_CHECKSUMS_KEY: CHECKSUMS})
        # Hashing reads the checkpoint back once (sha256 ~0.5-1 GB/s; the files are usually still in page cache)
        # and fsyncs each file in the same pass, so the rename below never publishes data that is not on disk.
        _write_json(tmp / CHECKSUMS, {"files": checksum_files(tmp, fsync=True)})
        _fsync_dirs_under(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        rotate_checkpoints(output_dir, keep_last, newest_step=state.global_step)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: str | Path, keep_last: int, newest_step: int | None = None) -> None:
    """Delete the oldest complete checkpoints beyond ``keep_last`` (by step number, never by mtime).

    ``newest_step``: the step just saved. Checkpoints of later steps are then neither counted nor deleted: they
    are left from before a resume (e.g. a damaged one that auto-resume skipped). Counting them could delete the
    checkpoint just written and keep only the damaged one; left alone, the newest usable checkpoint (the one just
    written, checksummed from its own files) always survives, and a save at that later step replaces it."""
    done = complete_checkpoints(output_dir)
    if newest_step is not None:
        done = [p for p in done if int(p.name.split("-")[1]) <= newest_step]
    for old in done[:-keep_last]:
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
    if not isinstance(data, dict):
        raise ValueError(f"{LOOP_STATE} is not a JSON object")
    data.pop(_HAS_CHECKSUMS_KEY, None)
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


def _fsync_dirs_under(folder: Path) -> None:
    """Every directory in the tree, deepest first, so each file's directory entry is on disk too."""
    for dirpath, _, _ in os.walk(folder, topdown=False):
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
