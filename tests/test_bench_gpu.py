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


def test_bare_batches_worker_trains_on_bertfits_batches(tiny_model, prepared, tmp_path):
    """The loop reference runs (here on CPU) over the batches bertfit's first epoch makes, in order."""
    import numpy as np

    from data_prep.prepare import read_manifest
    from train.data import epoch_batches, load_split

    shards, _ = prepared
    result = tmp_path / "bare.json"
    assert G.worker_bare(str(tiny_model), 3, 4, str(result), str(shards), device="cpu") == 0
    r = json.loads(result.read_text())
    lengths = np.asarray(load_split(str(shards), "train", read_manifest(str(shards)))["length"])
    plan = epoch_batches(lengths, 4, 1, 0, 42, 0, 1, True)
    warm = G.WARMUP_LOGS * 10
    timed = plan.micro_batches[warm:warm + 3]
    assert r["steps"] == 3 and r["elapsed"] > 0
    assert r["real_tokens"] == int(sum(lengths[i].sum() for i in map(np.asarray, timed)))
    assert r["padded_tokens"] >= r["real_tokens"]
