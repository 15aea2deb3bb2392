"""Checkpoint cost: save and resume time for MiniLM on 2 CPU processes, DDP vs DeepSpeed ZeRO-2 vs ZeRO-3.

    python -m bench.checkpoint_cost              # writes docs/benchmarks.md (~10 min)
    python -m bench.checkpoint_cost --repeats 1 --no-write

Each layout trains MiniLM on BBC 256-token windows for --steps optimizer steps with a checkpoint every step
(``save_every_steps: 1``, ``keep_last: 2``, so rotation deletes old ones as in a real run), then a second launch
resumes from the last checkpoint (``resume: auto``) and runs one more step. The trainer is started through this
module, which wraps ``train.loop.save_checkpoint`` / ``train.loop.load_checkpoint`` with a timer (barrier before,
wall time of the collective call on each rank; the table shows the slowest rank) and then calls
``train.loop.main``: the measured code is bertfit's own, unmodified. Launch: ``accelerate launch --config_file
accelerate_configs/{cpu,zero2,zero3}.yaml --num_processes 2`` with OMP_NUM_THREADS=1, fp32, batch 8 per process.
Checkpoint size = bytes on disk of the last checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as C  # noqa: E402

LAYOUTS = {"ddp": "cpu.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}


def worker(argv: list[str]) -> int:
    """Run bertfit's trainer with timers around save_checkpoint/load_checkpoint (printed as JSON lines)."""
    import train.loop as loop

    rank = os.environ.get("RANK", "0")

    def timed(name, fn):
        def wrapper(accelerator, *args, **kwargs):
            accelerator.wait_for_everyone()
            t0 = time.perf_counter()
            out = fn(accelerator, *args, **kwargs)
            dt = time.perf_counter() - t0
            print("CKPT_TIMING " + json.dumps({"op": name, "rank": int(rank), "s": dt}), flush=True)
            return out
        return wrapper

    loop.save_checkpoint = timed("save", loop.save_checkpoint)
    loop.load_checkpoint = timed("load", loop.load_checkpoint)
    return loop.main(argv)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def launch(layout: str, run_yaml: Path, out_dir: Path, steps: int) -> dict:
    cmd = [C.PY, "-m", "accelerate.commands.launch", "--config_file",
           str(C.REPO / "accelerate_configs" / LAYOUTS[layout]), "--num_processes", "2",
           "-m", "bench.checkpoint_cost", "--worker", "--config", str(run_yaml), "--max_steps", str(steps)]
    r = C.run_monitored(cmd, env_=C.env(1, DS_ACCELERATOR="cpu"), timeout=1800)
    text = r["stdout"] + r["stderr"]
    if r["rc"] != 0:
        raise RuntimeError(f"{layout} failed (rc {r['rc']}):\n{text[-4000:]}")
    if "world size 2" not in text:
        raise RuntimeError(f"{layout}: not a 2-process run")
    # Both ranks print to one pipe, and print() writes the text and its newline separately, so two records can
    # share a line: find each {...} after the marker instead of splitting lines.
    timings = [json.loads(m) for m in re.findall(r"CKPT_TIMING (\{[^{}]*\})", text)]
    r["timings"] = timings
    return r


def per_call(timings: list[dict], op: str) -> list[float]:
    """Slowest rank per call (calls are collective and happen in order on every rank)."""
    by_rank: dict[int, list[float]] = {}
    for t in timings:
        if t["op"] == op:
            by_rank.setdefault(t["rank"], []).append(t["s"])
    if not by_rank:
        return []
    return [max(vals) for vals in zip(*by_rank.values())]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="ddp,zero2,zero3")
    p.add_argument("--steps", type=int, default=4, help="steps (= checkpoints) of the first launch. Default: 4")
    p.add_argument("--repeats", type=int, default=2, help="launch pairs per layout, interleaved. Default: 2")
    p.add_argument("--max-wait", type=float, default=600)
    p.add_argument("--quiet-cores", type=float, default=0.5)
    p.add_argument("--write", type=Path, default=C.DOC_FILE)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(argv[1:])
    a = parse_args(argv)
    layouts = [x.strip() for x in a.layouts.split(",") if x.strip()]
    missing = [LAYOUTS[x] for x in layouts if not (C.REPO / "accelerate_configs" / LAYOUTS[x]).exists()]
    if missing:
        print(f"missing accelerate configs: {', '.join(missing)}", file=sys.stderr)
        return 2
    data = C.shards("bbc", "minilm")
    scratch = C.WORK / "checkpoint_runs"
    scratch.mkdir(parents=True, exist_ok=True)
    res = {x: {"save": [], "load": [], "bytes": [], "runs": []} for x in layouts}
    t0 = time.time()
    for rep in range(a.repeats):
        for layout in layouts:
            run_dir = Path(tempfile.mkdtemp(prefix=f"ckpt_{layout}_", dir=scratch))
            yaml = run_dir / "run.yaml"
            yaml.write_text(C.bertfit_yaml("minilm", data, run_dir / "out", a.steps,
                                         {"per_device_batch_size": 8, "save_every_steps": 1, "keep_last": 2,
                                          "resume": "auto", "log_every_steps": 1}))
            before = C.wait_for_quiet(a.quiet_cores, 15, a.max_wait)
            first = launch(layout, yaml, run_dir / "out", a.steps)
            ckpts = sorted((run_dir / "out" / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
            size = folder_bytes(ckpts[-1])
            second = launch(layout, yaml, run_dir / "out", a.steps + 1)
            for r in (first, second):
                r["before"] = before
                res[layout]["runs"].append({k: v for k, v in r.items() if k not in ("stdout", "stderr")})
            saves = per_call(first["timings"], "save")
            loads = per_call(second["timings"], "load")
            res[layout]["save"] += saves
            res[layout]["load"] += loads
            res[layout]["bytes"].append(size)
            C.log(f"{layout} rep {rep + 1}: saves {['%.2f' % s for s in saves]} loads {['%.2f' % s for s in loads]} "
                  f"size {size / 2**20:.0f} MiB")
            C.dump_json(C.WORK / "checkpoint_cost.json", res)
            shutil.rmtree(run_dir, ignore_errors=True)
    rows = []
    for layout in layouts:
        r = res[layout]
        rows.append([{"ddp": "DDP (cpu.yaml)", "zero2": "ZeRO-2 (zero2.yaml)", "zero3": "ZeRO-3 (zero3.yaml)"}[layout],
                     C.mmm(r["save"], "{:.2f}"), C.mmm(r["load"], "{:.2f}"), f"{C.med(r['bytes']) / 2**20:.0f}",
                     len(r["save"]), C.mmm([x["other_mean"] for x in r["runs"]], "{:.2f}")])
    runs = [x for layout in layouts for x in res[layout]["runs"]]
    body = C.header_block("python -m bench.checkpoint_cost", [
        f"MiniLM (22.7M params, fp32), 2 CPU processes x 1 thread, batch 8 per process, {a.steps} steps with "
        f"save_every_steps 1 then a resumed launch; {a.repeats} launch pairs per layout, interleaved",
        "save = `train.checkpoint.save_checkpoint` (accelerate save_state incl. optimizer, RNG, loop state, "
        "atomic rename, rotation); load = `load_checkpoint` (accelerate load_state + RNG); wall seconds of the "
        "collective call, slowest rank, median (min-max) over all calls", C.load_line(runs),
        f"total benchmark time {(time.time() - t0) / 60:.1f} min"]) + "\n\n" + C.table(
        ["layout", "save s", "load (resume) s", "checkpoint MiB", "saves timed", "other load (cores)"], rows)
    print(body)
    if not a.no_write:
        C.write_section("checkpoint_cost", "Checkpoint cost: DDP vs ZeRO-2/3 (2 CPU processes)", body, a.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
