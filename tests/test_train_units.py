"""Unit tests of the loop's pieces: batch plans, LR schedule, pooling, weight decay groups, checkpoints, MFU."""

import json

import numpy as np
import pytest
import torch

from train.checkpoint import (LOOP_STATE, capture_rng, complete_checkpoints, latest_checkpoint,
                              remove_partial_checkpoints, restore_rng, rotate_checkpoints)
from train.data import WindowBatches, collate_windows, epoch_batches, eval_batches, steps_per_epoch
from train.evaluation import pool_documents, softmax
from train.optim import lr_at_step, param_groups, warmup_steps_for
from train.throughput import mfu, training_flops_per_token


def lengths(n=1000, seed=0):
    return np.random.default_rng(seed).integers(5, 512, size=n)


@pytest.mark.parametrize("world,acc", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_epoch_batches_partition_the_windows_evenly_across_ranks(world, acc):
    lens = lengths(997)
    plans = [epoch_batches(lens, 8, world, r, seed=1, epoch=0, accumulation=acc) for r in range(world)]
    counts = {len(p.micro_batches) for p in plans}
    assert counts == {plans[0].steps * acc}  # every rank runs the same number of micro-batches
    assert plans[0].steps == steps_per_epoch(len(lens), 8, world, acc)
    seen = np.concatenate([np.concatenate(p.micro_batches) for p in plans])
    assert len(seen) == len(set(seen.tolist()))  # no window twice
    assert len(seen) + plans[0].dropped_windows == len(lens)
    assert plans[0].dropped_windows < 8 * world * acc


def test_epoch_batches_are_deterministic_per_epoch_and_shuffled_between_epochs():
    lens = lengths()
    a = epoch_batches(lens, 8, 2, 0, seed=3, epoch=1, accumulation=1).micro_batches
    b = epoch_batches(lens, 8, 2, 0, seed=3, epoch=1, accumulation=1).micro_batches
    c = epoch_batches(lens, 8, 2, 0, seed=3, epoch=2, accumulation=1).micro_batches
    assert a == b and a != c


def test_length_grouping_cuts_padding():
    lens = lengths(4000)

    def padding(grouped):
        plan = epoch_batches(lens, 16, 1, 0, seed=0, epoch=0, accumulation=1, length_grouping=grouped)
        real = sum(lens[b].sum() for b in plan.micro_batches)
        padded = sum(len(b) * lens[b].max() for b in plan.micro_batches)
        return 1 - real / padded

    assert padding(True) < 0.05 < padding(False)
    # batches are still shuffled: consecutive batches are not sorted by length over the epoch
    plan = epoch_batches(lens, 16, 1, 0, seed=0, epoch=0, accumulation=1)
    maxes = [lens[b].max() for b in plan.micro_batches]
    assert maxes != sorted(maxes) and maxes != sorted(maxes, reverse=True)


def test_ranks_of_one_step_get_similar_lengths():
    lens = lengths(4000)
    p0, p1 = (epoch_batches(lens, 16, 2, r, seed=0, epoch=0, accumulation=1).micro_batches for r in (0, 1))
    diffs = [abs(int(lens[a].max()) - int(lens[b].max())) for a, b in zip(p0, p1)]
    assert np.median(diffs) < 20  # no rank waits long for a peer with much longer windows


def test_eval_batches_cover_each_window_exactly_once_and_every_rank_runs_as_many_batches():
    for n, batch_size, world in ((103, 5, 2), (7, 32, 2), (3, 1, 4), (40, 10, 4)):
        lens = lengths(n)
        per_rank = [eval_batches(lens, batch_size, world, r) for r in range(world)]
        assert len({len(batches) for batches, _ in per_rank}) == 1  # the same number of forward passes
        real = sorted(i for batches, kept in per_rank for b in batches[:kept] for i in b)
        assert real == list(range(n))  # the batches whose outputs count hold every window exactly once
        assert all(len(b) == 1 for batches, kept in per_rank for b in batches[kept:])  # fillers are one window


def test_collate_pads_dynamically():
    rows = {"input_ids": [[2, 5, 6, 3], [2, 7, 3]], "label": [1, 0], "doc_id": [4, 9], "chunk_index": [0, 2],
            "token_type_ids": [[0, 0, 1, 1], [0, 0, 1]]}
    b = collate_windows(rows, [10, 11], pad_id=0)
    assert b["input_ids"].tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert b["real_tokens"] == 7 and b["padded_tokens"] == 8 and b["rows"].tolist() == [10, 11]
    assert collate_windows(rows, [0, 1], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_window_batches_arrow_path_matches_datasets_indexing(tmp_path):
    """The zero-copy Arrow gathering gives exactly the batch that plain `datasets` indexing gives, across record
    batches (saved in several small shards) and with token_type_ids; a shuffled view falls back to indexing."""
    import datasets
    rng = np.random.default_rng(1)
    n = 300
    ids = [rng.integers(5, 1000, size=rng.integers(1, 40)).tolist() for _ in range(n)]
    ds = datasets.Dataset.from_dict({
        "input_ids": ids, "token_type_ids": [[i % 2 for i in range(len(x))] for x in ids],
        "label": rng.integers(0, 3, size=n).tolist(), "doc_id": list(range(n)), "chunk_index": [0] * n,
        "length": [len(x) for x in ids]})
    ds.save_to_disk(str(tmp_path / "d"), max_shard_size="4KB")
    ds = datasets.load_from_disk(str(tmp_path / "d"))
    assert len(ds.data.table.column("input_ids").chunks) > 1  # really spans several record batches
    fast = WindowBatches(ds, pad_id=0, pad_to_multiple_of=8)
    assert fast._arrow is not None
    for indices in ([0], [299, 3, 150, 3], rng.permutation(n)[:64].tolist()):
        want = collate_windows(ds.select_columns(fast.columns)[indices], indices, pad_id=0, pad_to_multiple_of=8)
        got = fast[indices]
        assert got.keys() == want.keys()
        for k in want:
            assert (torch.equal(got[k], want[k]) if torch.is_tensor(want[k]) else got[k] == want[k]), k
    import pickle  # as a DataLoader worker gets it
    copy = pickle.loads(pickle.dumps(fast))
    assert copy._arrow is not None and torch.equal(copy[[5, 7]]["input_ids"], fast[[5, 7]]["input_ids"])
    shuffled = ds.shuffle(seed=0)
    slow = WindowBatches(shuffled, pad_id=0)
    assert slow._arrow is None
    assert slow[[0, 1]]["doc_ids"].tolist() == shuffled[[0, 1]]["doc_id"]


def test_lr_schedule_shape():
    total, warmup, peak = 20, 4, 1.0
    lrs = [lr_at_step(s, total, warmup, peak) for s in range(1, total + 1)]
    assert lrs[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lrs[-1] == 1 / 16 and min(lrs) > 0  # the last step still moves the weights ...
    assert lr_at_step(total + 1, total, warmup, peak) == 0.0  # ... the decay reaches 0 one step after it
    assert np.allclose(np.diff(lrs[4:]), -1 / 16)
    assert warmup_steps_for(10, None, 0.25) == 3 and warmup_steps_for(3, 5, 0.0) == 2


def test_a_one_step_run_trains_at_the_peak_learning_rate():
    assert lr_at_step(1, 1, 0, 3e-5) == 3e-5  # max_steps: 1 used to run at lr 0 and change no weight
    assert lr_at_step(1, 1, warmup_steps_for(1, None, 0.5), 3e-5) == 3e-5


def test_no_weight_decay_on_biases_and_layernorm(tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay_names)
    assert any("LayerNorm.weight" in n for n in no_decay_names)
    assert all(not (names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)]) for p in decay["params"])


def test_pool_documents_mean_and_max():
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    docs = np.array([5, 5, 2, 5])
    ids, mean = pool_documents(softmax(logits), docs, "single_label", "mean")
    assert ids.tolist() == [2, 5]
    assert np.allclose(mean[0], [0.6, 0.4]) and np.allclose(mean[1], [(0.9 + 0.2 + 0.3) / 3, (0.1 + 0.8 + 0.7) / 3])
    _, mx = pool_documents(softmax(logits), docs, "single_label", "max")
    assert np.allclose(mx[1], np.array([0.9, 0.8]) / 1.7)
    assert np.allclose(softmax(logits).sum(1), 1)


def _fake_ckpt(root, step, complete=True):
    d = root / "checkpoints" / (f"step-{step}" if complete else f".step-{step}.tmp")
    d.mkdir(parents=True)
    if complete:
        (d / LOOP_STATE).write_text(json.dumps({"global_step": step}))
    return d


def test_latest_checkpoint_rotation_and_partials(tmp_path):
    for s in (5, 20, 100):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 200, complete=False)
    (tmp_path / "checkpoints" / "step-300").mkdir()  # no loop_state.json: never completed
    assert latest_checkpoint(tmp_path).name == "step-100"  # by number, not by name (step-20 > step-100)
    rotate_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-20", "step-100"]
    assert remove_partial_checkpoints(tmp_path) == [".step-200.tmp"]
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_rng_state_round_trip():
    import random

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = json.loads(json.dumps(capture_rng()))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_mfu_matches_a_hand_calculation():
    # BERT-base: 12 layers, hidden 768, FFN 3072, seq 512.
    # matmul weights per layer: 4*768^2 + 2*768*3072 = 2,359,296 + 4,718,592 = 7,077,888; x12 = 84,934,656
    # 6 x 84,934,656 = 509,607,936; attention 12 x 12 x 768 x 512 = 56,623,104; total 566,231,040 FLOPs/token
    assert training_flops_per_token(12, 768, 3072, 512) == 566_231_040
    # 100k tokens/s on 2 devices of 100 TFLOP/s peak: 100e3 * 566,231,040 / 200e12 = 0.28311552
    assert mfu(100_000, 566_231_040, 100.0, 2) == pytest.approx(0.28311552)


@pytest.mark.parametrize("plugin, processes, hinted", [(object(), 1, True), (object(), 2, False), (None, 1, False)])
def test_single_process_zero_hint_only_for_one_deepspeed_process(plugin, processes, hinted):
    from types import SimpleNamespace

    from train.distributed import single_process_zero_hint

    fake = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes)
    hint = single_process_zero_hint(fake)
    assert (hint is not None) == hinted
    if hinted:
        assert "1 process" in hint and "single_gpu.yaml" in hint and "\n" not in hint


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    import os
    import time

    from train.build_extensions import STALE_LOCK_S, remove_stale_locks

    stale, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "bertfit_cpu_dropout" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    remove_stale_locks(tmp_path)
    assert not stale.exists() and live.exists()
