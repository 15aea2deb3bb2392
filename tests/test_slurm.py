"""slurm/: the sbatch scripts with the REAL trainer (``python -m train``, tiny random BERT, CPU) against a REAL local
SLURM cluster (slurm/local_cluster.sh: slurmctld, two slurmd emulating node1/node2 on 127.0.0.1, munge).

Needs root and Debian's slurmctld/slurmd/slurm-client/munge (CI's .ci/run installs them); the module is skipped
otherwise. What is proved (see docs/slurm.md for the observed job states):

* slurm/train_multinode.sbatch forms ONE world of 2 over node1 and node2 and ends COMPLETED with no requeue;
* ``scancel -b --signal=USR1`` (what SLURM does before the time limit) -> checkpoint, ``scontrol requeue``,
  Restarts=1, resume from that checkpoint, final weights bit-identical to the uninterrupted run;
* a job of the high-priority partition preempts a slurm/train.sbatch job (2 processes on one node): requeued,
  resumed, finished, again bit-identical;
* a config error ends FAILED with the trainer's one-line error, no requeue, even with a stale
  ``run_status.json`` {"state": "requeue"} left in output_dir by an earlier run;
* with the stand-in trainer (tests/slurm_fake_trainer.py, light enough for 4 processes on 2 cores): 2 processes
  per node on 2 nodes form one world of 4; a SIGUSR1 that arrives while the trainers are still starting up is
  forwarded again until taken; BERTFIT_MAX_REQUEUES stops the self-requeue.

To make a signal land mid-training however fast the machine is, the trainer processes are paused (SIGSTOP) once
they logged step 2 and continued (SIGCONT) once the signal has reached the task wrappers on every node; the
signal path itself (SLURM -> batch shell -> srun -> run_task.sh -> trainer) is untouched.

The jobs of the first three tests run side by side (they fit in the cluster's CPUs) to keep the module short.
Every wait has an outer bound, so a broken cluster fails in minutes instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest
import yaml

from tests.launch import final_weights, train_records, write_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local_cluster.sh"
MULTINODE = REPO / "slurm" / "train_multinode.sbatch"
SINGLE = REPO / "slurm" / "train.sbatch"
SLURM_DIR = Path(os.environ.get("BERTFIT_SLURM_DIR", "/tmp/bertfit-slurm")).resolve()
SLURM_CONF = SLURM_DIR / "etc" / "slurm.conf"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
# No ^ anchors: another process's progress bar (written without a newline) may precede a line in the job log.
RANK_LINE = re.compile(r"bertfit: rank (\d+) of world size (\d+) on ")
MAX_STEPS = 40          # tiny model: ~1-4 s of training; one epoch is ~31 steps, so the run crosses an epoch end
PAUSE_AT_STEP = 2       # trainers are paused here until the signal has reached every node

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

_SUBMITTED: list[str] = []  # job ids of the running test, cancelled afterwards
_STATES: dict[str, list[str]] = {}  # job id -> JobState values seen, in order (for reports and docs/slurm.md)


# ---------------------------------------------------------------- helpers

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
           cwd: Path | str | None = None, registry: list | None = None) -> str:
    """sbatch SCRIPT ARGS...; returns the job id (registered for cleanup)."""
    proc = run(["sbatch", "--parsable", *sbatch_args, script, *args], env=env, cwd=cwd)
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch said {proc.stdout!r} {proc.stderr!r}"
    (_SUBMITTED if registry is None else registry).append(job_id)
    return job_id


def show_job(job_id: str) -> str:
    """`scontrol show job -o` (one line), or '' when SLURM does not know the job."""
    proc = run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=15)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def job_field(job_id: str, name: str) -> str | None:
    """One field of `scontrol show job`, e.g. job_field(j, "JobState"), job_field(j, "Restarts")."""
    m = re.search(rf"(?:^|\s){re.escape(name)}=(\S*)", show_job(job_id))
    return m.group(1) if m else None


def _record_states(stop: threading.Event) -> None:
    """Background: every job's state (with the reason while PENDING) each time it changes, via squeue."""
    while not stop.wait(0.25):
        try:
            proc = run(["squeue", "-h", "-t", "all", "-o", "%i %T %r"], check=False, timeout=10)
        except subprocess.TimeoutExpired:
            continue
        for line in proc.stdout.splitlines():
            job, state, reason = (line.split(None, 2) + ["", ""])[:3]
            value = f"{state}({reason})" if state == "PENDING" and reason not in ("", "None") else state
            seen = _STATES.setdefault(job, [])
            if not seen or seen[-1] != value:
                seen.append(value)


def states_seen(job_id: str) -> str:
    """The job's states as the background poller saw them, e.g. 'RUNNING -> PENDING(BeginTime) -> RUNNING', and the
    state now (the poller may not have seen the last change yet)."""
    seen = list(_STATES.get(job_id, []))
    now = job_field(job_id, "JobState")
    if now and (not seen or seen[-1] != now):
        seen.append(now)
    return " -> ".join(seen)


def job_log(job_id: str, path: Path | None = None) -> str:
    path = path or (Path(p) if (p := job_field(job_id, "StdOut")) else None)
    return path.read_text(errors="replace") if path and path.exists() else ""


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


def cancel_live(jobs: list[str]) -> None:
    live = [j for j in jobs if job_field(j, "JobState") not in FINAL_STATES | {None}]
    if live:
        run(["scancel", *live], check=False)
        try:
            wait_until(lambda: all(job_field(j, "JobState") in FINAL_STATES | {None} for j in live), 30,
                       f"cancelled jobs {live} to end")
        except AssertionError:
            pass


def trainer_processes(config: Path) -> list[psutil.Process]:
    """The trainer processes (`python -m train --config CONFIG ...`, not the launchers) of one run."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if str(config) in cmd and "-m" in cmd and "accelerate.commands.launch" not in cmd:
            found.append(p)
    return found


def signal_mid_training(job: str, out: Path, config: Path, nprocs: int, send: Callable[[], None],
                        reached: Callable[[str], bool], timeout: float = 240) -> None:
    """Pause the job's trainers once they logged step PAUSE_AT_STEP, call send() (which makes SLURM signal the
    job), wait until reached(job log) says the signal got through to every node, then let the trainers go on."""
    wait_until(lambda: max(train_records(out), default=0) >= PAUSE_AT_STEP, timeout,
               f"the trainers of job {job} to log step {PAUSE_AT_STEP}", job, poll=0.05)
    procs = trainer_processes(config)
    assert len(procs) == nprocs, f"expected {nprocs} trainer processes, found {procs}"
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    try:
        step = max(train_records(out))
        assert step < MAX_STEPS, f"training ended (step {step}) before it could be paused"
        send()
        wait_until(lambda: reached(job_log(job)), 60, f"the signal to reach the tasks of job {job}", job, poll=0.2)
        time.sleep(0.3)  # srun's own delivery to the (stopped) trainers happens alongside the wrappers'
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass


def ranks_in(log: str) -> list[tuple[int, int]]:
    return [(int(r), int(w)) for r, w in RANK_LINE.findall(log)]


def requeue_checkpoint(log: str, out: Path) -> int:
    """The step of the checkpoint the trainer wrote on the signal (its 'exiting with 75' line)."""
    m = re.findall(rf"SIGUSR1 received: checkpoint {re.escape(str(out))}/checkpoints/step-(\d+) written; "
                   r"exiting with 75", log)
    assert len(m) == 1, f"expected one requeue checkpoint line, got {m}\n{log[-4000:]}"
    return int(m[0])


def assert_resumed_from(log: str, out: Path, step: int) -> None:
    resumed = re.findall(r"bertfit: resumed from (\S+) \(epoch \d+, step (\d+)\)", log)
    assert resumed, f"no 'resumed from' line\n{log[-4000:]}"
    assert {(p, int(s)) for p, s in resumed} == {(str(out / "checkpoints" / f"step-{step}"), step)}, resumed


def assert_bit_identical(reference: Path, out: Path, resumed_step: int) -> None:
    """Final checkpoint weights byte for byte, and every logged loss/lr after the resume point."""
    for folder in (reference, out):
        assert (folder / "checkpoints" / f"step-{MAX_STEPS}").is_dir(), folder
    assert final_weights(out) == final_weights(reference), "final weights differ from the uninterrupted run"
    ref, got = train_records(reference), train_records(out)
    assert sorted(got) == sorted(ref) == list(range(1, MAX_STEPS + 1))
    for s in range(resumed_step + 1, MAX_STEPS + 1):
        assert (got[s]["train/loss"], got[s]["train/lr"]) == (ref[s]["train/loss"], ref[s]["train/lr"]), s


def status(out: Path) -> dict:
    return json.loads((out / "run_status.json").read_text())


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
    stop = threading.Event()
    poller = threading.Thread(target=_record_states, args=(stop,), daemon=True)
    poller.start()
    yield SLURM_CONF
    stop.set()
    poller.join(timeout=15)
    if not was_running:
        run([CLUSTER_SH, "stop"], check=False, timeout=120)


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """Whatever a test submitted is cancelled afterwards, so one failure does not block the next test."""
    _SUBMITTED.clear()
    yield
    cancel_live(_SUBMITTED)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model) -> Path:
    """data_prep shards of a small synthetic corpus for the tiny model (247 training windows)."""
    from data_prep.cli import main as prep_main
    from train.tiny_model import write_synthetic_csv

    root = tmp_path_factory.mktemp("slurm-data")
    csv_path = write_synthetic_csv(root / "data.csv", 150, num_labels=2, seed=1)
    rc = prep_main(["--input", str(csv_path), "--output", str(root / "shards"), "--tokenizer", str(tiny_model),
                    "--max-length", "24", "--id-column", "id", "--quiet"])
    assert rc == 0
    return root / "shards"


def run_config(folder: Path, name: str, tiny_model: Path, data: Path) -> tuple[Path, Path]:
    """One run config (the same for every job but output_dir); returns (config path, output_dir)."""
    out = folder / name
    path = write_config(
        folder / f"{name}.yaml", model=str(tiny_model), data=str(data), output_dir=str(out), seed=7,
        max_steps=MAX_STEPS, per_device_batch_size=4, learning_rate=2e-3, warmup_steps=2, log_every_steps=1,
        save_every_steps=0, keep_last=3, report_to="none", eval_split=None,
        mixed_precision="no")  # the shipped accelerate configs say bf16 (for GPUs)
    return path, out


def job_environment(tmp: Path, **extra) -> dict:
    """sbatch's environment: this checkout and python, the SHIPPED accelerate configs (the scripts' defaults)."""
    return slurm_env({
        "BERTFIT_HOME": REPO, "BERTFIT_PYTHON": sys.executable, "BERTFIT_PROCS_PER_NODE": 1,
        "BERTFIT_SRUN_WAIT": 30, "HF_HUB_OFFLINE": 1, "TRANSFORMERS_OFFLINE": 1, "HF_DATASETS_OFFLINE": 1,
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": 1, "TMPDIR": tmp, **extra,
    })


@pytest.fixture(scope="module")
def multinode_jobs(slurm_cluster, tmp_path_factory, tiny_model, shards):
    """Three jobs of slurm/train_multinode.sbatch (1 process on each of node1 and node2), submitted together:
    R runs uninterrupted (the reference), U gets `scancel -b --signal=USR1` mid-training, F has a bad config and
    a stale run_status.json {"state": "requeue"} from an 'earlier run' (it waits for free CPUs, then fails)."""
    tmp = tmp_path_factory.mktemp("multinode")
    env = job_environment(tmp)
    jobs: list[str] = []
    runs = {}
    for name in ("R", "U", "F"):
        config, out = run_config(tmp, name, tiny_model, shards)
        overrides = ["--per_device_batch_size", "0"] if name == "F" else []
        if name == "F":
            out.mkdir()
            (out / "run_status.json").write_text(json.dumps({"state": "requeue", "step": 3}) + "\n")
            os.utime(out / "run_status.json", (time.time() - 3600,) * 2)
        job = submit(MULTINODE, config, *overrides, env=env, cwd=tmp, registry=jobs,
                     sbatch_args=[f"--output={tmp}/slurm-{name}-%j.out", f"--job-name=bertfit-{name}"])
        runs[name] = {"job": job, "config": config, "out": out, "log": tmp / f"slurm-{name}-{job}.out"}
    u = runs["U"]
    started = time.monotonic()
    try:
        signal_mid_training(
            u["job"], u["out"], u["config"], nprocs=2,
            send=lambda: run(["scancel", "-b", "--signal=USR1", u["job"]]),
            reached=lambda log: all(f"nodeid={i}]: got SIGUSR1 -> forwarding" in log for i in (0, 1)))
        u["signalled_after_s"] = time.monotonic() - started
        yield runs
    finally:
        cancel_live(jobs)


# ---------------------------------------------------------------- the real trainer

def test_multinode_run_is_one_world_on_two_nodes_and_completes(multinode_jobs):
    """Uninterrupted run on node1 + node2: world size 2, machine rank 0 on node1 and 1 on node2, COMPLETED,
    Restarts=0, nothing requeued."""
    r = multinode_jobs["R"]
    wait_for_state(r["job"], "COMPLETED", timeout=300)
    print(f"R job {r['job']}: {states_seen(r['job'])}, Restarts={job_field(r['job'], 'Restarts')}")
    assert job_field(r["job"], "Restarts") == "0"
    assert job_field(r["job"], "ExitCode") == "0:0"
    assert status(r["out"])["state"] == "completed"
    log = job_log(r["job"], r["log"])
    # The trainer prints its host, which is the same machine for both emulated nodes; the task wrapper prints
    # the SLURM node and SLURM_NODEID it runs as, which is the machine rank accelerate launch gets.
    assert "nodeid=0]: machine rank 0 of 2 on node1" in log and "nodeid=1]: machine rank 1 of 2 on node2" in log, log
    assert "--machine_rank 0 " in log and "--machine_rank 1 " in log
    assert sorted(ranks_in(log)) == [(0, 2), (1, 2)], log
    assert "restart 0 on 2 node(s): node[1-2]" in log
    assert f"bertfit: completed at step {MAX_STEPS}" in log
    assert "training completed; not requeueing" in log and "scontrol requeue" not in log, log


def test_usr1_checkpoints_requeues_and_resumes_bit_identical(multinode_jobs):
    """`scancel -b --signal=USR1` mid-training (time almost up): checkpoint at step N > 0, exit 75 on every rank,
    the script requeues (Restarts=1), the restart resumes from step-N and ends with the reference's weights."""
    u, r = multinode_jobs["U"], multinode_jobs["R"]
    wait_for_state(u["job"], "COMPLETED", timeout=300)
    wait_for_state(r["job"], "COMPLETED", timeout=120)
    print(f"U job {u['job']}: {states_seen(u['job'])}, Restarts={job_field(u['job'], 'Restarts')}, "
          f"signalled {u['signalled_after_s']:.0f} s after submission")
    assert job_field(u["job"], "Restarts") == "1"
    assert job_field(u["job"], "ExitCode") == "0:0"
    assert status(u["out"])["state"] == "completed"
    log = job_log(u["job"], u["log"])
    first, _, second = log.partition("restart 1 on 2 node(s)")
    assert second, f"the job did not restart\n{log[-4000:]}"
    step = requeue_checkpoint(first, u["out"])
    print(f"U: checkpoint step-{step} on SIGUSR1, resumed from it, {MAX_STEPS} steps in all")
    assert PAUSE_AT_STEP <= step < MAX_STEPS
    assert "got SIGUSR1 -> forwarding SIGUSR1 to srun" in first
    assert "launcher exited with code 1" in first  # torchrun turns the trainers' 75 into 1 ...
    assert "run_status.json state: requeue (after SIGUSR1)" in first  # ... so run_status.json decides
    assert f"scontrol requeue {u['job']} (next restart: 1)" in first and "requeued;" in first
    assert sorted(ranks_in(first)) == sorted(ranks_in(second)) == [(0, 2), (1, 2)]
    assert "machine rank 1 of 2 on node2 (host" in second and "restart 1)" in second
    assert_resumed_from(second, u["out"], step)
    assert "training completed; not requeueing" in second and "scontrol requeue" not in second
    assert_bit_identical(r["out"], u["out"], step)


def test_config_error_fails_without_requeue_despite_stale_status(multinode_jobs):
    """`--per_device_batch_size 0`: FAILED with the trainer's one-line error in the job log, Restarts=0. The stale
    run_status.json {"state": "requeue"} left in output_dir by an 'earlier run' does not cause a requeue: the trainer
    replaces it with {"state": "failed", "error": ...} and the batch script repeats that error."""
    f = multinode_jobs["F"]
    wait_for_state(f["job"], "FAILED", timeout=300)
    print(f"F job {f['job']}: {states_seen(f['job'])}, Restarts={job_field(f['job'], 'Restarts')}, "
          f"ExitCode={job_field(f['job'], 'ExitCode')}")
    log = job_log(f["job"], f["log"])
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == ["error: per_device_batch_size must be >= 1, got 0"], log
    assert "run_status.json state: failed" in log, log
    assert "trainer error: per_device_batch_size must be >= 1, got 0" in log, log
    assert "training FAILED" in log and "not requeueing" in log and "scontrol requeue" not in log, log
    final = status(f["out"])  # the stale 'requeue' file, replaced by this attempt's own record
    assert final["state"] == "failed" and "per_device_batch_size" in final["error"], final
    assert job_field(f["job"], "JobState") == "FAILED" and job_field(f["job"], "Restarts") == "0"


def test_preemption_by_urgent_partition_requeues_resumes_and_finishes(slurm_cluster, tmp_path, tiny_model, shards,
                                                                      multinode_jobs):
    """slurm/train.sbatch (2 processes on one node) in `debug` is preempted by a job in `urgent` that needs every
    CPU: SLURM sends USR1 at the start of the grace time, the trainers checkpoint, the job is requeued, restarts
    after the urgent job, resumes and finishes with the same weights as the uninterrupted 2-process reference."""
    for other in multinode_jobs.values():  # the urgent job would preempt them too
        wait_for_state(other["job"], FINAL_STATES, timeout=300)
    config, out = run_config(tmp_path, "P", tiny_model, shards)
    env = job_environment(tmp_path, BERTFIT_PROCS_PER_NODE=2)
    job = submit(SINGLE, config, env=env, cwd=tmp_path, sbatch_args=[f"--output={tmp_path}/slurm-P-%j.out"])
    urgent: list[str] = []

    def preempt():
        urgent.append(submit("--wrap", "echo urgent on $SLURM_JOB_NODELIST; sleep 1", env=slurm_env(),
                             cwd=tmp_path, sbatch_args=["--partition=urgent", "--nodes=2", "--job-name=urgent",
                                                        f"--ntasks-per-node={node_cpus()}",
                                                        f"--output={tmp_path}/urgent-%j.out"]))

    signal_mid_training(job, out, config, nprocs=2, send=preempt,
                        reached=lambda log: "nodeid=0]: got SIGUSR1 -> forwarding" in log)
    wait_for_state(urgent[0], "COMPLETED", timeout=120)
    wait_for_state(job, "COMPLETED", timeout=300)
    print(f"P job {job}: {states_seen(job)}, Restarts={job_field(job, 'Restarts')}; "
          f"urgent job {urgent[0]}: {states_seen(urgent[0])}")
    assert job_field(job, "Restarts") == "1"
    log = job_log(job)
    first, _, second = log.partition("restart 1 on 1 node(s)")
    assert second, f"the job did not restart\n{log[-4000:]}"
    assert "got SIGUSR1 -> forwarding SIGUSR1 to srun" in first  # preempt_send_user_signal: B:USR1 at grace start
    step = requeue_checkpoint(first, out)
    print(f"P: checkpoint step-{step} on preemption, resumed from it, {MAX_STEPS} steps in all")
    assert PAUSE_AT_STEP <= step < MAX_STEPS
    assert sorted(ranks_in(first)) == sorted(ranks_in(second)) == [(0, 2), (1, 2)]
    assert "machine rank 0 of 1 on node1" in first
    assert_resumed_from(second, out, step)
    assert status(out)["state"] == "completed"
    assert_bit_identical(multinode_jobs["R"]["out"], out, step)


# ---------------------------------------------------------------- the stand-in trainer, and no trainer at all

def test_four_processes_on_two_nodes_usr1_during_startup_and_requeue_limit(slurm_cluster, tmp_path):
    """Stand-in trainer, 2 processes per node: ONE world of 4 (ranks 0-1 on node1, 2-3 on node2). SIGUSR1 arrives
    while the trainers are still starting up (no handler yet: under run_task.sh they inherit it as ignored); the
    script forwards it again every BERTFIT_RESIGNAL_EVERY s until it is taken and the trainers checkpoint. With
    BERTFIT_MAX_REQUEUES=0 the script then does NOT requeue: the job ends FAILED with exit code 75, Restarts=0.
    (Resuming is proved by the real-trainer tests; skipping it here saves a restart.)"""
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "max_steps": 20, "step_seconds": 0.2,
                                      "startup_seconds": 1}))
    env = job_environment(tmp_path, BERTFIT_TRAIN_MODULE="tests.slurm_fake_trainer", BERTFIT_PROCS_PER_NODE=2,
                          BERTFIT_RESIGNAL_EVERY=1, BERTFIT_MAX_REQUEUES=0)
    job = submit(MULTINODE, config, env=env, cwd=tmp_path, sbatch_args=[f"--output={tmp_path}/slurm-%j.out"])
    wait_until(lambda: job_log(job).count("]: launching: ") == 2, 60, "both tasks to start their launcher", job,
               poll=0.1)
    run(["scancel", "-b", "--signal=USR1", job])  # the launchers are still importing: no trainer has a handler
    wait_for_state(job, "FAILED", timeout=120)
    print(f"stand-in job {job}: {states_seen(job)}, Restarts={job_field(job, 'Restarts')}, "
          f"ExitCode={job_field(job, 'ExitCode')}")
    assert job_field(job, "Restarts") == "0" and job_field(job, "ExitCode") == "75:0"
    log = job_log(job)
    handlers = log.index("signal handlers installed")
    assert log.index("got SIGUSR1 -> forwarding SIGUSR1 to srun") < handlers  # the first one was lost ...
    assert "forwarding SIGUSR1 again" in log[handlers:]  # ... a later one was taken
    assert "run_status.json state: requeue (after SIGUSR1)" in log
    assert "NOT requeueing: already restarted 0 times (BERTFIT_MAX_REQUEUES=0)" in log and "scontrol requeue" not in log
    procs = {p["rank"]: (p["node"], p["node_id"], p["world_size"])
             for p in map(json.loads, (out / "ranks.jsonl").read_text().splitlines())}
    assert procs == {0: ("node1", "0", 4), 1: ("node1", "0", 4), 2: ("node2", "1", 4), 3: ("node2", "1", 4)}
    assert status(out)["state"] == "requeue" and 1 <= status(out)["step"] < 20
    ckpt = json.loads((out / "checkpoints" / f"step-{status(out)['step']}" / "meta.json").read_text())
    assert ckpt["world_size"] == 4


def test_usage_errors_fail_fast(slurm_cluster, tmp_path):
    """No RUN_CONFIG, or no way to know output_dir: FAILED with a one-line error, nothing launched."""
    env = job_environment(tmp_path)
    no_args = submit(MULTINODE, env=env, cwd=tmp_path, sbatch_args=[f"--output={tmp_path}/a-%j.out"])
    missing = submit(MULTINODE, tmp_path / "nope.yaml", env=env, cwd=tmp_path,
                     sbatch_args=[f"--output={tmp_path}/b-%j.out"])
    for job, text in ((no_args, "usage: sbatch"), (missing, "RUN_CONFIG not found")):
        wait_for_state(job, "FAILED", timeout=60)
        assert job_field(job, "Restarts") == "0"
        log = job_log(job)
        assert text in log and "accelerate.commands.launch" not in log, log
