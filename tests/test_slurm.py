"""slurm/: the sbatch scripts against a REAL local SLURM cluster (slurm/local_cluster.sh: slurmctld, two slurmd
emulating node1/node2 on 127.0.0.1, munge).

Needs root and Debian's slurmctld/slurmd/slurm-client/munge (CI's .ci/run installs them); the module is skipped
otherwise. The trainer is pluggable through the ``trainer`` fixture: today the stand-in
``tests.slurm_fake_trainer`` (same signal/checkpoint/requeue contract as ``python -m train``); real-trainer tests
only need another ``Trainer`` (module, run config, how to read progress) and can reuse every helper here:
``submit``, ``wait_for_state``, ``wait_until``, ``job_field``, ``job_log``.

Every wait has an outer bound, so a broken cluster fails in seconds instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local_cluster.sh"
MULTINODE = REPO / "slurm" / "train_multinode.sbatch"
SINGLE = REPO / "slurm" / "train.sbatch"
SLURM_DIR = Path(os.environ.get("BERTFIT_SLURM_DIR", "/tmp/bertfit-slurm")).resolve()
SLURM_CONF = SLURM_DIR / "etc" / "slurm.conf"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
_SUBMITTED: list[str] = []  # job ids of the running test, cancelled afterwards


# ---------------------------------------------------------------- helpers (reusable by other slurm tests)

def slurm_env(extra: dict | None = None) -> dict:
    """The caller's environment without SLURM_*/BERTFIT_* leftovers, pointed at the local cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "BERTFIT_"))}
    env["SLURM_CONF"] = str(SLURM_CONF)
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def run(args: list, timeout: float = 30, env: dict | None = None, check: bool = True, **kw):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=env or slurm_env(), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} -> rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def submit(script: Path | str, *args, sbatch_args: list | tuple = (), env: dict | None = None,
           cwd: Path | str | None = None) -> str:
    """sbatch SCRIPT ARGS...; returns the job id (registered for cleanup at the end of the test)."""
    proc = run(["sbatch", "--parsable", *sbatch_args, script, *args], env=env, cwd=cwd)
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch said {proc.stdout!r} {proc.stderr!r}"
    _SUBMITTED.append(job_id)
    return job_id


def show_job(job_id: str) -> str:
    """`scontrol show job -o` (one line), or '' when SLURM does not know the job."""
    proc = run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=15)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def job_field(job_id: str, name: str) -> str | None:
    """One field of `scontrol show job`, e.g. job_field(j, "JobState"), job_field(j, "Restarts")."""
    m = re.search(rf"(?:^|\s){re.escape(name)}=(\S*)", show_job(job_id))
    return m.group(1) if m else None


def job_log(job_id: str) -> str:
    path = job_field(job_id, "StdOut")
    return Path(path).read_text(errors="replace") if path and Path(path).exists() else ""


def wait_until(predicate: Callable[[], object], timeout: float, what: str, job_id: str | None = None,
               poll: float = 0.5):
    """Poll until predicate() is truthy; fail with `what` (and the job's state and log tail) after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = ""
            if job_id:
                detail = (f"\njob {job_id}: {job_field(job_id, 'JobState')} Restarts={job_field(job_id, 'Restarts')}"
                          f"\n--- job log tail ---\n{job_log(job_id)[-4000:]}")
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(poll)


def wait_for_state(job_id: str, states, timeout: float = 90) -> str:
    """Wait until the job's JobState is in `states` (a string or a set); returns the state.
    Fails early when the job reaches another final state."""
    states = {states} if isinstance(states, str) else set(states)

    def check():
        state = job_field(job_id, "JobState")
        if state in states:
            return state
        if state in FINAL_STATES - states:
            raise AssertionError(f"job {job_id} ended {state}, expected {sorted(states)}\n"
                                 f"--- job log tail ---\n{job_log(job_id)[-4000:]}")
        return None

    return wait_until(check, timeout, f"job {job_id} to reach {sorted(states)}", job_id)


def node_cpus(node: str = "node1") -> int:
    m = re.search(r"CPUTot=(\d+)", run(["scontrol", "show", "node", node]).stdout)
    return int(m.group(1)) if m else 2


# ---------------------------------------------------------------- the trainer under test (pluggable)

@dataclass
class Trainer:
    """What the tests need to know about a trainer module launched by the sbatch scripts."""
    module: str
    make_config: Callable[..., Path]               # (tmp_path, output_dir, steps) -> RUN_CONFIG path
    steps_done: Callable[[Path], int]              # output_dir -> optimizer steps done so far (any attempt)
    bad_overrides: list[str]                       # overrides that make it fail with a config error
    attempts: Callable[[Path], list[dict]] = field(default=lambda out: [])  # per-process start records
    env: dict = field(default_factory=dict)


def _fake_config(tmp_path: Path, output_dir: Path, steps: int) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(output_dir), "max_steps": steps, "step_seconds": 0.4}))
    return path


def _fake_steps_done(output_dir: Path) -> int:
    log = output_dir / "progress.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _fake_attempts(output_dir: Path) -> list[dict]:
    path = output_dir / "ranks.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    return Trainer(
        module="tests.slurm_fake_trainer",
        make_config=_fake_config,
        steps_done=_fake_steps_done,
        bad_overrides=["--max_steps", "not-a-number"],
        attempts=_fake_attempts,
    )


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root (slurm/local_cluster.sh starts slurmctld, slurmd and munged)")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged") if not shutil.which(b, path=path)]
    if missing:
        pytest.skip(f"Debian packages slurmctld slurmd slurm-client munge not installed (missing {missing}); "
                    "CI's .ci/run installs them")
    was_running = run([CLUSTER_SH, "status"], check=False, timeout=30).returncode == 0
    proc = run([CLUSTER_SH, "start"], check=False, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"slurm/local_cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    yield SLURM_CONF
    if not was_running:
        run([CLUSTER_SH, "stop"], check=False, timeout=120)


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """Whatever a test submitted is cancelled afterwards, so one failure does not block the next test."""
    _SUBMITTED.clear()
    yield
    live = [j for j in _SUBMITTED if job_field(j, "JobState") not in FINAL_STATES | {None}]
    if live:
        run(["scancel", *live], check=False)
        try:
            wait_until(lambda: all(job_field(j, "JobState") in FINAL_STATES | {None} for j in live), 30,
                       f"cancelled jobs {live} to end")
        except AssertionError:
            pass


@pytest.fixture
def job_env(tmp_path, trainer):
    """Environment for sbatch: the checkout, this python, the trainer module, an accelerate config in tmp."""
    acc = tmp_path / "accelerate.yaml"
    acc.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "mixed_precision": "no",
        "num_machines": 1, "num_processes": 2, "machine_rank": 0, "rdzv_backend": "static",
        "same_network": True, "use_cpu": False, "dynamo_config": {}, "debug": False,
    }))
    return slurm_env({
        "BERTFIT_HOME": REPO, "BERTFIT_PYTHON": sys.executable, "BERTFIT_TRAIN_MODULE": trainer.module,
        "BERTFIT_ACCELERATE_CONFIG": acc, "BERTFIT_PROCS_PER_NODE": 1, "BERTFIT_SRUN_WAIT": 30,
        "HF_HUB_OFFLINE": 1, "TRANSFORMERS_OFFLINE": 1, "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": 1, "TMPDIR": tmp_path, **trainer.env,
    })


def _start_training(tmp_path, trainer, job_env, steps, script=MULTINODE, sbatch_args=(), overrides=()):
    out = tmp_path / "out"
    cfg = trainer.make_config(tmp_path, out, steps)
    job = submit(script, cfg, *overrides, env=job_env, cwd=tmp_path,
                 sbatch_args=[f"--output={tmp_path}/slurm-%j.out", *sbatch_args])
    return job, out


def _assert_status(out: Path, state: str) -> dict:
    status = json.loads((out / "run_status.json").read_text())
    assert status["state"] == state, status
    return status


def _checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.exists() else []


# ---------------------------------------------------------------- tests

@pytest.mark.slurm
def test_two_nodes_form_one_world_and_complete(slurm_cluster, tmp_path, trainer, job_env):
    """(a) one job on node1+node2 = ONE world of 2 with distinct ranks; (d) a normal finish is COMPLETED, 0 restarts."""
    job, out = _start_training(tmp_path, trainer, job_env, steps=4)
    wait_for_state(job, "COMPLETED", timeout=90)
    assert job_field(job, "Restarts") == "0"
    assert job_field(job, "ExitCode") == "0:0"
    _assert_status(out, "completed")
    log = job_log(job)
    assert "machine_rank=0" in log and "machine_rank=1" in log, log
    assert "not requeueing" in log and "scontrol requeue" not in log
    procs = trainer.attempts(out)
    if procs:  # the stand-in records every process: rank -> (node, SLURM_NODEID)
        assert {p["world_size"] for p in procs} == {2}, procs
        assert {p["rank"]: (p["node"], p["node_id"]) for p in procs} == {0: ("node1", "0"), 1: ("node2", "1")}


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, trainer, job_env):
    """(b) `scancel -b --signal=USR1` (what SLURM does before the time limit): checkpoint, requeue, resume, finish."""
    job, out = _start_training(tmp_path, trainer, job_env, steps=12)
    wait_for_state(job, "RUNNING", timeout=60)
    wait_until(lambda: trainer.steps_done(out) >= 2, 60, "the trainer to make progress", job)
    run(["scancel", "-b", "--signal=USR1", job])
    wait_until(lambda: job_field(job, "Restarts") == "1", 60, "the job to requeue itself (Restarts=1)", job)
    wait_for_state(job, "COMPLETED", timeout=90)
    assert job_field(job, "Restarts") == "1"
    _assert_status(out, "completed")
    ckpts = _checkpoints(out)
    assert ckpts and 2 <= ckpts[0] < 12, ckpts
    log = job_log(job)
    assert "got SIGUSR1 -> forwarding SIGUSR1 to srun" in log, log
    assert "scontrol requeue" in log and "restart 1 on 2 node(s)" in log, log
    if trainer.attempts(out):
        _assert_resumed(out, trainer, ckpts[0])


def _assert_resumed(out: Path, trainer: Trainer, ckpt_step: int):
    """The second attempt (restart 1) started from the checkpoint, in a world of 2 again (stand-in evidence)."""
    second = [p for p in trainer.attempts(out) if p["restart"] == 1]
    assert sorted(p["rank"] for p in second) == [0, 1] and {p["world_size"] for p in second} == {2}, second
    lines = (out / "progress.log").read_text().split("\n")
    first_after = next(line for line in lines if line.endswith("restart 1"))
    assert first_after == f"step {ckpt_step + 1} restart 1", lines


@pytest.mark.slurm
def test_preemption_by_urgent_partition_requeues_and_resumes(slurm_cluster, tmp_path, trainer, job_env):
    """(c) a job in `urgent` needing every CPU of both nodes preempts the training job in `debug`; it is
    requeued, resumes from its checkpoint and finishes."""
    job, out = _start_training(tmp_path, trainer, job_env, steps=12)
    wait_for_state(job, "RUNNING", timeout=60)
    wait_until(lambda: trainer.steps_done(out) >= 2, 60, "the trainer to make progress", job)
    urgent = submit("--wrap", "echo urgent on $SLURM_JOB_NODELIST; sleep 2", env=slurm_env(), cwd=tmp_path,
                    sbatch_args=["--partition=urgent", "--nodes=2", f"--ntasks-per-node={node_cpus()}",
                                 f"--output={tmp_path}/urgent-%j.out", "--job-name=urgent"])
    wait_for_state(urgent, "COMPLETED", timeout=60)
    wait_for_state(job, "COMPLETED", timeout=90)
    assert job_field(job, "Restarts") == "1"
    _assert_status(out, "completed")
    ckpts = _checkpoints(out)
    assert ckpts and ckpts[0] >= 2, ckpts
    log = job_log(job)
    assert "got SIGUSR1" in log, log  # preempt_send_user_signal: the grace period starts with B:USR1
    assert "restart 1 on 2 node(s)" in log, log
    if trainer.attempts(out):
        _assert_resumed(out, trainer, ckpts[0])


@pytest.mark.slurm
def test_config_error_fails_without_requeue(slurm_cluster, tmp_path, trainer, job_env):
    """(e) a trainer that fails (config error) ends FAILED, its one-line error is in the log, no requeue."""
    job, out = _start_training(tmp_path, trainer, job_env, steps=4, overrides=trainer.bad_overrides)
    wait_for_state(job, "FAILED", timeout=60)
    time.sleep(2)  # a requeue loop would show up as PENDING/RUNNING with Restarts>0 by now
    assert job_field(job, "JobState") == "FAILED"
    assert job_field(job, "Restarts") == "0"
    log = job_log(job)
    assert re.search(r"^error: .+", log, re.M), log
    assert "not requeueing" in log and "scontrol requeue" not in log, log


@pytest.mark.slurm
def test_single_node_script_runs_two_processes(slurm_cluster, tmp_path, trainer, job_env):
    """slurm/train.sbatch: one node, BERTFIT_PROCS_PER_NODE=2 -> a world of 2 on node1."""
    job_env = {**job_env, "BERTFIT_PROCS_PER_NODE": "2"}
    job, out = _start_training(tmp_path, trainer, job_env, steps=3, script=SINGLE)
    wait_for_state(job, "COMPLETED", timeout=90)
    assert job_field(job, "Restarts") == "0"
    _assert_status(out, "completed")
    procs = trainer.attempts(out)
    if procs:
        assert sorted(p["rank"] for p in procs) == [0, 1] and {p["world_size"] for p in procs} == {2}, procs
        assert {p["node"] for p in procs} == {"node1"}, procs


@pytest.mark.slurm
def test_usage_errors_fail_fast(slurm_cluster, tmp_path, job_env):
    """No RUN_CONFIG, or no way to know output_dir: FAILED with a one-line error, nothing launched."""
    no_args = submit(MULTINODE, env=job_env, cwd=tmp_path, sbatch_args=[f"--output={tmp_path}/a-%j.out"])
    missing = submit(MULTINODE, tmp_path / "nope.yaml", env=job_env, cwd=tmp_path,
                     sbatch_args=[f"--output={tmp_path}/b-%j.out"])
    for job, text in ((no_args, "usage: sbatch"), (missing, "RUN_CONFIG not found")):
        wait_for_state(job, "FAILED", timeout=30)
        assert job_field(job, "Restarts") == "0"
        log = job_log(job)
        assert text in log and "accelerate.commands.launch" not in log, log


@pytest.mark.slurm
def test_run_task_shields_launcher_and_forwards_usr1(tmp_path):
    """slurm/run_task.sh without SLURM: USR1 sent to the wrapper ALONE reaches the trainers (children of the
    launcher), the launcher survives it, the trainers checkpoint and report 'requeue'; {SLURM_NODEID} is
    expanded per task. (Without the wrapper, torchrun's agent dies on USR1 and orphans its workers.)"""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BERTFIT_"))}
    env.update({"SLURM_NODEID": "0", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
                "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    cmd = ["bash", REPO / "slurm" / "run_task.sh", sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_machines", "1", "--machine_rank", "{SLURM_NODEID}", "--num_processes", "2",
           "--main_process_port", str(20000 + os.getpid() % 5000), "-m", "tests.slurm_fake_trainer",
           "--output_dir", out, "--max_steps", "200", "--step_seconds", "0.2", "--resume", "auto"]
    log = tmp_path / "task.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: (out / "progress.log").exists() or proc.poll() is not None, 60, "the trainers to start")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "--machine_rank 0" in text and "got SIGUSR1 -> forwarding" in text, text
    assert rc == 1, text  # torchrun turns the workers' 75 into 1 ...
    status = _assert_status(out, "requeue")  # ... which is why run_status.json decides
    assert 0 < status["step"] < 200 and _checkpoints(out) == [status["step"]], status
