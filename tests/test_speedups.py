"""The speed switchboard (train/speedups.py) and what it switches on, proven on CPU in fp32 with dropout 0:

- packed (padding-free) batches give the same logits, loss and every parameter's gradient as padded ones
  (max abs difference <= 1e-5) for tiny BERT, RoBERTa, ELECTRA, DistilBERT and ModernBERT, single texts and
  pairs, through the block-diagonal mask and through the varlen attention function (its CPU reference kernel);
- a packed window's logits do not change when another window of the batch changes (no attention leak), and a
  deliberately broken mask is caught by the equivalence check;
- torch.compile (inductor) gives the same logits, loss and gradients as eager, and state_dict keys unchanged;
- token-budget batches: every window once per epoch, within the budget, a pure function of the arguments;
- the switchboard's resolution: auto per device, refused combinations, unpackable models fall back.
Real 2-process runs with packing / compile (train, resume, export) are in tests/test_train.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from train import packing
from train.data import collate_windows, epoch_batches, model_inputs, token_budget_cuts
from train.speedups import SpeedupsConfig, SpeedupsError, apply_speedups

TOL = 1e-5
ARCHS = ["bert", "roberta", "electra", "distilbert", "modernbert"]
WITH_TOKEN_TYPES = {"bert", "electra"}  # type_vocab_size 2: pairs carry segment ids


def tiny_classifier(arch: str, num_labels: int = 3):
    """A tiny random sequence classifier of ``arch`` in fp32 with every dropout at 0 (sdpa attention)."""
    from transformers import (AutoModelForSequenceClassification, BertConfig, DistilBertConfig, ElectraConfig,
                              ModernBertConfig, RobertaConfig)

    common = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  max_position_embeddings=128)
    config = {
        "bert": lambda: BertConfig(**common),
        "roberta": lambda: RobertaConfig(**{**common, "pad_token_id": 1, "max_position_embeddings": 130}),
        "electra": lambda: ElectraConfig(**{**common, "embedding_size": 16}),
        "distilbert": lambda: DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               num_labels=num_labels, dropout=0.0, attention_dropout=0.0,
                                               seq_classif_dropout=0.0, max_position_embeddings=128),
        # 3 layers, local window 8: its sliding-window layers see windows longer than their window
        "modernbert": lambda: ModernBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                               num_attention_heads=2, intermediate_size=64, num_labels=num_labels,
                                               max_position_embeddings=128, local_attention=8, pad_token_id=0,
                                               bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
                                               embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0,
                                               classifier_dropout=0.0),
    }[arch]()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").float()


def windows(arch: str, pairs: bool, lengths=(17, 5, 30, 9, 1 + 1)):
    rng = np.random.default_rng(len(lengths))
    ids = [rng.integers(5, 99, n) for n in lengths]
    rows = {"input_ids": ids, "label": [i % 3 for i in range(len(ids))], "doc_id": list(range(len(ids))),
            "chunk_index": [0] * len(ids)}
    if pairs and arch in WITH_TOKEN_TYPES:
        rows["token_type_ids"] = [np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.int64) for n in lengths]
    return rows


def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logits, loss, {parameter: gradient}) of one forward/backward."""
    model.zero_grad(set_to_none=True)
    logits = model(**model_inputs(batch, torch.device("cpu"))).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}


def assert_same(reference, got, what: str) -> None:
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = reference, got
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max() <= TOL, f"{what}: logits differ"
    assert (loss - ref_loss).abs() <= TOL, f"{what}: loss differs"
    assert set(grads) == set(ref_grads), f"{what}: other parameters got gradients"
    worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    assert worst <= TOL, f"{what}: gradients differ by {worst}"


def packed_copy(model, attention: str):
    packed = copy.deepcopy(model)
    packing.enable_packed_inputs(packed)
    if attention == "varlen":
        packing.use_varlen_attention(packed)  # on CPU its kernel is reference_varlen: one sdpa call per window
    return packed


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("attention", ["mask", "varlen"])
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_batches_give_the_logits_loss_and_gradients_of_padded_ones(arch, pairs, attention):
    model = tiny_classifier(arch)
    rows = windows(arch, pairs)
    indices = list(range(len(rows["input_ids"])))
    reference = outputs(model, collate_windows(rows, indices, pad_id=0))
    packed_batch = collate_windows(rows, indices, pad_id=0, pad_to_multiple_of=64, packed=True)
    assert packed_batch["input_ids"].shape == (1, 64)  # 62 real tokens + a pad tail of 2, its own segment
    assert outputs(packed_copy(model, attention), packed_batch)[0].shape == reference[0].shape
    assert_same(reference, outputs(packed_copy(model, attention), packed_batch), f"{arch} packed ({attention})")


def test_pack_rows_layout():
    batch = packing.pack_rows([[5, 6, 7], [8], [9, 10]], [[0, 0, 1], [0], [0, 1]], pad_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]  # restart in each window
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 0, 0, 1, 0, 0]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 6, 8]  # the pad tail is a segment of its own
    assert batch["window_starts"].tolist() == [0, 3, 4] and batch["max_seqlen"] == 3
    exact = packing.pack_rows([[5, 6], [7, 8]], None, pad_id=0, pad_to_multiple_of=None)
    assert exact["cu_seqlens"].tolist() == [0, 2, 4] and "token_type_ids" not in exact


@pytest.mark.parametrize("attention", ["mask", "varlen"])
@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_no_attention_leaks_across_packed_windows(arch, attention):
    """Changing every token of window 1 leaves the logits of windows 0 and 2 exactly as they were."""
    model = packed_copy(tiny_classifier(arch), attention).eval()
    rows = windows(arch, pairs=False, lengths=(12, 20, 7))
    changed = copy.deepcopy(rows)
    changed["input_ids"][1] = (changed["input_ids"][1] + 17) % 90 + 5
    with torch.no_grad():
        before = model(**model_inputs(collate_windows(rows, [0, 1, 2], 0, 16, packed=True), "cpu")).logits
        after = model(**model_inputs(collate_windows(changed, [0, 1, 2], 0, 16, packed=True), "cpu")).logits
    assert torch.equal(before[[0, 2]], after[[0, 2]])
    assert not torch.equal(before[1], after[1])


def test_a_leaking_packing_mask_fails_the_equivalence_check(monkeypatch):
    """The tests above would catch a broken mask: full attention over the packed row is detected."""
    model = tiny_classifier("bert")
    rows = windows("bert", pairs=False)
    indices = list(range(len(rows["input_ids"])))
    reference = outputs(model, collate_windows(rows, indices, pad_id=0))
    monkeypatch.setattr(packing, "packed_masks", lambda model, cu, length, dtype, device: None)  # attend to all
    broken = outputs(packed_copy(model, "mask"), collate_windows(rows, indices, 0, 64, packed=True))
    with pytest.raises(AssertionError, match="logits differ"):
        assert_same(reference, broken, "broken mask")


def test_unpadded_pack_of_a_single_window_equals_the_plain_forward():
    model = tiny_classifier("roberta").eval()
    rows = windows("roberta", pairs=False, lengths=(23,))
    with torch.no_grad():
        plain = model(**model_inputs(collate_windows(rows, [0], 1), "cpu")).logits
        packed = packed_copy(model, "mask")(**model_inputs(collate_windows(rows, [0], 1, packed=True), "cpu")).logits
    assert (plain - packed).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------ compile
@pytest.mark.slow
@pytest.mark.parametrize("arch,pairs", [("bert", True), ("roberta", False), ("electra", False),
                                        ("distilbert", False), ("modernbert", False)])
def test_compiled_model_gives_the_logits_loss_and_gradients_of_eager(arch, pairs):
    model = tiny_classifier(arch)
    compiled = copy.deepcopy(model)
    speed = apply_speedups(compiled, SpeedupsConfig(compile=True, packing=False, cls_only_last_layer=False,
                                                    cpu_dropout="stock", keep_freed_memory=False), torch.device("cpu"))
    assert any(name.startswith("compile") for name in speed.applied)
    rows = windows(arch, pairs)
    indices = list(range(len(rows["input_ids"])))
    batch = collate_windows(rows, indices, pad_id=0, **speed.batch_layout())
    assert batch["input_ids"].shape[1] == 64  # the width is bucketed
    assert_same(outputs(model, batch), outputs(compiled, batch), f"{arch} compiled")
    assert list(compiled.state_dict()) == list(model.state_dict())  # no _orig_mod. prefixes in checkpoints/exports


@pytest.mark.slow
def test_compiled_packed_model_gives_the_padded_eager_results():
    """compile + packing together (the CUDA default), here with the block-diagonal mask."""
    model = tiny_classifier("bert")
    fast = copy.deepcopy(model)
    speed = apply_speedups(fast, SpeedupsConfig(compile=True, packing=True), torch.device("cpu"))
    assert speed.packing and speed.pad_multiple == 64
    rows = windows("bert", pairs=True)
    indices = list(range(len(rows["input_ids"])))
    assert_same(outputs(model, collate_windows(rows, indices, 0)),
                outputs(fast, collate_windows(rows, indices, 0, **speed.batch_layout())), "bert compiled+packed")


# ------------------------------------------------------------------------------------------- token budget
def test_token_budget_batches_hold_every_window_once_within_the_budget():
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 60, size=500)
    budget = 200
    for world in (1, 2, 3):
        plans = [epoch_batches(lengths, None, world, r, seed=5, epoch=1, accumulation=2, max_tokens=budget)
                 for r in range(world)]
        assert len({p.steps for p in plans}) == 1  # the same number of optimizer steps on every rank
        assert all(len(p.micro_batches) == plans[0].steps * 2 for p in plans)
        seen = [i for p in plans for b in p.micro_batches for i in b]
        assert len(seen) == len(set(seen)) == len(lengths) - plans[0].dropped_windows
        for p in plans:
            for b in p.micro_batches:
                assert len(b) * lengths[b].max() <= budget
        again = epoch_batches(lengths, None, world, 0, seed=5, epoch=1, accumulation=2, max_tokens=budget)
        assert again.micro_batches == plans[0].micro_batches  # a pure function: resume recomputes it
        for step in range(plans[0].steps):  # every window weighs 1 / (the step's windows) in the gradient
            mine = [(p.loss_scale[k], len(p.micro_batches[k])) for p in plans for k in (2 * step, 2 * step + 1)]
            weights = [scale / (n * world * 2) for scale, n in mine for _ in range(n)]
            assert np.allclose(weights, 1 / len(weights))
    assert epoch_batches(lengths, 16, 2, 0, seed=5, epoch=1, accumulation=2).loss_scale is None  # fixed: means
    one = epoch_batches(lengths, None, 1, 0, seed=5, epoch=1, accumulation=2, max_tokens=budget)
    other_epoch = epoch_batches(lengths, None, 1, 0, seed=5, epoch=2, accumulation=2, max_tokens=budget)
    assert other_epoch.micro_batches != one.micro_batches  # reshuffled every epoch


def test_token_budget_cuts_never_split_or_drop_a_window():
    lengths = np.array([10, 50, 50, 5, 5, 5, 5, 100])
    cuts = token_budget_cuts(np.arange(8), lengths, 100)
    assert [c.tolist() for c in cuts] == [[0, 1], [2, 3], [4, 5, 6], [7]]


# ----------------------------------------------------------------------------------------- the switchboard
def test_auto_on_cpu_keeps_the_measured_cpu_tricks_and_leaves_compile_and_packing_off():
    model = tiny_classifier("bert")
    speed = apply_speedups(model, SpeedupsConfig(), torch.device("cpu"))
    assert not speed.packing and speed.pad_multiple is None and speed.compiled_model is None
    assert "cls_only_last_layer" in speed.applied
    assert any(name.startswith("cpu_dropout") for name in speed.applied)
    assert speed.summary().startswith("bertfit: speedups: ")


def test_everything_off_is_the_stock_model():
    model = tiny_classifier("bert")
    stock = copy.deepcopy(model)
    off = SpeedupsConfig(compile=False, packing=False, cls_only_last_layer=False, cpu_dropout="stock",
                         keep_freed_memory=False)
    speed = apply_speedups(model, off, torch.device("cpu"))
    assert speed.applied == [] and speed.summary() == "bertfit: speedups: none"
    assert "forward" not in vars(model) and model.config._attn_implementation == stock.config._attn_implementation
    assert all(type(a) is type(b) for a, b in zip(model.modules(), stock.modules()))


@pytest.mark.parametrize("settings,zero_stage,words", [
    (dict(compile=True), 3, "ZeRO-3"),
    (dict(packing=True, cls_only_last_layer=True), None, "cls_only_last_layer"),
    (dict(compile=True, cpu_dropout="kernels"), None, "cpu_dropout: kernels"),
])
def test_impossible_combinations_are_refused_in_one_line(settings, zero_stage, words):
    with pytest.raises(SpeedupsError, match=words) as info:
        apply_speedups(tiny_classifier("bert"), SpeedupsConfig(**settings), torch.device("cpu"),
                       zero_stage=zero_stage)
    assert "\n" not in str(info.value)


def test_a_model_that_cannot_be_packed_falls_back_to_padded_batches_with_a_notice():
    from transformers import AutoModelForSequenceClassification, DebertaV2Config

    config = DebertaV2Config(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    speed = apply_speedups(model, SpeedupsConfig(packing=True), torch.device("cpu"))
    assert not speed.packing and speed.batch_layout()["packed"] is False
    assert len(speed.notices) == 1 and "deberta" in speed.notices[0].lower()
    # auto on a device where packing would be on says nothing and packs nothing either
    assert packing.packing_problem(model) is not None


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_the_cuda_varlen_call_is_accepted_by_torch(arch, monkeypatch):
    """On CUDA the varlen path calls torch.nn.attention.varlen.varlen_attn; its arguments are checked here on
    CPU: torch must get as far as looking for the (CUDA-only) flash kernel, not reject the call itself."""
    model = packed_copy(tiny_classifier(arch), "varlen").eval()
    monkeypatch.setattr(packing, "varlen_kernel", lambda device: packing.torch_varlen)
    batch = collate_windows(windows(arch, pairs=False), [0, 1, 2, 3, 4], 0, 64, packed=True)
    with pytest.raises(NotImplementedError, match="_flash_attention_forward"):
        with torch.no_grad():
            model(**model_inputs(batch, "cpu"))


@pytest.mark.parametrize("problem", [None, "torch 2.8 has no torch.nn.attention.varlen.varlen_attn"])
def test_cuda_packing_uses_varlen_only_where_torch_has_it(problem, monkeypatch):
    """On CUDA + bf16, packing routes attention through torch's varlen_attn; a torch without it (or without its
    window_size) packs under the block-diagonal mask instead, with a notice, rather than failing at step 1."""
    monkeypatch.setattr(packing, "torch_varlen_problem", lambda: problem)
    model = tiny_classifier("bert")
    speed = apply_speedups(model, SpeedupsConfig(compile=False, packing=True), torch.device("cuda"),
                           mixed_precision="bf16", training=False)
    assert speed.packing
    varlen = model.config._attn_implementation == packing.VARLEN_ATTENTION
    assert varlen is (problem is None)
    assert ("packing (varlen FlashAttention)" in speed.applied) is (problem is None)
    assert any(problem in n for n in speed.notices) if problem else not speed.notices
