"""The first-token-only last layer gives the stock model's logits and gradients, with and without padding, under
every attention path bertfit sets up, and leaves models whose head reads more than position 0 alone."""

import copy

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification, RobertaConfig,
                          RobertaForSequenceClassification)

from train.cpu_dropout import use_fast_cpu_dropout
from train.last_layer import cls_only_last_layer


def tiny_bert(attn: str, dropout: float = 0.0):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, attn_implementation=attn)
    return BertForSequenceClassification(config)


def tiny_roberta(attn: str):
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=70, num_labels=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=1, attn_implementation=attn)
    return RobertaForSequenceClassification(config)


def batch(num_labels: int, padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (4, 20), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for row, length in enumerate([20, 13, 7, 2]):
            mask[row, length:] = 0
            ids[row, length:] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, num_labels - 1, 1])}


def loss_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [lambda a: tiny_bert(a), tiny_roberta], ids=["bert", "roberta"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "bertfit"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_same_logits_and_gradients(make, attn, padded):
    stock = make("sdpa" if attn == "bertfit" else attn)
    if attn == "bertfit":  # the attention function bertfit's CPU training uses
        use_fast_cpu_dropout(stock, cpu_kernels_on=False)
    fast = copy.deepcopy(stock)
    assert cls_only_last_layer(fast)
    inputs = batch(stock.config.num_labels, padded)
    stock.train()
    fast.train()  # dropout 0: the training graph, deterministic
    logits, grads = loss_and_grads(stock, inputs)
    fast_logits, fast_grads = loss_and_grads(fast, inputs)
    torch.testing.assert_close(fast_logits, logits, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the last layer did compute less: its output is one position wide
    seen = []
    fast.base_model.encoder.layer[-1].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, stock.eval()(**inputs).logits, rtol=1e-5, atol=1e-6)
    assert seen == [(4, 1, 32)]


def test_state_dict_and_saved_model_unchanged(tmp_path):
    stock = tiny_bert("sdpa")
    fast = copy.deepcopy(stock)
    assert cls_only_last_layer(fast)
    assert list(fast.state_dict()) == list(stock.state_dict())
    fast.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = batch(3, True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, stock.eval()(**inputs).logits)


def test_dropout_still_applies_in_training():
    model = tiny_bert("sdpa", dropout=0.3)
    assert cls_only_last_layer(model)
    inputs = batch(3, True)
    model.train()
    torch.manual_seed(5)
    a = model(**inputs).logits
    torch.manual_seed(6)
    b = model(**inputs).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)


def test_models_reading_more_than_the_first_token_are_left_alone():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    tokens = BertForTokenClassification(config)  # reads every position
    assert not cls_only_last_layer(tokens)
    assert "forward" not in vars(tokens.bert.encoder.layer[-1])
    decoder = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "is_decoder": True}))
    assert not cls_only_last_layer(decoder)


def test_predict_and_evaluate_load_the_export_with_it(tmp_path):
    from transformers import BertTokenizerFast

    from train.inference import load_export
    from train.tiny_model import tiny_vocab

    (tmp_path / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    model = tiny_bert("sdpa")
    model.config.id2label = {0: "a", 1: "b", 2: "c"}
    model.config.label2id = {"a": 0, "b": 1, "c": 2}
    model.save_pretrained(tmp_path)
    loaded, _, info = load_export(tmp_path, "cpu")
    assert info["labels"] == ["a", "b", "c"]
    assert "forward" in vars(loaded.bert.encoder.layer[-1])  # the first-token-only forward
    inputs = {k: v for k, v in batch(3, True).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits)
