"""bench/gpu_throughput.py pieces that run without a GPU: layout variants, the ZeRO-3 export check, and that the
GPU tables in docs/benchmarks.md are what the committed results files render to (no hand-edited numbers)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bench.gpu_throughput as G

REPO = Path(__file__).resolve().parents[1]


def test_layout_variant_writes_a_deepspeed_copy_with_the_setting(tmp_path):
    assert G.layout_variant("zero2", tmp_path) == ("zero2", None)
    base, yaml_path = G.layout_variant("zero3:reduce_bucket_size=5e7:overlap_comm=false", tmp_path)
    assert base == "zero3"
    ds_file = re.search(r"deepspeed_config_file:\s*(\S+)", yaml_path.read_text()).group(1)
    zero = json.loads(Path(ds_file).read_text())["zero_optimization"]
    assert zero["reduce_bucket_size"] == 50_000_000 and isinstance(zero["reduce_bucket_size"], int)
    assert zero["overlap_comm"] is False
    assert zero["stage"] == 3  # the rest of the shipped JSON is kept
    with pytest.raises(SystemExit, match="unknown layout"):
        G.layout_variant("zero9", tmp_path)
    with pytest.raises(SystemExit, match="DeepSpeed layout"):
        G.layout_variant("single_gpu:reduce_bucket_size=1", tmp_path)


def test_check_export_counts_wrong_and_empty_tensors(tiny_model, tmp_path):
    good = G.check_export(tiny_model, tiny_model)
    assert good["tensors"] > 10 and good["wrong_shape"] == 0 and good["empty"] == 0
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.dim() == 2)
    weights[name] = torch.empty(0)  # what a careless ZeRO-3 export writes: a placeholder for a partitioned weight
    save_file(weights, str(broken / "model.safetensors"))
    bad = G.check_export(broken, tiny_model)
    assert bad["empty"] == 1 and bad["wrong_shape"] == 1


@pytest.mark.parametrize("results", sorted((REPO / "docs" / "results").glob("gpu_*.json")), ids=lambda p: p.stem)
def test_gpu_tables_in_docs_match_their_results_files(results):
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    table_rows = [line for line in G.report(json.loads(results.read_text())).splitlines() if line.startswith("| ")]
    assert len(table_rows) >= 4
    for row in table_rows:
        assert row in docs, f"docs/benchmarks.md lacks (or changed) this row of {results.name}: {row}"
