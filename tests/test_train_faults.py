"""The trainer under faults: non-finite values, shards that break the data contract, a busy, unwritable or full
output_dir. Each case must end in one `error:` line and a documented exit code, never a traceback, and never
leave a non-finite model behind as a checkpoint or as best/."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.launch import (ROOT, assert_no_worker_traceback, assert_two_ranks, history, run, start, tail,
                          train_command, train_env, train_records, wait_for_file, write_config)
from tests.test_train import base_config
from train.checkpoint import complete_checkpoints, latest_checkpoint
from train.config import EXIT_CONFIG_ERROR, EXIT_NONFINITE, ConfigError, parse_config

pytestmark = pytest.mark.timeout(600)


def single_run(tmp_path: Path, name: str, cfg: dict, script: Path | None = None, timeout: float = 300):
    """One `python -m train` process (or a hook script standing in for it); returns (rc, log text)."""
    config = write_config(tmp_path / f"{name}.yaml", **cfg)
    cmd = train_command(config, nproc=1, accelerate_config=None, script=script)
    log = tmp_path / f"{name}.log"
    rc = run(cmd, log, train_env(tmp_path), timeout=timeout)
    return rc, log.read_text(errors="replace")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_error(text: str, *needles: str) -> str:
    errors = error_lines(text)
    assert len(errors) == 1, f"expected one error line:\n{text[-3000:]}"
    assert_no_worker_traceback(text)
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def weights_are_finite(folder: Path) -> bool:
    from safetensors.numpy import load_file
    import numpy as np

    return all(np.isfinite(v).all() for v in load_file(str(folder / "model.safetensors")).values()
               if v.dtype.kind == "f")


# ----------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("field,value", [("learning_rate", ".inf"), ("learning_rate", ".nan"),
                                         ("weight_decay", ".inf"), ("max_grad_norm", ".inf"),
                                         ("warmup_ratio", ".nan"), ("peak_tflops", ".inf")])
def test_non_finite_config_values_are_refused(tmp_path, field, value):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: m\ndata: d\noutput_dir: {tmp_path / 'out'}\n{field}: {value}\n")
    with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
        parse_config(["--config", str(config)])


def test_non_finite_min_delta_from_the_command_line_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="early_stopping.min_delta must be a finite number"):
        parse_config(["--model", "m", "--data", "d", "--output_dir", str(tmp_path), "--early_stopping.min_delta",
                      "1.0e+999"])


# ------------------------------------------------------------------------------------- non-finite losses
NAN_HOOK = """
import sys
import torch
import transformers
calls = {{"n": 0}}
real = transformers.BertForSequenceClassification.forward
def forward(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    if self.training:  # the loop computes the loss from the logits: NaN logits make a NaN loss and gradients
        calls["n"] += 1
        if calls["n"] {condition}:
            out.logits = out.logits * float("nan")
    return out
transformers.BertForSequenceClassification.forward = forward
import runpy
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


def nan_hook(tmp_path: Path, condition: str) -> Path:
    """A trainer whose training logits (so loss) turn NaN on the micro-batches `condition` selects (per process)."""
    path = tmp_path / "nan_trainer.py"
    path.write_text(NAN_HOOK.format(condition=condition))
    return path


@pytest.mark.slow
def test_nan_loss_stops_the_run_with_exit_3_and_keeps_the_finite_best_model(tmp_path, tiny_model, prepared):
    data, _ = prepared
    out = tmp_path / "out"
    cfg = base_config(tiny_model, data, out, epochs=1, eval_every_steps=2, save_every_steps=2)
    rc, text = single_run(tmp_path, "nan", cfg, nan_hook(tmp_path, ">= 5"))
    assert rc == EXIT_NONFINITE, text[-3000:]
    assert_one_error(text, "non-finite loss or gradient norm at or before step 5", "on_nonfinite")
    status = json.loads((out / "run_status.json").read_text())
    assert status["state"] == "failed" and "non-finite" in status["error"]
    steps = [int(p.name.split("-")[1]) for p in complete_checkpoints(out)]
    assert steps == [2, 4], steps  # nothing saved from step 5 on
    best = json.loads((out / "best" / "bertfit.json").read_text())
    assert best["step"] <= 4 and weights_are_finite(out / "best")
    assert all(weights_are_finite(p) for p in complete_checkpoints(out))
    assert all(math.isfinite(r["eval"]["doc_loss"]) for r in history(out) if "eval" in r)


@pytest.mark.slow
def test_nan_loss_on_one_rank_stops_both_ranks(tmp_path, tiny_model, prepared):
    data, _ = prepared
    out = tmp_path / "out"
    cfg = base_config(tiny_model, data, out, epochs=1, eval_split=None, log_every_steps=3, save_every_steps=0)
    config = write_config(tmp_path / "run.yaml", **cfg)
    hook = nan_hook(tmp_path, "== 2 and __import__('os').environ['RANK'] == '1'")
    log = tmp_path / "run.log"
    rc = run(train_command(config, script=hook), log, train_env(tmp_path))
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert_two_ranks(log)
    assert_one_error(text, "non-finite loss or gradient norm at or before step 3")
    assert "exitcode  : 3" in text, text[-3000:]  # torch elastic's report of the workers' exit code
    assert not (out / "best").exists() and latest_checkpoint(out) is None
    assert json.loads((out / "run_status.json").read_text())["state"] == "failed"


@pytest.mark.slow
def test_skip_step_drops_the_non_finite_step_and_trains_on(tmp_path, tiny_model, prepared):
    data, manifest = prepared
    out = tmp_path / "out"
    cfg = base_config(tiny_model, data, out, epochs=1, on_nonfinite="skip_step", eval_every_steps=2)
    rc, text = single_run(tmp_path, "skip", cfg, nan_hook(tmp_path, "in (3, 6)"))
    assert rc == 0, text[-3000:]
    assert "step 3: non-finite gradient norm; step skipped" in text
    assert "step 6: non-finite gradient norm; step skipped (on_nonfinite: skip_step; 2 in this launch)" in text
    records = train_records(out)
    assert math.isnan(records[3]["train/loss"]) and math.isfinite(records[4]["train/loss"])
    assert json.loads((out / "run_status.json").read_text())["state"] == "completed"
    assert weights_are_finite(out / "best") and all(weights_are_finite(p) for p in complete_checkpoints(out))


# ------------------------------------------------------------------------------------------ data contract
def copy_with_changed_train_split(data: Path, dest: Path, change) -> Path:
    """A copy of the prepared shards whose train split went through `change(pyarrow.Table) -> Table`."""
    import datasets

    shutil.copytree(data, dest)
    ds = datasets.load_from_disk(str(dest / "train"))
    table = change(ds.data.table)
    shutil.rmtree(dest / "train")
    datasets.Dataset(table).save_to_disk(str(dest / "train"))
    return dest


def set_first(table, column: str, value):
    import pyarrow as pa

    values = table.column(column).to_pylist()
    if isinstance(values[0], list):
        values[0] = [values[0][0], value, *values[0][2:]]
    else:
        values[0] = value
    return table.set_column(table.column_names.index(column), column, pa.array(values, table.column(column).type))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["label", "token", "hash"])
def test_shards_that_break_the_contract_are_refused_at_start(tmp_path, tiny_model, prepared, case):
    data, manifest = prepared
    change = {"label": lambda t: set_first(t, "label", len(manifest["labels"])),
              "token": lambda t: set_first(t, "input_ids", 10 ** 6),
              "hash": lambda t: set_first(t, "input_ids", 5)}[case]
    bad = copy_with_changed_train_split(data, tmp_path / "data", change)
    out = tmp_path / "out"
    cfg = base_config(tiny_model, bad, out, epochs=1, eval_split=None)
    rc, text = single_run(tmp_path, case, cfg)
    assert rc == EXIT_CONFIG_ERROR, text[-3000:]
    expected = {"label": f"has label {len(manifest['labels'])}, outside the manifest's 2 labels",
                "token": "token id 1000000 (window 0) is outside the model's vocabulary",
                "hash": "content hash differs from the manifest's"}[case]
    assert_one_error(text, str(bad / "train"), expected)
    assert latest_checkpoint(out) is None
    if case == "hash":  # the documented way past it: the rows are still valid, just not the ones recorded
        rc, text = single_run(tmp_path, "hash-unverified", dict(cfg, verify_data=False, max_steps=2))
        assert rc == 0, text[-3000:]


# ---------------------------------------------------------------------------------------------- output_dir
@pytest.mark.slow
def test_output_dir_that_is_a_file_is_one_error_line(tmp_path, tiny_model, prepared):
    data, _ = prepared
    out = tmp_path / "out"
    out.write_text("not a folder")
    rc, text = single_run(tmp_path, "file", base_config(tiny_model, data, out))
    assert rc == EXIT_CONFIG_ERROR
    assert_one_error(text, f"output_dir {out}: exists and is not a folder")
    assert out.read_text() == "not a folder"


def mount_tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a read-only or small file system (CI runs as root)")


@pytest.fixture
def mounts():
    made = []
    yield made
    for path in made:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_read_only_output_dir_is_one_error_line(tmp_path, tiny_model, prepared, mounts):
    data, _ = prepared
    mount_tmpfs(tmp_path / "ro", "1m", readonly=True)
    mounts.append(tmp_path / "ro")
    out = tmp_path / "ro" / "run"
    rc, text = single_run(tmp_path, "ro", base_config(tiny_model, data, out))
    assert rc == EXIT_CONFIG_ERROR
    assert_one_error(text, f"output_dir {out}: cannot write there (Read-only file system)")


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_error_line_and_the_run_resumes_after(tmp_path, tiny_model, prepared,
                                                                           mounts):
    data, _ = prepared
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64m")
    mounts.append(disk)
    out = disk / "run"
    cfg = base_config(tiny_model, data, out, epochs=1, eval_split=None, save_every_steps=4, report_to="none")
    config = write_config(tmp_path / "run.yaml", **cfg)
    log = tmp_path / "run.log"
    filler = disk / "filler"
    # stop just before the second save: wait for step 5, fill the disk, let it reach the save at step 8
    hook = tmp_path / "pausing_trainer.py"
    hook.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import train.checkpoint as checkpoint
        real = checkpoint.save_checkpoint
        def save(accelerator, output_dir, state, keep_last):
            if state.global_step == 8:
                Path({str(tmp_path / 'at-8')!r}).touch()
                while not Path({str(tmp_path / 'disk-full')!r}).exists():
                    time.sleep(0.05)
            return real(accelerator, output_dir, state, keep_last)
        checkpoint.save_checkpoint = save
        import train.loop
        train.loop.save_checkpoint = save
        import runpy
        runpy.run_module("train", run_name="__main__", alter_sys=True)
    """))
    proc = start(train_command(config, nproc=1, accelerate_config=None, script=hook), log, train_env(tmp_path))
    wait_for_file(tmp_path / "at-8", proc, log)
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"], capture_output=True)
    (tmp_path / "disk-full").touch()
    rc = proc.wait(timeout=240)
    text = log.read_text(errors="replace")
    assert rc == EXIT_CONFIG_ERROR, text[-3000:]
    assert_one_error(text, "No space left on device")
    assert [p.name for p in complete_checkpoints(out)] == ["step-4"]  # the full disk left no half checkpoint
    filler.unlink()
    rc = run(train_command(config, nproc=1, accelerate_config=None), log, train_env(tmp_path))
    assert rc == 0, tail(log)
    assert f"resumed from {out / 'checkpoints' / 'step-4'}" in log.read_text()
    assert json.loads((out / "run_status.json").read_text())["state"] == "completed"


# --------------------------------------------------------------------------------------------- the run lock
def test_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    from train.run_lock import acquire_run_lock, release_run_lock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from train.run_lock import acquire_run_lock
        assert acquire_run_lock({str(out)!r}) is None
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        error = acquire_run_lock(out)
        assert error is not None and "is in use by another bertfit run" in error and f"pid {holder.pid}" in error
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert acquire_run_lock(out) is None  # the kernel released the dead holder's lock: nothing stale
    release_run_lock(out)


def test_a_finished_trainer_exits_with_its_code_after_atexit_and_without_interpreter_teardown(tmp_path):
    """`python -m train` ends through exit_without_teardown: the run's exit code, atexit handlers run and buffered
    output kept, but no interpreter teardown (where DDP's still-running process-group threads once aborted a
    finished rank with SIGABRT)."""
    marker = tmp_path / "atexit_ran"
    script = textwrap.dedent(f"""
        import atexit, os, sys
        from pathlib import Path
        from train.distributed import exit_without_teardown

        class Teardown:
            def __del__(self, write=os.write):  # bound now: module globals are gone by then
                write(2, b"teardown ran\\n")

        KEPT = Teardown()  # a module global: collected only by the interpreter's teardown
        atexit.register(lambda: Path({str(marker)!r}).write_text("yes"))
        sys.stdout.write("buffered, no newline")
        exit_without_teardown(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert marker.read_text() == "yes"
    assert "teardown ran" not in proc.stderr
    control = subprocess.run([sys.executable, "-c", script.replace("exit_without_teardown(3)", "sys.exit(3)")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert control.returncode == 3 and "teardown ran" in control.stderr  # the check above can tell the two apart
