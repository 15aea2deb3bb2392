"""Scaling on this machine: 1 process x 2 threads vs 2 processes x 1 thread (DDP over gloo), and how data_prep and
training cost grow with the dataset (10k and 100k windows).

    python -m bench.scaling                   # full run (~25 min on 2 shared cores), writes docs/benchmarks.md
    python -m bench.scaling --quick           # fewer steps, 1 repeat, prints only
    python -m bench.scaling --part processes  # or --part size

processes: bertfit's loop, global batch 16 either way: ``python -m train`` with OMP_NUM_THREADS=2 and
per_device_batch_size 16, against ``accelerate launch --config_file accelerate_configs/cpu.yaml -m train`` (2 ranks,
gloo) with OMP_NUM_THREADS=1 and per_device_batch_size 8; MiniLM and the tiny model on BBC 256-token windows;
repeats interleaved. Step time and real tokens/s (summed over ranks) from rank 0's history.jsonl (per-step meter,
first steps excluded).

size: corpora of BBC articles repeated (each copy a new document id) until data_prep makes about 10k and 100k
windows (chunk 254, stride 254, max length 256, MiniLM tokenizer); data_prep wall time measured (whole command);
training: a short MiniLM run on each train split measures seconds per step and the fixed cost (process start to
exit minus the timed steps: imports, model load, reading the length column, the batch plan, final checkpoint and
export); the time per epoch is EXTRAPOLATED = steps per epoch x measured seconds per step.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as C  # noqa: E402

LAYOUTS = {"1x2": "1 process x 2 threads (batch 16)", "2x1": "2 processes x 1 thread, DDP gloo (2 x batch 8)"}
BBC_WINDOWS_PER_COPY = None  # measured from the BBC shards


def run_bertfit(layout: str, model: str, data: Path, steps: int, scratch: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{layout}_{model}_", dir=scratch))
    per_device = 16 if layout == "1x2" else 8
    (run_dir / "run.yaml").write_text(C.bertfit_yaml(model, data, run_dir / "out", steps,
                                                   {"per_device_batch_size": per_device}))
    env = C.env(2 if layout == "1x2" else 1)
    if layout == "1x2":
        cmd = [C.PY, "-m", "train", "--config", str(run_dir / "run.yaml")]
    else:
        cmd = [C.PY, "-m", "accelerate.commands.launch", "--config_file", str(C.REPO / "accelerate_configs" / "cpu.yaml"),
               "-m", "train", "--config", str(run_dir / "run.yaml")]
    r = C.run_monitored(cmd, env_=env)
    if r["rc"] != 0:
        raise RuntimeError(f"{layout} {model} failed (rc {r['rc']}):\n{r['stderr'][-4000:]}")
    if layout == "2x1" and "world size 2" not in (r["stdout"] + r["stderr"]):
        raise RuntimeError("the 2-process launch did not report world size 2")
    res = C.history_steps(run_dir / "out")
    res.update({k: v for k, v in r.items() if k not in ("stdout", "stderr")})
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


# -------------------------------------------------------------------------------------------- processes
def part_processes(a, scratch: Path) -> tuple[str, list]:
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    steps = {"minilm": a.steps, "tiny": a.tiny_steps}
    warm = {"minilm": a.warmup, "tiny": a.tiny_warmup}
    results = {m: {lay: [] for lay in LAYOUTS} for m in models}
    for rep in range(a.repeats):
        for m in models:
            for lay in LAYOUTS:
                before = C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
                res = run_bertfit(lay, m, C.shards("bbc", m), steps[m], scratch)
                res["before"], res["rates"] = before, C.rates(res, warm[m])
                results[m][lay].append(res)
                C.log(f"rep {rep + 1} {m} {lay}: {res['rates']['step_s'] * 1e3:.1f} ms/step "
                      f"{res['rates']['tokens_per_s']:.0f} tok/s, other load {res['other_mean']:.2f}")
                C.dump_json(C.WORK / "scaling_processes.json", results)
    lines = []
    runs = []
    for m in models:
        rows = []
        base = C.med([r["rates"]["step_s"] for r in results[m]["1x2"]])
        for lay, title in LAYOUTS.items():
            rr = results[m][lay]
            runs += rr
            st = C.med([r["rates"]["step_s"] for r in rr])
            rows.append([title, C.mmm([r["rates"]["step_s"] * 1e3 for r in rr], "{:.1f}"),
                         C.mmm([r["rates"]["tokens_per_s"] for r in rr]),
                         C.mmm([r["rates"]["samples_per_s"] for r in rr], "{:.2f}"),
                         f"{C.med([r['rates']['padding'] for r in rr]):.1%}", f"{base / st:.2f}x",
                         C.mmm([r["other_mean"] for r in rr], "{:.2f}")])
        lines += ["", f"**{'MiniLM-L6' if m == 'minilm' else 'tiny BERT'}**, {steps[m]} steps, first {warm[m]} "
                      f"excluded", "",
                  C.table(["layout (global batch 16)", "ms/step", "real tokens/s", "samples/s", "padding",
                           "speed vs 1x2", "other load (cores)"], rows)]
    head = [f"steps per run: MiniLM {a.steps}, tiny {a.tiny_steps}; {a.repeats} repeats, interleaved; median (min-max)",
            C.load_line(runs)]
    return "\n".join(head + lines), results


# -------------------------------------------------------------------------------------------------- size
def make_corpus(target_windows: int, windows_per_doc: float, out: Path) -> tuple[Path, int]:
    """BBC articles (class folder = label) repeated until about target_windows windows."""
    if out.exists():
        return out, sum(1 for _ in open(out, newline="")) - 1
    docs = []
    for label_dir in sorted(C.bbc_dir().iterdir()):
        for f in sorted(label_dir.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            docs.append((label_dir.name, f.name, text))
    n_docs = round(target_windows / windows_per_doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "text"])
        for i in range(n_docs):
            label, name, text = docs[i % len(docs)]
            w.writerow([f"c{i // len(docs)}/{label}/{name}", label, text])
    return out, n_docs


def part_size(a, scratch: Path, proc_results: dict | None) -> str:
    from data_prep.prepare import read_manifest
    from train.data import steps_per_epoch

    bbc = read_manifest(C.shards("bbc", "minilm"))
    bbc_windows = sum(s["windows"] for s in bbc["splits"].values())
    per_doc = bbc_windows / 2225
    sizes = [int(x) for x in a.sizes.split(",")]
    rows_prep, rows_train, runs = [], [], []
    s_per_step = {}
    if proc_results and "minilm" in proc_results:
        for lay in LAYOUTS:
            s_per_step[lay] = C.med([r["rates"]["step_s"] for r in proc_results["minilm"][lay]])
    for n in sizes:
        corpus, n_docs = make_corpus(n, per_doc, C.WORK / f"scale_{n}.csv")
        out = C.WORK / f"scale_{n}"
        walls = []
        for rep in range(a.prep_repeats if n <= 20000 else 1):
            before = C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
            cmd = [C.PY, "-m", "data_prep", "--input", str(corpus), "--id-column", "id", "--output", str(out),
                   "--tokenizer", C.MINILM, "--chunk-size", "254", "--stride", "254", "--max-length", "256",
                   "--quiet", "--overwrite"]
            r = C.run_monitored(cmd, env_=C.env())
            if r["rc"] != 0:
                raise RuntimeError(r["stderr"][-3000:])
            r["before"] = before
            runs.append(r)
            walls.append(r["wall_s"])
            C.log(f"data_prep {n}: {r['wall_s']:.1f} s (other load {r['other_mean']:.2f})")
        man = read_manifest(out)
        windows = sum(s["windows"] for s in man["splits"].values())
        tokens = sum(s.get("tokens", 0) for s in man["splits"].values())
        train_windows = man["splits"]["train"]["windows"]
        rows_prep.append([f"{n_docs:,}", f"{windows:,}", f"{tokens / 1e6:.1f} M" if tokens else "-",
                          C.mmm(walls, "{:.1f}"), f"{windows / C.med(walls):,.0f}",
                          C.mmm([r["other_mean"] for r in runs[-len(walls):]], "{:.2f}")])
        # training: a short real run on this train split
        before = C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
        res = run_bertfit("1x2", "minilm", out, a.size_steps, scratch)
        res["before"] = before
        runs.append(res)
        rt = C.rates(res, min(3, a.size_steps - 1))
        fixed = res["wall_s"] - res["stamps"][-1]
        spe = steps_per_epoch(train_windows, 16, 1, 1)
        spe2 = steps_per_epoch(train_windows, 8, 2, 1)
        ep1 = spe * (s_per_step.get("1x2") or rt["step_s"])
        ep2 = spe2 * s_per_step["2x1"] if "2x1" in s_per_step else float("nan")
        rows_train.append([f"{train_windows:,}", f"{rt['step_s']:.2f}", f"{fixed:.0f}", f"{spe:,}",
                           f"{ep1 / 3600:.2f} h", f"{ep2 / 3600:.2f} h" if ep2 == ep2 else "-",
                           f"{res['other_mean']:.2f}"])
        C.log(f"train {n}: {rt['step_s']:.2f} s/step, fixed {fixed:.0f} s")
    src = ("the 1x2 / 2x1 MiniLM medians of the process table above" if s_per_step
           else "this table's own short runs (1 process)")
    lines = [C.load_line(runs), "", "data_prep (whole command, 1 process, tokenizer threads on both cores):", "",
             C.table(["documents", "windows (all splits)", "tokens", "wall s", "windows/s", "other load (cores)"],
                     rows_prep),
             "", f"training, MiniLM, batch 16: measured s/step over a {a.size_steps}-step run on each train split "
                 f"(first 3 excluded) and fixed cost per run; epoch time EXTRAPOLATED = steps/epoch x s/step from "
                 f"{src}:", "",
             C.table(["train windows", "measured s/step (1x2)", "fixed cost s", "steps/epoch (1 process)",
                      "epoch, 1x2 (extrapolated)", "epoch, 2x1 (extrapolated)", "other load (cores)"], rows_train)]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "processes", "size"), default="all")
    p.add_argument("--models", default="minilm,tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tiny-steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tiny-warmup", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", default="10000,100000", help="target windows. Default: 10000,100000")
    p.add_argument("--prep-repeats", type=int, default=3, help="data_prep repeats for sizes <= 20k. Default: 3")
    p.add_argument("--size-steps", type=int, default=12, help="steps of the per-size training runs. Default: 12")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--max-wait", type=float, default=600)
    p.add_argument("--quiet-cores", type=float, default=0.5)
    p.add_argument("--write", type=Path, default=C.DOC_FILE)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.quick:
        a.steps, a.tiny_steps, a.warmup, a.tiny_warmup, a.repeats = 10, 120, 3, 30, 1
        a.prep_repeats, a.size_steps, a.no_write = 1, 6, True
    scratch = C.WORK / "scaling_runs"
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    body, proc_results = [], None
    if a.part in ("all", "processes"):
        text, proc_results = part_processes(a, scratch)
        body += ["### 1 vs 2 processes", "", text, ""]
    if a.part in ("all", "size"):
        body += ["### Dataset size", "", part_size(a, scratch, proc_results), ""]
    cmd = "python -m bench.scaling" + ("" if a.part == "all" else f" --part {a.part}")
    text = C.header_block(cmd, [f"total benchmark time {(time.time() - t0) / 60:.1f} min"]) + "\n\n" + "\n".join(body)
    print(text)
    if not a.no_write:
        C.write_section("scaling", "Scaling: processes and dataset size", text, a.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
