"""The document objective (train/document.py, objective: document): document batches, the document head's
logits against a hand computation, padded vs packed, and real 2-process / ZeRO-2 runs that resume and export."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from tests.launch import assert_two_ranks, run, tail, train_command, train_env, train_records, write_config
from tests.test_speedups import tiny_classifier
from tests.test_tasks import check_evaluate_matches_training
from tests.test_train import _assert_export_predicts, _kill_and_resume, assert_same_run, base_config, launch_run
from train.data import (_deal_steps, collate_windows, document_epoch_batches, document_windows, model_inputs,
                        with_documents)
from train.document import attach_document_head, pool_and_classify
from train.heads import head_logits
from train.losses import loss_unit_labels, make_loss
from train.packing import enable_packed_inputs


def random_documents(n_docs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, size=n_docs)
    doc_ids = np.repeat(np.arange(n_docs) * 3 + 5, counts)  # ids need not be 0..D-1
    chunk = np.concatenate([rng.permutation(c) for c in counts])  # windows stored out of reading order
    lengths = rng.integers(4, 40, size=len(doc_ids))
    return doc_ids, chunk, lengths


# ---------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("cap", [None, 2])
@pytest.mark.parametrize("max_tokens,batch_size", [(None, 9), (160, None)])
def test_document_batches_hold_every_window_of_a_document_once_and_never_split_it(cap, max_tokens, batch_size):
    doc_ids, chunk, lengths = random_documents(120)
    docs = document_windows(doc_ids, chunk)
    assert all(np.all(np.diff(chunk[w]) > 0) for w in docs)  # reading order
    for world in (1, 2):
        plans = [document_epoch_batches(docs, lengths, batch_size, world, r, seed=3, epoch=1, accumulation=2,
                                        max_tokens=max_tokens, windows_per_doc=cap) for r in range(world)]
        assert len({p.steps for p in plans}) == 1 and all(len(p.micro_batches) == 2 * plans[0].steps for p in plans)
        seen_docs = []
        for p in plans:
            for batch in p.micro_batches:
                batch_docs = doc_ids[batch]
                for d in np.unique(batch_docs):
                    windows = np.asarray(batch)[batch_docs == d]
                    whole = docs[(d - 5) // 3]
                    if cap is None or len(whole) <= cap:
                        assert sorted(windows.tolist()) == sorted(whole.tolist())  # all of it, here only
                    else:
                        assert len(windows) == cap and set(windows) <= set(whole.tolist())
                    seen_docs.append(int(d))
        assert len(seen_docs) == len(set(seen_docs))  # never split across micro-batches or ranks
        again = document_epoch_batches(docs, lengths, batch_size, world, 0, seed=3, epoch=1, accumulation=2,
                                       max_tokens=max_tokens, windows_per_doc=cap)
        assert again.micro_batches == plans[0].micro_batches  # a pure function: resume recomputes it
    if cap is not None:  # the sample changes between epochs
        samples = [document_epoch_batches(docs, lengths, batch_size, 1, 0, seed=3, epoch=e, accumulation=1,
                                          max_tokens=max_tokens, windows_per_doc=cap).micro_batches
                   for e in (1, 2)]
        assert sorted(map(sorted, samples[0])) != sorted(map(sorted, samples[1]))


def test_balanced_class_weights_count_documents_under_the_document_objective():
    # class 0: one document of 6 windows; class 1: two documents of 1 window. Per window class 0 is the
    # majority (6 vs 2); per document it is the minority (1 vs 2), and the document loss sees documents.
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    docs = document_windows(np.array([0, 0, 0, 0, 0, 0, 1, 2]), np.array([0, 1, 2, 3, 4, 5, 0, 0]))
    assert loss_unit_labels(labels, None).tolist() == labels.tolist()
    assert loss_unit_labels(labels, docs).tolist() == [0, 1, 1]
    logits, target = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.0]]), torch.tensor([0, 1, 1])
    for docs_or_none, weight in ((docs, [1.5, 0.75]), (None, [8 / 12, 8 / 4])):  # sklearn's 'balanced'
        loss = make_loss("single_label", ["a", "b"], loss_unit_labels(labels, docs_or_none), "balanced", None, None)
        assert float(loss(logits, target)) == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor(weight))), abs=1e-6)


def test_an_epoch_without_an_optimizer_step_is_refused_at_start_up_not_a_hang():
    """Documents of 2, 3 and 2 windows, batches of 4 windows, accumulation 3: the micro-batch count depends on
    the epoch's document order, and epoch 1 makes fewer than 3 (0 steps): the loop would never leave it."""
    from types import SimpleNamespace

    from train.config import ConfigError
    from train.loop import epoch_plan, schedule_length

    sizes = [2, 3, 2]
    docs = document_windows(np.repeat(np.arange(3), sizes), np.concatenate([np.arange(n) for n in sizes]))
    cfg = SimpleNamespace(per_device_batch_size=4, gradient_accumulation_steps=3, length_grouping=False,
                          max_tokens_per_batch=None, train_windows_per_doc=None, seed=1, epochs=3, max_steps=None,
                          train_split="train")
    lengths = np.full(7, 10)
    assert [epoch_plan(cfg, lengths, docs, 1, 0, e).steps for e in range(3)] == [1, 0, 1]
    with pytest.raises(ConfigError, match="'train': epoch 1 would have no optimizer step \\(3 documents"):
        schedule_length(cfg, lengths, docs, 1)
    cfg.epochs = 1  # epoch 0 alone is fine
    assert schedule_length(cfg, lengths, docs, 1) == (1, 1)


@pytest.mark.parametrize("pooler", ["mean", "max", "attention"])
def test_pooling_many_documents_groups_them_by_size_and_equals_pooling_each_alone(pooler):
    """One 30-window document among short ones: each pooler call's padded block stays within the slot budget
    (or is one document), and every document's logits equal its windows pooled on their own."""
    model = tiny_classifier("bert").eval()
    attach_document_head(model, pooler)
    head = getattr(model, "bertfit_doc_pooler")
    if pooler == "attention":
        with torch.no_grad():
            head.score.weight.normal_()
    sizes = [1] * 20 + [30] + [3] * 5 + [2] * 4
    rng = np.random.default_rng(0)
    doc_index = torch.from_numpy(rng.permutation(np.repeat(np.arange(len(sizes)), sizes)))  # windows interleaved
    states = torch.randn(len(doc_index), model.config.hidden_size)
    blocks, forward = [], head.forward

    def recording(s, index, num_docs):
        blocks.append((num_docs, int(torch.bincount(index).max())))
        return forward(s, index, num_docs)

    head.forward = recording
    window_logits, doc_logits = pool_and_classify(model, states, doc_index, len(sizes), slots_per_group=12,
                                                  windows_per_call=7)
    assert all(docs * widest <= 12 or docs == 1 for docs, widest in blocks) and (1, 30) in blocks
    assert sum(docs for docs, _ in blocks) == len(sizes)
    head.forward = forward
    with torch.no_grad():
        for d in range(len(sizes)):
            mine = states[doc_index == d]
            alone = head_logits(model, head(mine, torch.zeros(len(mine), dtype=torch.long), 1))
            assert (doc_logits[d] - alone[0]).abs().max() <= 1e-5, d
        assert (window_logits - head_logits(model, states)).abs().max() <= 1e-5


@pytest.mark.parametrize("max_tokens,batch_size", [(None, 9), (160, None)])
def test_every_document_weighs_the_same_in_its_optimizer_step(max_tokens, batch_size):
    """A unit's gradient weight is loss_scale / (its micro-batch's units x world x accumulation) (the batch mean,
    then DDP's and accumulation's averaging): it must be 1 / (the step's documents) for every document."""
    doc_ids, chunk, lengths = random_documents(120)
    docs = document_windows(doc_ids, chunk)
    world, accumulation = 2, 2
    plans = [document_epoch_batches(docs, lengths, batch_size, world, r, seed=3, epoch=1, accumulation=accumulation,
                                    max_tokens=max_tokens) for r in range(world)]
    doc_of = np.empty(len(doc_ids), dtype=int)
    for d, windows in enumerate(docs):
        doc_of[windows] = d
    sizes = set()
    for step in range(plans[0].steps):
        weights = []
        for plan in plans:
            for k in range(step * accumulation, (step + 1) * accumulation):
                n_docs = len(set(doc_of[plan.micro_batches[k]]))
                sizes.add(n_docs)
                weights += [plan.loss_scale[k] / (n_docs * world * accumulation)] * n_docs
        assert np.allclose(weights, 1 / len(weights)), step
    assert len(sizes) > 1  # the micro-batches really held different numbers of documents


def test_loss_scales_make_a_step_the_mean_over_its_documents_for_a_real_model():
    model = tiny_classifier("bert")
    attach_document_head(model, "attention")
    with torch.no_grad():
        model.bertfit_doc_pooler.score.weight.normal_()
    rng = np.random.default_rng(2)
    ids = [rng.integers(5, 99, n) for n in (12, 7, 20, 9, 15, 11)]
    rows = {"input_ids": ids, "label": [1, 1, 1, 1, 0, 1], "doc_id": [0, 0, 0, 0, 1, 2],
            "chunk_index": [0, 1, 2, 3, 0, 0]}
    micro = [np.array([0, 1, 2, 3]), np.array([4, 5])]  # 1 document of 4 windows; 2 of 1
    plan = _deal_steps(micro, 6, np.random.default_rng(0), 1, 0, 2, units=[1, 2])
    model.eval()  # no dropout: the two computations must agree exactly

    def grads_of(batches_and_scales):
        model.zero_grad()
        for windows, scale in batches_and_scales:
            batch = with_documents(collate_windows(rows, list(windows), pad_id=0))
            loss = torch.nn.functional.cross_entropy(model(**model_inputs(batch, "cpu")).logits, batch["labels"])
            (loss * scale / 2).backward()  # / accumulation, as accelerator.backward does
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    scaled = grads_of(zip(map(np.array, plan.micro_batches), plan.loss_scale))
    together = grads_of([(np.arange(6), 2.0)])  # one batch of all 3 documents: their mean loss (x 2 / 2)
    assert sorted(plan.loss_scale) == pytest.approx([2 / 3, 4 / 3])
    assert max((a - b).abs().max() for a, b in zip(scaled, together)) <= 1e-5


def test_a_document_larger_than_one_micro_batch_trains_on_a_sample_or_its_cap_is_refused():
    """train_windows_per_doc null: cut to what one micro-batch holds (the run goes on); an explicit cap that
    does not fit is refused at start-up with the cap that would (never an over-budget micro-batch)."""
    from types import SimpleNamespace

    from train.config import ConfigError
    from train.loop import check_documents_fit, windows_one_batch_holds

    sizes = [2, 40, 3]
    doc_ids = np.repeat(np.array(["a", "long", "c"]), sizes)
    docs = document_windows(np.repeat(np.arange(3), sizes), np.concatenate([np.arange(n) for n in sizes]))
    lengths = np.full(45, 100)
    cfg = SimpleNamespace(train_windows_per_doc=30, max_tokens_per_batch=None, per_device_batch_size=16,
                          train_split="train")
    with pytest.raises(ConfigError, match="document 'long' of split 'train' trains 30 windows .* "
                                          "per_device_batch_size 16 .* train_windows_per_doc: 16"):
        check_documents_fit(cfg, docs, lengths, doc_ids)
    cfg.max_tokens_per_batch = 1000
    with pytest.raises(ConfigError, match="max_tokens_per_batch 1000 .* train_windows_per_doc: 10 "):
        check_documents_fit(cfg, docs, lengths, doc_ids)
    for max_tokens, batch_size, fits in ((None, 16, 16), (1000, 16, 10), (1050, 4, 10)):
        cfg.max_tokens_per_batch, cfg.per_device_batch_size = max_tokens, batch_size
        cfg.train_windows_per_doc = windows_one_batch_holds(cfg, lengths)
        assert cfg.train_windows_per_doc == fits
        check_documents_fit(cfg, docs, lengths, doc_ids)
        plan = document_epoch_batches(docs, lengths, batch_size, 1, 0, 0, 0, 1, True, max_tokens, fits)
        trained = np.concatenate(plan.micro_batches)
        assert len(trained) == 2 + fits + 3 and max(len(m) for m in plan.micro_batches) <= fits  # 'long' sampled


def test_document_settings_with_the_window_objective_are_refused():
    from train.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="train_windows_per_doc is for objective: document"):
        parse_config(["--model", "m", "--data", "d", "--output_dir", "o", "--train_windows_per_doc", "4",
                      "--objective", "window"])
    cfg = parse_config(["--model", "m", "--data", "d", "--output_dir", "o", "--train_windows_per_doc", "4",
                        "--objective", "document"])
    assert cfg.train_windows_per_doc == 4


def test_a_damaged_document_head_is_a_one_line_error(tmp_path):
    from train.inference import InferenceError, load_document_head

    (tmp_path / "document_head.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file
    with pytest.raises(InferenceError, match="cannot load the document head document_head.safetensors") as info:
        load_document_head(tiny_classifier("bert"), tmp_path, {"doc_pooler": "attention"}, tmp_path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("pooler", ["mean", "max", "attention"])
def test_document_logits_equal_a_hand_computation(pooler):
    model = tiny_classifier("bert").eval()
    attach_document_head(model, pooler)
    if pooler == "attention":
        with torch.no_grad():
            model.bertfit_doc_pooler.score.weight.normal_()
    rng = np.random.default_rng(1)
    ids = [rng.integers(5, 99, n) for n in (12, 7, 20, 9, 15)]
    rows = {"input_ids": ids, "label": [0, 0, 2, 1, 2], "doc_id": [4, 4, 9, 1, 9], "chunk_index": [0, 1, 0, 0, 1]}
    batch = with_documents(collate_windows(rows, list(range(5)), pad_id=0))
    assert batch["num_docs"] == 3 and batch["labels"].tolist() == [1, 0, 2]  # docs 1, 4, 9 in id order
    with torch.no_grad():
        got = model(**model_inputs(batch, "cpu")).logits
        states = []
        for x in ids:  # each window alone through the plain encoder: its [CLS] state
            out = model.bert(input_ids=torch.as_tensor(x)[None]).last_hidden_state[0, 0]
            states.append(out)
        expected = []
        for members in ([3], [0, 1], [2, 4]):
            s = torch.stack([states[i] for i in members])
            if pooler == "mean":
                pooled = s.mean(0)
            elif pooler == "max":
                pooled = s.max(0).values
            else:
                w = torch.softmax(model.bertfit_doc_pooler.score(s).squeeze(-1), 0)
                pooled = (w[:, None] * s).sum(0)
            # the model's own head: BertPooler (dense + tanh), classifier
            expected.append(model.classifier(torch.tanh(model.bert.pooler.dense(pooled))))
        assert (got - torch.stack(expected)).abs().max() <= 1e-5
        # evaluation's path (window states gathered, then pooled per document) gives the same
        window_logits, doc_logits = pool_and_classify(model, torch.stack(states), batch["doc_index"], 3)
        assert (doc_logits - got).abs().max() <= 1e-5
        assert (window_logits - head_logits(model, torch.stack(states))).abs().max() == 0


def test_packed_document_batches_give_the_logits_loss_and_gradients_of_padded_ones():
    from tests.test_speedups import assert_same, outputs

    model = tiny_classifier("roberta")
    attach_document_head(model, "attention")
    with torch.no_grad():
        model.bertfit_doc_pooler.score.weight.normal_()
    packed = copy.deepcopy(model)
    enable_packed_inputs(packed)  # a document model already takes packed batches: nothing changes
    rng = np.random.default_rng(2)
    rows = {"input_ids": [rng.integers(5, 99, n) for n in (12, 30, 5, 17)], "label": [1, 1, 0, 2],
            "doc_id": [0, 0, 1, 2], "chunk_index": [0, 1, 0, 0]}
    padded = with_documents(collate_windows(rows, [0, 1, 2, 3], pad_id=1))
    packed_batch = with_documents(collate_windows(rows, [0, 1, 2, 3], pad_id=1, pad_to_multiple_of=32, packed=True))
    assert_same(outputs(model, padded), outputs(packed, packed_batch), "document head packed")


# --------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_document_objective_two_process_run_resumes_bit_identically_and_exports(tmp_path, tiny_model, prepared):
    data, _ = prepared
    over = dict(objective="document", doc_pooler="attention", train_windows_per_doc=2, max_tokens_per_batch=96,
                save_every_steps=4)
    ref_cfg = base_config(tiny_model, data, tmp_path / "ref", **over)
    rc, ref_log = launch_run(tmp_path, "ref", ref_cfg)
    assert rc == 0, tail(ref_log)
    assert_two_ranks(ref_log)
    steps = max(train_records(tmp_path / "ref"))
    assert steps >= 8
    _, resumed = _kill_and_resume(tmp_path, "killed", dict(ref_cfg, output_dir=str(tmp_path / "killed")),
                                  kill_at=random.randint(5, steps - 2))
    assert_same_run(tmp_path / "ref", tmp_path / "killed", resumed)
    # the evaluate CLI on the export reproduces what training logged for the best model (the document head)
    check_evaluate_matches_training(tmp_path, tmp_path / "ref", data, ["doc_accuracy", "doc_loss", "doc_f1_macro"])
    best = tmp_path / "killed" / "best"
    assert (best / "document_head.safetensors").is_file()
    _assert_export_predicts(best, data)
    from train.inference import forward_documents, load_export

    model, tokenizer, info = load_export(best, "cpu")
    assert info["objective"] == "document" and info["doc_pooler"] == "attention"
    window_logits, doc_logits = forward_documents(model, [[2, 30, 3], [2, 40, 41, 3], [2, 50, 3]], None,
                                                  np.array([7, 7, 3]), tokenizer.pad_token_id, 2)
    assert window_logits.shape == (3, 2) and doc_logits.shape == (2, 2)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_document_objective_trains_and_exports_under_zero(tmp_path, tiny_model, prepared, stage):
    """ZeRO-2, and ZeRO-3 (the pooler's and head's parameters are partitioned: evaluation and export must gather
    them): the export holds the full pooler and evaluate reproduces the logged metrics."""
    from safetensors.torch import load_file

    data, _ = prepared
    cfg = base_config(tiny_model, data, tmp_path / "out", epochs=1, objective="document", doc_pooler="attention",
                      save_every_steps=0, report_to="none")
    config = write_config(tmp_path / "run.yaml", **cfg)
    log = tmp_path / "run.log"
    rc = run(train_command(config, accelerate_config=f"zero{stage}.yaml"), log, train_env(tmp_path), timeout=600)
    assert rc == 0, tail(log)
    assert_two_ranks(log)
    assert "DEEPSPEED" in log.read_text()
    head = load_file(str(tmp_path / "out" / "best" / "document_head.safetensors"))
    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    assert head["score.weight"].shape == (1, hidden) and head["score.weight"].abs().sum() > 0  # trained, not empty
    check_evaluate_matches_training(tmp_path, tmp_path / "out", data, ["doc_accuracy", "doc_loss"])
    _assert_export_predicts(tmp_path / "out" / "best", data)


# ------------------------------------------------------------------------------------ long-context path
def tiny_modernbert(out, tokenizer_dir, positions: int = 1024):
    """A tiny random ModernBERT (local attention 16 in every other layer, `positions` positions) beside the tiny
    WordPiece tokenizer: the long-context encoder path without a download."""
    import shutil

    from transformers import AutoModelForSequenceClassification, ModernBertConfig

    out.mkdir(parents=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, out / f.name)
    config = ModernBertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=positions, local_attention=16,
                              global_attn_every_n_layers=2, num_labels=2, pad_token_id=0, bos_token_id=2,
                              eos_token_id=3, cls_token_id=2, sep_token_id=3)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    return out


@pytest.mark.slow
def test_long_context_encoder_takes_whole_documents_as_one_packed_window(tmp_path, tiny_model):
    """ModernBERT-style positions: --max-length 1024 makes most documents one window; packing (block-diagonal
    mask on CPU; varlen on CUDA) and the document objective train, evaluate and predict on them."""
    import json

    from data_prep.cli import main as prep_main
    from train.tiny_model import write_synthetic_csv

    model = tiny_modernbert(tmp_path / "modernbert", tiny_model)
    csv_path = write_synthetic_csv(tmp_path / "long.csv", 60, seed=4, min_words=150, max_words=600)
    data = tmp_path / "shards"
    assert prep_main(["--input", str(csv_path), "--output", str(data), "--tokenizer", str(model), "--max-length",
                      "1024", "--id-column", "id", "--quiet"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert train["windows"] == train["documents"]  # every document is one window
    cfg = base_config(model, data, tmp_path / "out", epochs=2, per_device_batch_size=4, objective="document",
                      speedups={"packing": True}, learning_rate=1e-3, save_every_steps=0, report_to="none")
    rc, log = launch_run(tmp_path, "long", cfg, nproc=1, accelerate_config=None)
    assert rc == 0, tail(log)
    assert "packing (block-diagonal mask)" in log.read_text()
    records = train_records(tmp_path / "out")
    assert records and all(np.isfinite(r["train/loss"]) for r in records.values())
    _assert_export_predicts(tmp_path / "out" / "best", data)
