"""Helpers for tests that launch the trainer in real processes (never in the pytest process: accelerate keeps
global state, and a distributed test must prove that 2 processes with distinct ranks really ran)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ACCELERATE_CONFIGS = ROOT / "accelerate_configs"
RANK_LINE = re.compile(r"bertfit: rank (\d+) of world size (\d+) on (\S+)")


def train_env(tmp: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TMPDIR=str(tmp), DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def write_config(path: Path, **fields) -> Path:
    """A run config; objective: window unless the test sets one: the suite's runs test the window path and
    the features built on it, the document objective (the default) has its own runs in test_document.py."""
    fields = {"objective": "window", **fields}
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def train_command(config: Path, nproc: int = 2, accelerate_config: str | None = "cpu.yaml", overrides=(),
                  module: str = "train", extra_launch=(), script: Path | None = None) -> list[str]:
    """The trainer's command line; ``script``: a hook file that patches something and then runs the trainer's
    entry point (``runpy.run_module("train", run_name="__main__", alter_sys=True)``), in place of ``-m module``."""
    target = [str(script)] if script is not None else ["-m", module]
    if nproc == 1 and accelerate_config is None:
        return [sys.executable, *target, "--config", str(config), *map(str, overrides)]
    cmd = [str(VENV_BIN / "accelerate"), "launch"]
    if accelerate_config:
        cmd += ["--config_file", str(ACCELERATE_CONFIGS / accelerate_config)]
    cmd += ["--num_processes", str(nproc), *map(str, extra_launch)]
    return cmd + [*target, "--config", str(config), *map(str, overrides)]


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def run(cmd: list[str], log: Path, env: dict, timeout: float = 300) -> int:
    proc = start(cmd, log, env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"timed out after {timeout}s (a hang?): {' '.join(cmd)}\n{tail(log)}")


def kill_tree(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Kill the launcher and every process below it (torch elastic starts workers in their own sessions)."""
    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def trainer_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The trainer processes (python ... -m train) under a launcher."""
    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "-m" in cmd and cmd[cmd.index("-m") + 1].startswith("train"):
            out.append(p)
    return out


def wait_for_file(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Wait until a hook script touches ``path``; fail if the trainer exits first or it takes too long."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, tail(log)
        time.sleep(0.05)


def tail(log: Path, n: int = 40) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(lines[-n:])


def ranks(log: Path) -> list[tuple[int, int, str]]:
    return [(int(r), int(w), host) for r, w, host in RANK_LINE.findall(log.read_text(errors="replace"))]


def assert_two_ranks(log: Path) -> None:
    """Every launch recorded in the log ran as exactly ranks 0 and 1 of world size 2."""
    found = ranks(log)
    rank_ids = [r for r, _, _ in found]
    assert found and rank_ids.count(0) == rank_ids.count(1) == len(found) // 2 and len(found) % 2 == 0, \
        f"expected ranks 0 and 1 in every launch, got {found}:\n{tail(log)}"
    assert {w for _, w, _ in found} == {2}, f"expected world size 2 on every rank: {found}"


def history(out: Path) -> list[dict]:
    path = out / "logs" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_records(out: Path) -> dict[int, dict]:
    """Last logged train record per step (a killed run may have logged a step twice)."""
    return {r["step"]: r for r in history(out) if "train/loss" in r}


def eval_records(out: Path) -> list[dict]:
    return [r for r in history(out) if "eval" in r]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = max(train_records(out), default=0)
        if done >= step:
            return done
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited (rc {proc.returncode}) before step {step}")
        time.sleep(0.02)
    kill_tree(proc)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def final_weights(out: Path) -> bytes:
    from train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out)
    assert ckpt is not None, f"no checkpoint in {out}"
    return (ckpt / "model.safetensors").read_bytes()


def assert_no_worker_traceback(text: str) -> None:
    """No trainer printed a traceback. The launcher's own report of a failed worker (accelerate/torchrun end
    with a ChildFailedError traceback whenever a worker exits non-zero, as the README says) is allowed."""
    tracebacks = text.count("Traceback (most recent call last)")
    launcher_reports = text.count("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
    assert tracebacks <= launcher_reports, text[-3000:]


def tiny_export(root: Path, tiny_model: Path, num_docs: int, seed: int, max_words: int) -> dict:
    """A bertfit export of the tiny 2-label model as train writes it (labels, chunking, pooling, task and the
    tokenizer fingerprint from the data's manifest; random weights are enough to compare code paths), shards of
    a CSV of ``num_docs`` documents windowed at 16 content tokens with overlap, split 50/50 train/test."""
    import csv

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from data_prep.cli import main as prep_main
    from train.tiny_model import synthetic_texts

    rows = [(f"d{i}", t, f"class{y}") for i, (t, y) in
            enumerate(synthetic_texts(num_docs, 2, seed=seed, min_words=5, max_words=max_words))]
    with open(root / "docs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "label"])
        w.writerows(rows)
    data = root / "shards"
    assert prep_main(["--input", str(root / "docs.csv"), "--output", str(data), "--tokenizer", str(tiny_model),
                      "--max-length", "18", "--chunk-size", "16", "--stride", "12", "--id-column", "id",
                      "--split-ratios", "train=0.5,test=0.5", "--quiet"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=2, id2label={0: "class0", 1: "class1"}, label2id={"class0": 0, "class1": 1})
    best = root / "best"
    model.save_pretrained(best)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(best)
    (best / "bertfit.json").write_text(json.dumps({
        "labels": manifest["labels"], "chunking": manifest["chunking"], "pooling": "mean", "task": "single",
        "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"]}, indent=2))
    return {"best": best, "data": data, "csv": root / "docs.csv", "rows": rows, "manifest": manifest, "root": root,
            "tiny": tiny_model}
