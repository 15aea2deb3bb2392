"""Checkpoint integrity: checksums.json written last and fsynced, auto-resume falls back past a damaged newest
checkpoint (and never deletes it), rotation keeps the newest usable one, pre-checksum checkpoints still resume.

Real ``accelerate.Accelerator`` saves on CPU, one process, a tiny model + AdamW: fast, and the same files
(model.safetensors, optimizer.bin, random_states_0.pkl) as a training run writes.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import train.checkpoint as checkpoint
from train.checkpoint import (CHECKSUMS, LOOP_STATE, LoopState, checksum_files, complete_checkpoints,
                              latest_checkpoint, latest_usable_checkpoint, load_checkpoint, read_loop_state,
                              save_checkpoint, verify_checkpoint)


def tiny_accelerator(seed=0):
    """A prepared Linear + AdamW that has taken one step, so optimizer.bin holds real Adam state."""
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(8, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return accelerator, model, optimizer


def save_at(accelerator, out, step, keep_last=10):
    return save_checkpoint(accelerator, out, LoopState(global_step=step, epoch=1, step_in_epoch=step), keep_last)


@pytest.fixture(scope="module")
def two_checkpoints_template(tmp_path_factory):
    """A run folder with complete checkpoints step-10 and step-12, built once and copied per test."""
    out = tmp_path_factory.mktemp("template") / "out"
    accelerator, _, _ = tiny_accelerator()
    save_at(accelerator, out, 10)
    save_at(accelerator, out, 12)
    return out


@pytest.fixture
def run_dir(tmp_path, two_checkpoints_template):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints_template, out)
    return out


def step(out, n) -> Path:
    return out / "checkpoints" / f"step-{n}"


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def relist(folder: Path) -> None:
    """Rewrite checksums.json for the files as they are now (a checkpoint written that way, not damaged later)."""
    (folder / CHECKSUMS).write_text(json.dumps({"files": checksum_files(folder)}))


def fallback_notice(reason):
    return f"bertfit: checkpoint checkpoints/step-12 is damaged ({reason}); resuming from checkpoints/step-10 instead"


# ------------------------------------------------------------------------------------------ what is written
def test_checksums_json_lists_every_file_recursively_with_size_and_sha256(tmp_path, monkeypatch):
    """DeepSpeed writes shards into a sub-folder; the manifest must cover them like accelerate's top-level files."""
    accelerator, _, _ = tiny_accelerator()
    real_save_state = accelerator.save_state

    def save_state_with_shards(output_dir):
        real_save_state(output_dir)
        shards = Path(output_dir) / "pytorch_model" / "nested"
        shards.mkdir(parents=True)
        (shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard" * 1000)
        (Path(output_dir) / "latest").write_text("pytorch_model")

    monkeypatch.setattr(accelerator, "save_state", save_state_with_shards)
    folder = save_at(accelerator, tmp_path / "out", 3)
    listed = json.loads((folder / CHECKSUMS).read_text())["files"]
    on_disk = {rel: data for rel, data in file_bytes(folder).items() if rel != CHECKSUMS}
    assert set(listed) == set(on_disk)
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", LOOP_STATE, "latest",
            "pytorch_model/nested/zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(listed)
    for rel, data in on_disk.items():
        assert listed[rel] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    assert verify_checkpoint(folder) is None


def test_checkpoint_files_are_the_same_bytes_as_a_plain_save_state(tmp_path):
    """Checksums add two JSON entries and nothing else: model/optimizer/RNG files are accelerate's bytes."""
    accelerator, _, _ = tiny_accelerator()
    folder = save_at(accelerator, tmp_path / "out", 4)
    accelerator.save_state(str(tmp_path / "plain"))
    ours = file_bytes(folder)
    assert set(ours) == set(file_bytes(tmp_path / "plain")) | {LOOP_STATE, CHECKSUMS}
    for rel, data in file_bytes(tmp_path / "plain").items():
        assert ours[rel] == data, rel
    state = read_loop_state(folder)  # the marker key in loop_state.json is not a LoopState field
    assert state == LoopState(global_step=4, epoch=1, step_in_epoch=4, rng=state.rng) and len(state.rng) == 1


def test_files_and_folders_are_fsynced_before_the_rename_and_checksums_written_last(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to map fsynced descriptors to paths")
    accelerator, _, _ = tiny_accelerator()
    real_save_state = accelerator.save_state

    def save_state_with_subfolder(output_dir):
        real_save_state(output_dir)
        (Path(output_dir) / "sub").mkdir()
        (Path(output_dir) / "sub" / "shard.bin").write_bytes(b"x" * 10)

    monkeypatch.setattr(accelerator, "save_state", save_state_with_subfolder)
    events = []
    real_fsync, real_replace, real_write_json = os.fsync, os.replace, checkpoint._write_json
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    monkeypatch.setattr(checkpoint, "_write_json",
                        lambda path, data: (events.append(("json", Path(path).name)), real_write_json(path, data))[1])
    out = tmp_path / "out"
    final = save_at(accelerator, out, 7)
    tmp = out / "checkpoints" / ".step-7.tmp"
    rename = events.index(("replace", str(tmp), str(final)))
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    for rel in file_bytes(final):  # the JSON files are fsynced under their own temporary name, then renamed
        assert {str(tmp / rel), f"{tmp / rel}.tmp"} & synced_before, f"{rel} not fsynced before the rename"
    for d in (tmp, tmp / "sub"):
        assert str(d) in synced_before, f"folder {d.name} not fsynced before the rename"
    assert ("fsync", str(out / "checkpoints")) in events[rename:], "parent folder not fsynced after the rename"
    assert [e[1] for e in events if e[0] == "json"] == [LOOP_STATE, CHECKSUMS]  # checksums.json last


# --------------------------------------------------------------------------------------- auto-resume fallback
def truncate_model(folder):
    f = folder / "model.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 2])
    return f"model.safetensors: {size // 2} bytes, {size} recorded"


def empty_optimizer(folder):
    f = folder / "optimizer.bin"
    size = f.stat().st_size
    f.write_bytes(b"")
    return f"optimizer.bin: 0 bytes, {size} recorded"


def flip_a_model_byte(folder):
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # same size: only the sha256 can tell
    f.write_bytes(bytes(data))
    return "model.safetensors: sha256 mismatch"


def break_loop_state_json(folder):
    f = folder / LOOP_STATE
    f.write_text(f.read_text()[:-40] + "}" * 40)  # same size, no longer JSON
    try:
        json.loads(f.read_text())
    except ValueError as e:
        return f"loop_state.json unreadable (JSONDecodeError: {e})"
    raise AssertionError("still JSON")


def loop_state_not_a_loop_state(folder):
    """loop_state.json listed with matching checksums but not a LoopState: only the parse can tell."""
    (folder / LOOP_STATE).write_text(json.dumps({"global_step": 12, "not_a_field": 1}))
    relist(folder)
    return ("loop_state.json unreadable (TypeError: LoopState.__init__() got an unexpected keyword argument "
            "'not_a_field')")


def remove_random_states(folder):
    (folder / "random_states_0.pkl").unlink()
    return "random_states_0.pkl: missing"


@pytest.mark.parametrize("damage", [truncate_model, empty_optimizer, flip_a_model_byte, break_loop_state_json,
                                    loop_state_not_a_loop_state, remove_random_states])
def test_auto_resume_falls_back_past_a_damaged_newest_checkpoint_and_keeps_it(run_dir, damage):
    newest = step(run_dir, 12)
    assert latest_usable_checkpoint(run_dir) == (newest, [])  # intact: the newest, silently
    reason = damage(newest)
    damaged_bytes = file_bytes(newest)
    assert verify_checkpoint(newest) == reason
    assert latest_usable_checkpoint(run_dir) == (step(run_dir, 10), [fallback_notice(reason)])
    assert file_bytes(newest) == damaged_bytes  # left exactly as found, for inspection
    assert latest_checkpoint(run_dir) == newest  # unverified view, for callers that only need the newest name


def test_newest_without_checksums_json_is_incomplete_and_skipped(run_dir):
    (step(run_dir, 12) / CHECKSUMS).unlink()
    assert complete_checkpoints(run_dir) == [step(run_dir, 10)]
    assert latest_checkpoint(run_dir) == step(run_dir, 10)
    assert latest_usable_checkpoint(run_dir) == (step(run_dir, 10), [fallback_notice("checksums.json missing")])
    assert step(run_dir, 12).is_dir()


def test_unreadable_checksums_json_is_skipped(run_dir):
    (step(run_dir, 12) / CHECKSUMS).write_text('{"files": {"model.safetensors": ')
    path, notices = latest_usable_checkpoint(run_dir)
    assert path == step(run_dir, 10)
    assert len(notices) == 1 and notices[0].startswith(
        "bertfit: checkpoint checkpoints/step-12 is damaged (checksums.json unreadable (JSONDecodeError: ")


def test_no_checkpoint_verifies_gives_none_with_a_notice_for_each(run_dir):
    reason12 = empty_optimizer(step(run_dir, 12))
    reason10 = truncate_model(step(run_dir, 10))
    (run_dir / "checkpoints" / "step-11").mkdir()  # a bare folder with a final name is reported, never chosen
    path, notices = latest_usable_checkpoint(run_dir)
    assert path is None
    assert notices == [
        f"bertfit: checkpoint checkpoints/step-12 is damaged ({reason12}); no checkpoint verifies",
        "bertfit: checkpoint checkpoints/step-11 is damaged (no checksums.json and no loop_state.json); "
        "no checkpoint verifies",
        f"bertfit: checkpoint checkpoints/step-10 is damaged ({reason10}); no checkpoint verifies",
    ]
    assert all(step(run_dir, n).is_dir() for n in (10, 11, 12))


def test_no_checkpoints_at_all(tmp_path):
    assert latest_usable_checkpoint(tmp_path / "nothing-here") == (None, [])
    assert not (tmp_path / "nothing-here").exists()


def test_explicit_path_verification(run_dir, tmp_path):
    assert verify_checkpoint(step(run_dir, 12)) is None
    assert verify_checkpoint(tmp_path / "no-such-folder") == "not a folder"
    empty_optimizer(step(run_dir, 10))
    assert verify_checkpoint(step(run_dir, 10)).startswith("optimizer.bin: 0 bytes, ")


# ------------------------------------------------------------------------------------ rotation and re-saves
def test_rotation_after_a_fallback_keeps_the_new_checkpoint_and_the_damaged_one(run_dir):
    """Resumed from step-10 past a damaged step-12, the run saves step-11 with keep_last=1. Counting step-12
    would delete step-10 and step-11 and leave only the damaged checkpoint."""
    reason = flip_a_model_byte(step(run_dir, 12))
    resume_from, _ = latest_usable_checkpoint(run_dir)
    accelerator, _, _ = tiny_accelerator(seed=1)
    state = load_checkpoint(accelerator, resume_from)
    assert state.global_step == 10
    state.global_step = 11
    save_checkpoint(accelerator, run_dir, state, keep_last=1)
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-11", "step-12"]
    assert verify_checkpoint(step(run_dir, 12)) == reason  # still there, still damaged
    assert latest_usable_checkpoint(run_dir) == (
        step(run_dir, 11),
        [f"bertfit: checkpoint checkpoints/step-12 is damaged ({reason}); resuming from checkpoints/step-11 instead"])


def test_resave_at_the_damaged_step_replaces_it(run_dir):
    truncate_model(step(run_dir, 12))
    accelerator, _, _ = tiny_accelerator(seed=2)
    save_at(accelerator, run_dir, 12, keep_last=2)
    assert latest_usable_checkpoint(run_dir) == (step(run_dir, 12), [])
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-10", "step-12"]


def test_rotation_without_a_step_still_counts_every_complete_checkpoint(run_dir):
    checkpoint.rotate_checkpoints(run_dir, keep_last=1)
    assert complete_checkpoints(run_dir) == [step(run_dir, 12)]


# ------------------------------------------------------------------------------ checkpoints from before checksums
def make_pre_checksum(folder):
    """The layout bertfit wrote before checksums: no checksums.json, loop_state.json without the marker key."""
    (folder / CHECKSUMS).unlink()
    data = json.loads((folder / LOOP_STATE).read_text())
    data.pop("checksums")
    (folder / LOOP_STATE).write_text(json.dumps(data))


def test_a_checkpoint_from_before_checksums_is_complete_and_resumable(run_dir):
    make_pre_checksum(step(run_dir, 12))
    assert complete_checkpoints(run_dir) == [step(run_dir, 10), step(run_dir, 12)]
    assert verify_checkpoint(step(run_dir, 12)) is None
    assert latest_usable_checkpoint(run_dir) == (step(run_dir, 12), [])
    accelerator, model, _ = tiny_accelerator(seed=3)
    assert load_checkpoint(accelerator, step(run_dir, 12)).global_step == 12
    # ... and loaded the saved weights, not the fresh seed-3 ones
    assert torch.equal(accelerator.unwrap_model(model).weight, tiny_accelerator(seed=0)[1].weight)


def test_a_checkpoint_from_before_checksums_with_broken_loop_state_is_skipped(run_dir):
    make_pre_checksum(step(run_dir, 12))
    (step(run_dir, 12) / LOOP_STATE).write_text("{")
    path, notices = latest_usable_checkpoint(run_dir)
    assert path == step(run_dir, 10)
    assert notices == [fallback_notice("loop_state.json unreadable (JSONDecodeError: Expecting property name "
                                       "enclosed in double quotes: line 1 column 2 (char 1))")]
