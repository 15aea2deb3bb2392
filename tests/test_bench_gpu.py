"""bench/gpu_throughput.py without a GPU: the whole command end to end in --smoke mode (CPU, tiny model, every row
of both cases present in a well-formed results JSON), the time-budget rule, the pieces its numbers come from, and
that the GPU tables in docs/benchmarks.md are what the committed results files render to (no hand-edited numbers).
Never needs CUDA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import bench.gpu_throughput as G

REPO = Path(__file__).resolve().parents[1]
SMOKE_LIMIT_S = 240  # ~45-65 s on 2 cores; the limit only catches a hang


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run of the ONE command (module-scoped: the tests below read the same results)."""
    out = tmp_path_factory.mktemp("gpu_smoke") / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bench.gpu_throughput", "--smoke", "--out", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=SMOKE_LIMIT_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(out.read_text()), r.stdout, out, time.monotonic() - t0


def test_smoke_runs_every_row_and_writes_well_formed_json(smoke):
    data, stdout, out, wall = smoke
    assert data["format"] == G.FORMAT and data["smoke"] is True
    assert data["command"] == f"python -m bench.gpu_throughput --smoke --out {out}"
    expected = [f"{case}/{row}" for case in ("base512", "short") for row in G.CASE_ROWS[case]]
    assert [r["key"] for r in data["rows"]] == expected  # every row, in the report's order
    assert {r["row"] for r in data["rows"]} >= {"bertfit", "bertfit_compile", "bertfit_packing",
                                                  "bertfit_compile_packing", "bertfit_off", "bare", "trainer",
                                                  "trainer_grouped", "zero2"}
    for r in data["rows"]:
        if "compile" in r["row"]:  # CUDA-only here: present, skipped, with the reason
            assert r["status"] == "skipped" and r["reason"].startswith("no CUDA"), r
            assert "tokens_per_s" not in r  # never a made-up number
            continue
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and 0 <= r["padding_fraction"] < 1, r
        assert r["timed_steps"] == data["settings"]["steps"][r["case"]][1] == 2
        assert r["vs_trainer"] > 0 and "mfu" not in r  # no peak FLOP/s on CPU: no MFU
        assert np.isfinite(r["loss_last"])
    rows = {r["key"]: r for r in data["rows"]}
    # the switches really resolved as the rows say (the runs' own "bertfit: speedups:" lines)
    assert "packing (block-diagonal mask)" in rows["short/bertfit_packing"]["speedups_applied"]
    assert rows["short/bertfit_off"]["speedups_applied"] == "none"
    assert rows["base512/bertfit"]["speedups_applied"] == rows["base512/bare"]["speedups_applied"]
    assert rows["short/bertfit_packing"]["padding_fraction"] == 0  # packed: no padding at all
    assert rows["short/trainer"]["padding_fraction"] > 0.1  # DataCollatorWithPadding over random lengths
    assert rows["base512/zero2"]["world_size"] == 1 and rows["base512/zero2"]["vs_bertfit_step"] > 0
    assert rows["base512/trainer"]["vs_trainer"] == 1.0
    cases = data["cases"]
    assert cases["base512"]["max_len"] == cases["base512"]["median_len"] == 128  # smoke: 128-token windows
    assert cases["short"]["max_len"] <= 78 < 128
    goals = {g["row"]: g for g in data["derived"]["goals"]}
    assert set(goals) == {"base512/bertfit", "short/bertfit", "base512/zero2"}
    assert goals["base512/bertfit"]["met"] is None  # MFU needs a GPU's peak
    assert goals["base512/zero2"]["value"] == rows["base512/zero2"]["vs_bertfit_step"]
    # the printed report has one table line per row, and each row's log came back next to the JSON
    assert sum(1 for line in stdout.splitlines() if re.match(r"\| (bertfit|bare|trainer|zero2)", line)) == len(rows)
    logs = out.with_name("gpu_logs")
    assert {p.stem for p in logs.glob("*.log")} == {k.replace("/", "_") for k, r in rows.items()
                                                      if r["status"] == "ok"}
    assert G.report(data) in stdout


def test_rows_over_the_budget_are_skipped_not_estimated(tmp_path):
    """The deadline rule: a row whose estimate does not fit what is left is recorded as skipped, with the reason."""
    a = SimpleNamespace(smoke=False)
    data = {"rows": [{"key": "base512/bertfit", "case": "base512", "row": "bertfit", "status": "pending"}],
            "_t0": time.monotonic(), "cases": {}}
    runner = G.Runner(a, data, tmp_path, tmp_path, tmp_path / "r.json", deadline=time.monotonic() + 50)
    assert runner.estimate("base512", "bertfit") == G.ROW_S["bertfit"] + G.COMPILE_COLD_S
    runner.compiled.add(("base512", True))  # the inductor cache is warm for this layout now
    assert runner.estimate("base512", "bertfit") == G.ROW_S["bertfit"] + G.COMPILE_WARM_S
    assert runner.estimate("base512", "bertfit_off") == G.ROW_S["bertfit"]
    assert runner.skip_reason("base512", "trainer") is None
    assert runner.skip_reason("base512", "bertfit_compile").startswith("time budget: ~135 s expected")
    runner.run("base512/bertfit")
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert row["status"] == "skipped" and row["reason"].startswith("time budget")


def test_run_order_puts_the_goals_first_and_unknown_rows_fail_early():
    keys = G.row_keys(SimpleNamespace(cases="base512,short", rows=None))
    order = G.run_order(keys)
    assert sorted(order) == sorted(keys)
    assert order[:5] == ["base512/bertfit", "short/trainer", "short/bertfit", "base512/trainer", "base512/zero2"]
    assert order[-2:] == ["base512/bertfit_compile_packing", "short/bertfit_compile_packing"]
    extra = G.row_keys(SimpleNamespace(cases="base512", rows="bertfit,zero2:reduce_bucket_size=2e8"))
    assert G.run_order(extra) == ["base512/bertfit", "base512/zero2:reduce_bucket_size=2e8"]
    with pytest.raises(SystemExit, match="unknown row"):
        G.row_keys(SimpleNamespace(cases="base512", rows="bertfit,trainr"))
    with pytest.raises(SystemExit, match="unknown case"):
        G.row_keys(SimpleNamespace(cases="long", rows=None))
    with pytest.raises(SystemExit, match="DeepSpeed layout"):
        G.row_keys(SimpleNamespace(cases="base512", rows="ddp:reduce_bucket_size=1"))


def test_layout_variant_writes_a_deepspeed_copy_with_the_setting(tmp_path):
    assert G.layout_variant("zero2", tmp_path) == ("zero2", REPO / "accelerate_configs" / "zero2.yaml")
    base, yaml_path = G.layout_variant("zero3:reduce_bucket_size=5e7:overlap_comm=false", tmp_path)
    assert base == "zero3"
    ds_file = re.search(r"deepspeed_config_file:\s*(\S+)", yaml_path.read_text()).group(1)
    zero = json.loads(Path(ds_file).read_text())["zero_optimization"]
    assert zero["reduce_bucket_size"] == 50_000_000 and isinstance(zero["reduce_bucket_size"], int)
    assert zero["overlap_comm"] is False
    assert zero["stage"] == 3  # the rest of the shipped JSON is kept
    with pytest.raises(SystemExit, match="unknown layout"):
        G.layout_variant("zero9", tmp_path)


def test_history_rates_leave_out_the_warmup_and_weight_intervals_by_time(tmp_path):
    hist = tmp_path / "history.jsonl"
    recs = [{"step": 5, "train/tokens_per_s": 10.0, "train/samples_per_s": 1.0, "train/padding_fraction": 0.5,
             "train/loss": 1.0},  # warm-up (compile): left out
            {"step": 10, "train/tokens_per_s": 1000.0, "train/samples_per_s": 20.0, "train/padding_fraction": 0.0,
             "train/loss": 0.9},  # 5 steps x 4 windows = 20 windows in 1 s: 1000 tokens
            {"step": 15, "train/tokens_per_s": 500.0, "train/samples_per_s": 10.0, "train/padding_fraction": 0.5,
             "train/loss": 0.8},  # 20 windows in 2 s: 1000 tokens, as many padding tokens
            {"step": 15, "eval": {}}]
    hist.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    r = G.history_rates(hist, warmup=5, log_every=5, batch=4, world=1)
    assert r["tokens_per_s"] == pytest.approx(2000 / 3)  # not the mean of the two rates (750)
    assert r["step_ms"] == pytest.approx(300.0) and r["timed_steps"] == 10
    assert r["padding_fraction"] == pytest.approx(1 / 3) and r["loss_last"] == 0.8


def test_short_case_lengths_are_rotten_tomatoes_windows():
    committed = json.loads(G.RT_LENGTHS.read_text())
    pool = G.rt_lengths()
    assert len(pool) == committed["windows"] == sum(committed["counts"].values()) > 10_000
    assert np.median(pool) == committed["median"] == 26
    lengths = G.case_lengths("short", 3000, 512)
    assert abs(np.median(lengths) - 26) <= 1 and lengths.max() <= pool.max() and lengths.min() >= 3
    assert (G.case_lengths("base512", 7, 512) == 512).all()


def test_docs_sections_are_what_the_script_writes():
    """The GPU section is the pending note with the ONE command, followed by the old run's table; the commands in
    the docs and the script's docstring are the same."""
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    section = docs.split("<!-- gpu_throughput:start -->", 1)[1].split("<!-- gpu_throughput:end -->", 1)[0]
    body = G.docs_body(None, json.loads(G.PREVIOUS.read_text()))
    assert body in section
    assert "python -m bench.gpu_throughput --out $OUT/gpu.json" in G.__doc__
    assert "python -m bench.gpu_throughput --out $OUT/gpu.json" in G.PENDING


@pytest.mark.parametrize("results", sorted((REPO / "docs" / "results").glob("gpu_*.json")), ids=lambda p: p.stem)
def test_gpu_tables_in_docs_match_their_results_files(results):
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    table_rows = [line for line in G.report(json.loads(results.read_text())).splitlines() if line.startswith("| ")]
    assert len(table_rows) >= 4
    for row in table_rows:
        assert row in docs, f"docs/benchmarks.md lacks (or changed) this row of {results.name}: {row}"
