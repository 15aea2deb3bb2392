"""The training loop, run for real with a tiny random BERT in 1 and 2 CPU processes."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.launch import (ROOT, assert_no_worker_traceback, assert_two_ranks, eval_records, final_weights, kill_tree,
                          ranks, run, start, tail, train_command, train_env, train_records, trainer_processes,
                          wait_for_file, wait_for_step, write_config)
from train.checkpoint import complete_checkpoints, latest_checkpoint
from train.data import steps_per_epoch

pytestmark = pytest.mark.timeout(900)
EVAL_BS = 3


def base_config(tiny_model, data, out, **over) -> dict:
    cfg = dict(model=str(tiny_model), data=str(data), output_dir=str(out), seed=7, epochs=2,
               per_device_batch_size=4, eval_batch_size=EVAL_BS, learning_rate=2e-3, warmup_steps=2,
               log_every_steps=1, save_every_steps=5, keep_last=10, report_to="tensorboard")
    cfg.update(over)
    return cfg


def launch_run(tmp_path, name, cfg: dict, nproc=2, overrides=(), timeout=300, accelerate_config="cpu.yaml"):
    config = write_config(tmp_path / f"{name}.yaml", **cfg)
    log = tmp_path / f"{name}.log"
    cmd = train_command(config, nproc, accelerate_config if nproc > 1 or accelerate_config else None, overrides)
    rc = run(cmd, log, train_env(tmp_path), timeout=timeout)
    return rc, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, prepared):
    """One uninterrupted 2-process run that the resume tests compare against."""
    data, manifest = prepared
    tmp = tmp_path_factory.mktemp("reference")
    cfg = base_config(tiny_model, data, tmp / "out")
    rc, log = launch_run(tmp, "reference", cfg)
    assert rc == 0, tail(log)
    assert_two_ranks(log)
    spe = steps_per_epoch(manifest["splits"]["train"]["windows"], 4, 2, 1)
    return {"out": tmp / "out", "log": log, "cfg": cfg, "spe": spe, "tmp": tmp}


def assert_same_run(ref_out: Path, out: Path, after_step: int) -> None:
    """Bit-identical final weights and the same per-step losses after the resume point."""
    assert final_weights(out) == final_weights(ref_out), "weights differ from the uninterrupted run"
    ref, got = train_records(ref_out), train_records(out)
    assert sorted(ref) == sorted(got)
    later = [s for s in ref if s > after_step]
    assert later, "nothing was trained after the resume point"
    for s in later:
        assert got[s]["train/loss"] == ref[s]["train/loss"], f"loss differs at step {s}"
        assert got[s]["train/lr"] == ref[s]["train/lr"]


# ------------------------------------------------------------------------------------------- schedule
@pytest.mark.slow
@pytest.mark.parametrize("nproc,accumulation", [(1, 1), (1, 3), (2, 1), (2, 3)])
def test_lr_warms_up_linearly_and_decays_to_zero_after_the_last_step(tmp_path, tiny_model, prepared, nproc,
                                                                  accumulation):
    data, manifest = prepared
    cfg = base_config(tiny_model, data, tmp_path / "out", epochs=1, gradient_accumulation_steps=accumulation,
                      warmup_steps=3, eval_split=None, save_every_steps=0, report_to="none", learning_rate=1e-3)
    rc, log = launch_run(tmp_path, "lr", cfg, nproc=nproc)
    assert rc == 0, tail(log)
    found = ranks(log)
    assert sorted(r for r, _, _ in found) == list(range(nproc)) and {w for _, w, _ in found} == {nproc}
    total = steps_per_epoch(manifest["splits"]["train"]["windows"], 4, nproc, accumulation)
    assert total >= 6
    lrs = {s: r["train/lr"] for s, r in train_records(tmp_path / "out").items()}
    assert sorted(lrs) == list(range(1, total + 1)), "one optimizer step per accumulation group, none missing"
    for s in (1, 2, 3):
        assert lrs[s] == pytest.approx(1e-3 * s / 3)
    # the decay reaches 0 one step after the last: the last step still trains
    assert lrs[total] == pytest.approx(1e-3 / (total - 3)) and all(lrs[s] > 0 for s in range(1, total + 1))
    decay = np.diff([lrs[s] for s in range(4, total + 1)])
    assert np.allclose(decay, decay[0]) and decay[0] < 0  # linear decay


# ------------------------------------------------------------------------------------------ exact resume
@pytest.mark.slow
def test_exact_resume_after_sigkill_mid_epoch_and_across_the_epoch_boundary(tmp_path, reference):
    spe, seed = reference["spe"], random.randrange(1 << 30)
    rng = random.Random(seed)
    # (a) killed in epoch 0 after the first checkpoint (step 5): resumes mid-epoch and crosses the boundary;
    # (b) killed in epoch 1: resumes from the epoch-end checkpoint or a mid-epoch one of epoch 1.
    for name, lo, hi in (("a", 6, spe - 1), ("b", spe + 1, 2 * spe - 1)):
        kill_at = rng.randint(lo, hi)
        out = tmp_path / name
        cfg = dict(reference["cfg"], output_dir=str(out))
        config = write_config(tmp_path / f"{name}.yaml", **cfg)
        log = tmp_path / f"{name}.log"
        proc = start(train_command(config), log, train_env(tmp_path))
        wait_for_step(out, kill_at, proc)
        kill_tree(proc)
        resume_from = latest_checkpoint(out)
        assert resume_from is not None, f"no complete checkpoint before the kill at step {kill_at} (seed {seed})"
        resumed_step = int(resume_from.name.split("-")[1])
        rc = run(train_command(config), log, train_env(tmp_path))
        assert rc == 0, tail(log)
        assert f"resumed from {resume_from}" in log.read_text(), tail(log)
        assert_two_ranks(log)
        assert_same_run(reference["out"], out, resumed_step)


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_previous_checkpoint(tmp_path, reference):
    """A trainer frozen inside save_checkpoint (after the shards, before the rename) is SIGKILLed."""
    out = tmp_path / "out"
    cfg = dict(reference["cfg"], output_dir=str(out))
    config = write_config(tmp_path / "run.yaml", **cfg)
    marker = tmp_path / "saving-step-10"
    hook = tmp_path / "slow_save_train.py"
    hook.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import train.checkpoint as checkpoint
        real = checkpoint._write_json
        def frozen(path, data):
            if data.get("global_step") == 10:
                Path({str(marker)!r}).touch()
                time.sleep(600)
            real(path, data)
        checkpoint._write_json = frozen
        import runpy
        runpy.run_module("train", run_name="__main__", alter_sys=True)
    """))
    log = tmp_path / "run.log"
    proc = start(train_command(config, script=hook), log, train_env(tmp_path))
    wait_for_file(marker, proc, log)
    kill_tree(proc)
    assert (out / "checkpoints" / ".step-10.tmp").is_dir()  # the half-written save is there ...
    assert latest_checkpoint(out).name == "step-5"  # ... but the newest complete checkpoint is the one before
    rc = run(train_command(config), log, train_env(tmp_path))
    assert rc == 0, tail(log)
    text = log.read_text()
    assert "removed incomplete checkpoint(s) from a killed save: .step-10.tmp" in text
    assert f"resumed from {out / 'checkpoints' / 'step-5'}" in text
    assert_same_run(reference["out"], out, 5)


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_with_requeue_code_and_resumes(tmp_path, reference):
    out = tmp_path / "out"
    cfg = dict(reference["cfg"], output_dir=str(out), save_every_steps=0)
    config = write_config(tmp_path / "run.yaml", **cfg)
    log = tmp_path / "run.log"
    proc = start(train_command(config), log, train_env(tmp_path))
    wait_for_step(out, 4, proc)
    workers = trainer_processes(proc)
    assert len(workers) == 2
    for w in workers:
        w.send_signal(10)  # SIGUSR1 to both trainer processes, as slurm/run_task.sh forwards it
    proc.wait(timeout=120)
    assert proc.returncode != 0  # the launcher reports the workers' exit code 75 as a failure
    text = log.read_text()
    assert "exitcode  : 75" in text and "exiting with 75" in text, tail(log)
    status = json.loads((out / "run_status.json").read_text())
    assert status["state"] == "requeue" and status["signal"] == "SIGUSR1"
    stopped = status["step"]
    assert stopped >= 4 and latest_checkpoint(out).name == f"step-{stopped}"
    assert len(complete_checkpoints(out)) == 1  # no epoch-end checkpoint yet: the signal made this one
    rc = run(train_command(config), log, train_env(tmp_path))
    assert rc == 0, tail(log)
    assert json.loads((out / "run_status.json").read_text())["state"] == "completed"
    assert_same_run(reference["out"], out, stopped)


@pytest.mark.slow
def test_sigterm_single_process_exits_75(tmp_path, tiny_model, prepared):
    data, _ = prepared
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", **base_config(tiny_model, data, out, epochs=50))
    log = tmp_path / "run.log"
    proc = start(train_command(config, nproc=1, accelerate_config=None), log, train_env(tmp_path))
    wait_for_step(out, 3, proc)
    proc.send_signal(15)
    assert proc.wait(timeout=120) == 75, tail(log)
    assert json.loads((out / "run_status.json").read_text())["state"] == "requeue"


# ------------------------------------------------------------------------------- early stopping & eval
@pytest.mark.slow
def test_early_stopping_stops_every_rank_at_the_same_step(tmp_path, tiny_model, prepared):
    data, _ = prepared
    # min_delta is unreachable: the first evaluation sets the best, the next two do not improve -> stop.
    cfg = base_config(tiny_model, data, tmp_path / "out", epochs=20, eval_every_steps=2, save_every_steps=0,
                      early_stopping={"metric": "doc_accuracy", "mode": "max", "patience": 2, "min_delta": 10.0})
    rc, log = launch_run(tmp_path, "es", cfg, timeout=240)  # the outer timeout proves nobody hangs
    assert rc == 0, tail(log)
    assert_two_ranks(log)
    text = log.read_text()
    assert "bertfit: rank 0 finished at step 6 (early_stopped)" in text
    assert "bertfit: rank 1 finished at step 6 (early_stopped)" in text
    status = json.loads((tmp_path / "out" / "run_status.json").read_text())
    assert status["state"] == "early_stopped" and status["step"] == 6 and status["best_step"] == 2
    assert [r["step"] for r in eval_records(tmp_path / "out")] == [2, 4, 6]


@pytest.mark.slow
def test_evaluation_counts_every_document_once(reference, prepared):
    _, manifest = prepared
    val = manifest["splits"]["validation"]
    assert val["windows"] % (2 * EVAL_BS) != 0  # uneven across 2 ranks: padding would duplicate windows
    evals = eval_records(reference["out"])
    assert evals
    for r in evals:
        assert r["eval"]["num_docs"] == val["documents"]
        assert r["eval"]["num_windows"] == val["windows"]


@pytest.mark.slow
def test_exported_best_model_loads_with_pipeline_and_reproduces_metrics(reference, prepared, tmp_path):
    data, manifest = prepared
    best = reference["out"] / "best"
    info = json.loads((best / "bertfit.json").read_text())
    assert info["labels"] == manifest["labels"] and info["chunking"] == manifest["chunking"]
    logged = [r for r in eval_records(reference["out"]) if r["best"]][-1]["eval"]
    assert info["metrics"] == logged
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch, datasets
        from transformers import AutoModelForSequenceClassification, pipeline
        from train.evaluation import score
        best = {str(best)!r}
        clf = pipeline("text-classification", model=best)
        labels = [p["label"] for p in clf(["good great happy win", "bad awful sad lose"])]
        model = AutoModelForSequenceClassification.from_pretrained(best).eval()
        ds = datasets.load_from_disk({str(data / "validation")!r})
        logits = []
        with torch.no_grad():
            for row in ds:
                ids = torch.tensor([row["input_ids"]])
                logits.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy())
        metrics, _ = score(np.array(logits), np.array(ds["label"]), np.array(ds["doc_id"]), "single_label",
                           {manifest["labels"]!r}, "mean")
        print(json.dumps({{"labels": labels, "metrics": metrics}}))
    """))
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=train_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(label in manifest["labels"] for label in result["labels"])
    for key, value in logged.items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.slow
def test_tensorboard_has_the_documented_tags(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = reference["out"] / "logs" / "bertfit"  # logs/<tracker_project>
    assert run_dir.is_dir(), "no TensorBoard run folder under logs/"
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/padding_fraction",
                "eval/doc_accuracy", "eval/window_accuracy", "eval/doc_f1_macro", "eval/window_loss",
                "eval/doc_loss", "eval/doc_f1_binary"):
        assert tag in scalars, tag
    assert "eval/confusion_matrix" in acc.Tags()["images"]
    assert len(acc.Scalars("train/loss")) == max(train_records(reference["out"]))
    # HParams view: one session with the hyperparameters and the best model's metrics, to compare runs by
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = [plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info for c in content.values()
             if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info")]
    assert len(start) == 1, content.keys()
    assert start[0].hparams["learning_rate"].number_value == reference["cfg"]["learning_rate"]
    assert start[0].hparams["early_stopping.metric"].string_value == "doc_accuracy"
    best = json.loads((reference["out"] / "best" / "bertfit.json").read_text())["metrics"]
    assert acc.Scalars("best/doc_accuracy")[-1].value == pytest.approx(best["doc_accuracy"])


TRACKER_HOOK = """
import json, sys
from pathlib import Path
from accelerate import tracking
from accelerate.utils import LoggerType

RECORD = Path({record!r})

class FakeWandB(tracking.GeneralTracker):
    \"\"\"Stands in for W&B: records what wandb.init and wandb.log would have been given.\"\"\"
    name = "wandb"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run_name, **kwargs):
        super().__init__()
        self.data = {{"project": run_name, "init_kwargs": kwargs, "config": None, "logs": []}}

    def start(self):
        pass

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.data["config"] = values
        RECORD.write_text(json.dumps(self.data))

    def log(self, values, step=None, **kwargs):
        self.data["logs"].append({{"step": step, **values}})
        RECORD.write_text(json.dumps(self.data))

tracking.LOGGER_TYPE_TO_CLASS["wandb"] = FakeWandB
if LoggerType.WANDB not in tracking._available_trackers:
    tracking._available_trackers.append(LoggerType.WANDB)
import runpy
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_trackers_get_the_project_the_run_name_the_config_and_the_best_metrics(tmp_path, tiny_model, prepared):
    data, _ = prepared
    out = tmp_path / "runs" / "my-run"
    record = tmp_path / "wandb.json"
    hook = tmp_path / "tracked_train.py"
    hook.write_text(TRACKER_HOOK.format(record=str(record)))
    cfg = base_config(tiny_model, data, out, epochs=1, report_to="wandb", tracker_project="bbc-experiments",
                      tracker_init_kwargs={"wandb": {"entity": "my-team", "tags": ["tiny"]}})
    config = write_config(tmp_path / "run.yaml", **cfg)
    log = tmp_path / "run.log"
    assert run(train_command(config, nproc=1, accelerate_config=None, script=hook), log, train_env(tmp_path)) == 0, \
        tail(log)
    got = json.loads(record.read_text())
    assert got["project"] == "bbc-experiments"  # not "run"
    assert got["init_kwargs"] == {"name": "my-run", "entity": "my-team", "tags": ["tiny"]}
    assert got["config"]["learning_rate"] == cfg["learning_rate"] and got["config"]["seed"] == cfg["seed"]
    assert any("train/loss" in r for r in got["logs"]) and any("eval/doc_accuracy" in r for r in got["logs"])
    best = json.loads((out / "best" / "bertfit.json").read_text())["metrics"]
    final = got["logs"][-1]
    assert final["best/doc_accuracy"] == pytest.approx(best["doc_accuracy"])
    assert final["best/doc_loss"] == pytest.approx(best["doc_loss"])


# ------------------------------------------------------------------------------------------ bad configs
def _bad_run(tmp_path, cfg_text: str, *overrides):
    config = tmp_path / "bad.yaml"
    config.write_text(cfg_text)
    r = subprocess.run([sys.executable, "-m", "train", "--config", str(config), *overrides], cwd=ROOT,
                       env=train_env(tmp_path), capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    return r.returncode, errors


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "missing_shards", "tokenizer_mismatch",
                                  "batch_size_0"])
def test_bad_config_gives_one_line_error(tmp_path, tiny_model, prepared, minilm_dir, case):
    data, _ = prepared
    good = f"model: {tiny_model}\ndata: {data}\noutput_dir: {tmp_path / 'out'}\n"
    if case == "unknown_key":
        rc, err = _bad_run(tmp_path, good + "learning_rat: 0.1\n")
        needle = "unknown field 'learning_rat'"
    elif case == "wrong_type":
        rc, err = _bad_run(tmp_path, good + "epochs: three\n")
        needle = "field 'epochs': expected int"
    elif case == "missing_shards":
        broken = tmp_path / "broken"
        shutil.copytree(data, broken)
        shutil.rmtree(broken / "train")
        rc, err = _bad_run(tmp_path, good.replace(str(data), str(broken)))
        needle = f"{broken / 'train'}"
    elif case == "tokenizer_mismatch":
        rc, err = _bad_run(tmp_path, good, "--model", str(minilm_dir))
        needle = "its tokenizer differs from the one"
    else:
        rc, err = _bad_run(tmp_path, good + "per_device_batch_size: 0\n")
        needle = "per_device_batch_size must be >= 1, got 0"
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_help_explains_every_field():
    r = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    import dataclasses

    from train.config import EarlyStoppingConfig, TrainConfig
    from train.speedups import SpeedupsConfig

    text = " ".join(r.stdout.split())
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
    for prefix, nested in (("early_stopping", EarlyStoppingConfig), ("speedups", SpeedupsConfig)):
        for f in dataclasses.fields(nested):
            assert f"--{prefix}.{f.name}" in text, f.name
    assert "padding-free batches" in text.lower()  # the speedups' own docs are shown too
    assert "Windows per forward pass on each process" in text  # field docs are shown, not just names
    assert "75" in text  # the requeue exit code is documented


# ------------------------------------------------------------------------------ launcher death, one run per dir
@pytest.mark.slow
def test_sigkilled_launcher_takes_its_workers_and_the_relaunch_resumes_bit_identically(tmp_path, reference):
    """torch elastic starts workers in their own sessions: without a parent-death signal, SIGKILL on
    `accelerate launch` left both trainers running beside the relaunch."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", **dict(reference["cfg"], output_dir=str(out)))
    log = tmp_path / "run.log"
    proc = start(train_command(config), log, train_env(tmp_path))
    wait_for_step(out, 7, proc)
    workers = trainer_processes(proc)
    assert len(workers) == 2, tail(log)
    proc.kill()  # the launcher only, not its process tree
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"trainer processes outlived their launcher: {[p.pid for p in alive]}"
    resume_from = latest_checkpoint(out)
    assert resume_from is not None
    rc = run(train_command(config), log, train_env(tmp_path))
    assert rc == 0, tail(log)
    assert f"resumed from {resume_from}" in log.read_text()
    assert_two_ranks(log)
    assert_same_run(reference["out"], out, int(resume_from.name.split("-")[1]))


@pytest.mark.slow
def test_second_launch_on_a_busy_output_dir_is_refused_and_the_first_run_is_untouched(tmp_path, reference):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", **dict(reference["cfg"], output_dir=str(out)))
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    # the first run waits inside its step-5 save until the second launch is over (a tiny run ends in seconds)
    saving, go_on = tmp_path / "saving-step-5", tmp_path / "go-on"
    hook = tmp_path / "waiting_train.py"
    hook.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import train.loop
        real = train.loop.save_checkpoint
        def save(accelerator, output_dir, state, keep_last):
            if state.global_step == 5:
                Path({str(saving)!r}).touch()
                while not Path({str(go_on)!r}).exists():
                    time.sleep(0.05)
            return real(accelerator, output_dir, state, keep_last)
        train.loop.save_checkpoint = save
        import runpy
        runpy.run_module("train", run_name="__main__", alter_sys=True)
    """))
    first = start(train_command(config, script=hook), first_log, train_env(tmp_path))
    wait_for_file(saving, first, first_log)
    holder = [p.pid for p in psutil.Process(first.pid).children(recursive=True)]
    rc = run(train_command(config), second_log, train_env(tmp_path), timeout=240)
    go_on.touch()
    assert rc != 0, tail(second_log)
    text = second_log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by another bertfit run" in errors[0], tail(second_log)
    assert any(f"pid {pid}" in errors[0] for pid in holder), (errors, holder)
    assert_no_worker_traceback(text)
    assert_two_ranks(second_log)  # it really was a 2-process launch, refused on both ranks
    assert first.wait(timeout=600) == 0, tail(first_log)
    assert json.loads((out / "run_status.json").read_text())["state"] == "completed"
    assert_same_run(reference["out"], out, 0)


@pytest.mark.slow
def test_auto_resume_passes_over_a_damaged_newest_checkpoint_and_stays_bit_identical(tmp_path, reference):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", **dict(reference["cfg"], output_dir=str(out)))
    log = tmp_path / "run.log"
    proc = start(train_command(config), log, train_env(tmp_path))
    wait_for_step(out, 12, proc)
    kill_tree(proc)
    newest, previous = complete_checkpoints(out)[-2:][::-1]
    weights = newest / "model.safetensors"
    damaged = weights.read_bytes()[: weights.stat().st_size // 2]
    weights.write_bytes(damaged)  # a truncated file, as a full disk or a bad copy leaves it
    rc = run(train_command(config), log, train_env(tmp_path))
    assert rc == 0, tail(log)
    text = log.read_text()
    assert (f"bertfit: checkpoint checkpoints/{newest.name} is damaged (model.safetensors: {len(damaged)} bytes"
            in text), tail(log)
    assert f"resuming from checkpoints/{previous.name} instead" in text
    assert f"resumed from {previous}" in text
    assert_two_ranks(log)
    assert_same_run(reference["out"], out, int(previous.name.split("-")[1]))


def _unavailable_tracker() -> str:
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    available = {getattr(t, "value", t) for t in get_available_trackers()}
    return next(t.value for t in LoggerType if t.value not in available and t.value != "all")


@pytest.mark.parametrize("case", ["abbreviated_option", "misspelled_tracker", "tracker_not_installed",
                                  "mode_contradicts_metric", "unknown_class_weight_label", "pos_weight_single_label",
                                  "threshold_tune_single_label", "max_positive_pooling_on_regression_metric"])
def test_task_settings_give_one_line_errors(tmp_path, tiny_model, prepared, case):
    data, _ = prepared
    good = f"model: {tiny_model}\ndata: {data}\noutput_dir: {tmp_path / 'out'}\n"
    extra, overrides = "", ()
    if case == "abbreviated_option":  # must not quietly set learning_rate
        overrides, needle = ("--learning_rat", "1"), "unrecognized arguments: --learning_rat"
    elif case == "misspelled_tracker":
        extra, needle = "report_to: tensorbord\n", "report_to: unknown tracker 'tensorbord'"
    elif case == "tracker_not_installed":
        name = _unavailable_tracker()
        extra, needle = f"report_to: {name}\n", f"report_to: tracker '{name}' is not installed"
    elif case == "mode_contradicts_metric":  # doc_loss with mode max used to keep the worst model
        extra, needle = "early_stopping:\n  metric: doc_loss\n  mode: max\n", "contradicts early_stopping.metric"
    elif case == "unknown_class_weight_label":
        extra, needle = "class_weights:\n  nope: 2.0\n", "class_weights: unknown label(s) 'nope'"
    elif case == "pos_weight_single_label":
        extra, needle = "pos_weight: balanced\n", "pos_weight is for multi-label data"
    elif case == "threshold_tune_single_label":
        extra, needle = "threshold: tune\n", "threshold: tune is for multi-label data"
    else:
        extra, needle = "early_stopping:\n  metric: doc_mse\n", "early_stopping.metric 'doc_mse' is not computed"
    rc, err = _bad_run(tmp_path, good + extra, *overrides)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_early_stopping_mode_follows_the_metric():
    from train.config import EarlyStoppingConfig, TrainConfig
    from train.loop import resolve_task_settings

    for metric, mode in (("doc_loss", "min"), ("window_loss", "min"), ("doc_accuracy", "max"), (None, "max")):
        cfg = TrainConfig(model="m", data="d", output_dir="o", early_stopping=EarlyStoppingConfig(metric=metric))
        resolve_task_settings(cfg, "single_label", ["a", "b"])
        assert cfg.early_stopping.mode == mode and cfg.pooling == "mean"
    cfg = TrainConfig(model="m", data="d", output_dir="o")
    resolve_task_settings(cfg, "regression", [])
    assert (cfg.early_stopping.metric, cfg.early_stopping.mode, cfg.pooling) == ("doc_mse", "min", "mean")
    cfg = TrainConfig(model="m", data="d", output_dir="o")
    resolve_task_settings(cfg, "multi_label", ["x", "y"])
    assert (cfg.early_stopping.metric, cfg.early_stopping.mode, cfg.pooling) == ("doc_f1_micro", "max", "max")


@pytest.mark.slow
def test_relaunching_a_finished_run_trains_nothing(tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    best = out / "best" / "model.safetensors"
    before = (best.read_bytes(), sorted(p.name for p in (out / "checkpoints").iterdir()),
              (out / "run_status.json").read_text(), (out / "logs" / "history.jsonl").read_text())
    config = write_config(tmp_path / "run.yaml", **dict(reference["cfg"], output_dir=str(out), epochs=4))
    log = tmp_path / "again.log"
    rc = run(train_command(config), log, train_env(tmp_path))
    assert rc == 0, tail(log)
    assert f"bertfit: the run in {out} already finished (completed at step" in log.read_text()
    assert_two_ranks(log)
    after = (best.read_bytes(), sorted(p.name for p in (out / "checkpoints").iterdir()),
             (out / "run_status.json").read_text(), (out / "logs" / "history.jsonl").read_text())
    assert after == before  # not one more step, not a new best/, not a rewritten status


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", ["cpu.yaml", pytest.param("zero3.yaml", marks=pytest.mark.deepspeed)])
def test_evaluation_with_fewer_batches_than_ranks_does_not_hang(tmp_path, tiny_model, prepared, accelerate_config):
    """One eval batch for two ranks: rank 1 has no window to score, yet the wrapped model's forward is a
    collective (DDP's buffer sync after training, ZeRO-3's parameter gathers). It used to wait for rank 1 until
    dist_timeout_s; now rank 1 runs a filler batch whose output is dropped."""
    data, manifest = prepared
    out = tmp_path / "out"
    cfg = base_config(tiny_model, data, out, epochs=1, eval_batch_size=10_000, save_every_steps=0, dist_timeout_s=60,
                      report_to="none")
    rc, log = launch_run(tmp_path, "one-eval-batch", cfg, accelerate_config=accelerate_config, timeout=400)
    assert rc == 0, tail(log)
    assert_two_ranks(log)
    evals = eval_records(out)
    assert evals and evals[-1]["eval"]["num_windows"] == manifest["splits"]["validation"]["windows"]


# ------------------------------------------------------------------------------ speedups in real 2-process runs
def _kill_and_resume(tmp_path, name: str, cfg: dict, kill_at: int, timeout: float = 600) -> tuple[Path, int]:
    """Start a 2-process run, SIGKILL it once step ``kill_at`` is logged, relaunch it to the end; returns
    (log, the step it resumed from)."""
    out = Path(cfg["output_dir"])
    config = write_config(tmp_path / f"{name}.yaml", **cfg)
    log = tmp_path / f"{name}.log"
    proc = start(train_command(config), log, train_env(tmp_path))
    wait_for_step(out, kill_at, proc, timeout=timeout)
    kill_tree(proc)
    resume_from = latest_checkpoint(out)
    assert resume_from is not None, tail(log)
    rc = run(train_command(config), log, train_env(tmp_path), timeout=timeout)
    assert rc == 0, tail(log)
    assert f"resumed from {resume_from}" in log.read_text(), tail(log)
    assert_two_ranks(log)
    return log, int(resume_from.name.split("-")[1])


def _assert_export_predicts(best: Path, data: Path) -> None:
    from safetensors import safe_open

    from train.inference import forward_windows, load_export

    with safe_open(str(best / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "_orig_mod" in k]
    model, tokenizer, _info = load_export(best, "cpu")
    logits = forward_windows(model, [[2, 30, 40, 3], [2, 50, 3]], None, tokenizer.pad_token_id, 2)
    assert logits.shape == (2, 2) and np.isfinite(logits).all()


@pytest.mark.slow
def test_packed_token_budget_run_resumes_bit_identically_after_sigkill_and_exports(tmp_path, tiny_model, prepared):
    """Packing + max_tokens_per_batch under 2 processes: an uninterrupted run, and a run SIGKILLed mid-epoch and
    resumed, end with bit-identical weights and the same per-step losses."""
    data, _ = prepared
    over = dict(max_tokens_per_batch=72, speedups={"packing": True}, save_every_steps=4)
    ref_cfg = base_config(tiny_model, data, tmp_path / "ref", **over)
    rc, ref_log = launch_run(tmp_path, "ref", ref_cfg)
    assert rc == 0, tail(ref_log)
    assert_two_ranks(ref_log)
    assert "packing (block-diagonal mask)" in ref_log.read_text()
    steps = max(train_records(tmp_path / "ref"))
    assert steps >= 10
    log, resumed = _kill_and_resume(tmp_path, "killed", dict(ref_cfg, output_dir=str(tmp_path / "killed")),
                                    kill_at=random.randint(5, steps - 2))
    assert_same_run(tmp_path / "ref", tmp_path / "killed", resumed)
    _assert_export_predicts(tmp_path / "killed" / "best", data)


@pytest.mark.slow
def test_compiled_two_process_run_trains_resumes_and_exports(tmp_path, tiny_model, prepared):
    data, _ = prepared
    cfg = base_config(tiny_model, data, tmp_path / "out", epochs=1, save_every_steps=4,
                      speedups={"compile": True, "compile_bucket": 32})
    log, resumed = _kill_and_resume(tmp_path, "compiled", cfg, kill_at=5)
    text = log.read_text()
    assert "compile (inductor, widths padded to x32)" in text
    assert re.search(r"bertfit: compile: [1-9]\d* batch shapes met", text), tail(log)
    records = train_records(tmp_path / "out")
    assert resumed >= 4 and max(records) > resumed and all(np.isfinite(r["train/loss"]) for r in records.values())
    _assert_export_predicts(tmp_path / "out" / "best", data)
