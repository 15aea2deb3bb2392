"""Padding: the share of processed (padded) token positions that are padding, with and without length grouping.

    python -m bench.padding               # plans + short cross-check runs (~5 min), writes docs/benchmarks.md
    python -m bench.padding --no-runs     # batch plans only (seconds)

From the batch plans (no training): bertfit's ``epoch_batches`` over the train split of BBC news (256-token
windows) and Rotten Tomatoes (short reviews), batch 16, for 1 and 2 processes, grouping on and off, over
several epochs (each epoch is shuffled differently); padding = 1 - real tokens / (rows x padded width) summed
over all micro-batches. For reference, HF Trainer's samplers (``RandomSampler``-like shuffle and
``LengthGroupedSampler``) are cut into batches of 16 and padded to the longest the same way
(``DataCollatorWithPadding``), and bertfit's GPU setting (width rounded up to a multiple of 8).

Cross-check: a short real ``python -m train`` run (MiniLM, 1 process, logging once at the last step so the logged
train/padding_fraction aggregates all its steps) against the plan's padding for exactly the steps it ran.
Padding does not depend on machine load; the runs are short and only their logged fraction is used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as C  # noqa: E402

BATCH, SEED = C.BATCH, C.SEED


def plan_padding(lengths: np.ndarray, batches, multiple: int | None = None) -> tuple[float, int, int]:
    real = padded = 0
    for b in batches:
        lb = lengths[np.asarray(b)]
        width = int(lb.max())
        if multiple:
            width = -(-width // multiple) * multiple
        real += int(lb.sum())
        padded += len(lb) * width
    return 1 - real / padded, real, padded


def bertfit_batches(lengths, world: int, grouped: bool, epoch: int):
    from train.data import epoch_batches

    out = []
    for rank in range(world):
        out += epoch_batches(lengths, BATCH, world, rank, SEED, epoch, 1, grouped).micro_batches
    return out


def hf_batches(lengths, grouped: bool, epoch: int):
    import torch

    g = torch.Generator().manual_seed(SEED + epoch)
    if grouped:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        order = list(LengthGroupedSampler(BATCH, lengths=lengths.tolist(), generator=g))
    else:
        order = torch.randperm(len(lengths), generator=g).tolist()
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]


def plans(lengths: np.ndarray, epochs: int) -> list[dict]:
    rows = []

    def add(name, fn, multiple=None):
        real = padded = 0
        per_epoch = []
        for e in range(epochs):
            p, r, pd = plan_padding(lengths, fn(e), multiple)
            real, padded = real + r, padded + pd
            per_epoch.append(p)
        rows.append({"name": name, "padding": 1 - real / padded, "min": min(per_epoch), "max": max(per_epoch)})

    add("bertfit, grouped, 1 process", lambda e: bertfit_batches(lengths, 1, True, e))
    add("bertfit, grouped, 2 processes", lambda e: bertfit_batches(lengths, 2, True, e))
    add("bertfit, grouped, 1 process, width rounded to x8 (GPU)", lambda e: bertfit_batches(lengths, 1, True, e), 8)
    add("bertfit, not grouped (length_grouping: false)", lambda e: bertfit_batches(lengths, 1, False, e))
    add("HF Trainer default (random sampler)", lambda e: hf_batches(lengths, False, e))
    add("HF Trainer group_by_length (LengthGroupedSampler)", lambda e: hf_batches(lengths, True, e))
    return rows


def cross_check(kind: str, steps: int, grouped: bool, scratch: Path) -> dict:
    """A real run's logged padding over `steps` steps vs the plan's padding for the same micro-batches."""
    from train.data import epoch_batches

    data = C.shards(kind, "minilm")
    lengths = _lengths(data)
    run_dir = Path(tempfile.mkdtemp(prefix=f"pad_{kind}_", dir=scratch))
    (run_dir / "run.yaml").write_text(C.bertfit_yaml("minilm", data, run_dir / "out", steps,
                                                   {"log_every_steps": steps, "length_grouping": grouped}))
    before = C.wait_for_quiet(99, 15, 0)  # load is recorded, not waited for: padding does not depend on it
    r = C.run_monitored([C.PY, "-m", "train", "--config", str(run_dir / "run.yaml")], env_=C.env(2))
    if r["rc"] != 0:
        raise RuntimeError(r["stderr"][-3000:])
    recs = [json.loads(x) for x in (run_dir / "out" / "logs" / "history.jsonl").read_text().splitlines()]
    logged = [x for x in recs if "train/padding_fraction" in x][-1]["train/padding_fraction"]
    plan = epoch_batches(lengths, BATCH, 1, 0, SEED, 0, 1, grouped).micro_batches[:steps]
    predicted = plan_padding(lengths, plan)[0]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"kind": kind, "steps": steps, "grouped": grouped, "logged": logged, "plan": predicted,
            "load1": before["load1"], "wall_s": r["wall_s"]}


def _lengths(data: Path) -> np.ndarray:
    from data_prep.prepare import read_manifest
    from train.data import load_split

    return np.asarray(load_split(data, "train", read_manifest(data))["length"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.padding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="epochs of batch plans per line. Default: 5")
    p.add_argument("--no-runs", action="store_true", help="skip the real-run cross-check")
    p.add_argument("--bbc-steps", type=int, default=20, help="steps of the BBC cross-check runs. Default: 20")
    p.add_argument("--rt-steps", type=int, default=60, help="steps of the Rotten Tomatoes runs. Default: 60")
    p.add_argument("--write", type=Path, default=C.DOC_FILE)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    datasets_ = {"bbc": "BBC news, 256-token windows (MiniLM WordPiece)",
                 "rt": "Rotten Tomatoes reviews (MiniLM WordPiece, fresh/rotten)"}
    out = [C.header_block("python -m bench.padding" + (" --no-runs" if a.no_runs else ""), [
        f"batch {BATCH}, seed {SEED}, train split; padding = 1 - real tokens / padded positions, summed over "
        f"all micro-batches of {a.epochs} epochs (min-max over the single epochs in brackets); bertfit groups "
        f"by length inside mega-batches of 50 x processes x batch windows (train/data.py MEGA_BATCH_STEPS)"])]
    checks = []
    scratch = C.WORK / "padding_runs"
    scratch.mkdir(parents=True, exist_ok=True)
    for kind, title in datasets_.items():
        lengths = _lengths(C.shards(kind, "minilm"))
        rows = plans(lengths, a.epochs)
        pct = np.percentile(lengths, [10, 50, 90])
        out += ["", f"**{title}**: {len(lengths):,} windows, length median {pct[1]:.0f} (p10 {pct[0]:.0f}, "
                    f"p90 {pct[2]:.0f}, max {lengths.max()}), mean {lengths.mean():.1f}", "",
                C.table(["batches", "padding", "per epoch min-max"],
                        [[r["name"], f"{r['padding']:.2%}", f"{r['min']:.2%}-{r['max']:.2%}"] for r in rows])]
        g = rows[0]["padding"]
        out += ["", f"Goal (<= 5% padding with grouping): {'met' if g <= 0.05 else 'missed'} ({g:.2%})."]
        if not a.no_runs:
            for grouped in (True, False):
                c = cross_check(kind, a.bbc_steps if kind == "bbc" else a.rt_steps, grouped, scratch)
                C.log(f"cross-check {c}")
                checks.append(c)
    if checks:
        out += ["", "**Cross-check against real runs** (`python -m train`, MiniLM, 1 process, log_every_steps = "
                    "max_steps so the one logged train/padding_fraction covers every step):", "",
                C.table(["data", "length_grouping", "steps", "logged train/padding_fraction",
                         "plan, same micro-batches", "load1 at start"],
                        [[c["kind"], c["grouped"], c["steps"], f"{c['logged']:.4%}", f"{c['plan']:.4%}",
                          f"{c['load1']:.2f}"] for c in checks])]
    body = "\n".join(out)
    print(body)
    if not a.no_write:
        C.write_section("padding", "Padding with and without length grouping", body, a.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
