"""Padding-free ("packed") batches: a micro-batch's windows laid end to end in one row, attention kept inside
each window, the classifier reading each window's own first token.

Why: a padded batch spends compute on pad tokens (short texts: most of it). Packing removes them; NVIDIA's MLPerf
BERT (--unpad) and transformers' ``DataCollatorWithFlattening`` + varlen FlashAttention do the same.

- ``pack_rows`` (called by train/data.py's collate) lays the windows out: ``input_ids`` [1, T], ``position_ids``
  restarting at 0 in each window, ``token_type_ids`` kept, ``cu_seqlens`` (window boundaries, FlashAttention's
  convention) and ``window_starts``. T is rounded up to a multiple (bounded shapes for torch.compile) with pad
  tokens forming one extra segment that nothing reads.
- ``enable_packed_inputs`` gives a model a forward that takes such a batch: it runs the model's own encoder
  with a block-diagonal mask (transformers' mask functions: eager, sdpa, ModernBERT's sliding window) or, on
  CUDA, torch's varlen FlashAttention kernel through transformers' attention interface (no mask at all), then
  applies the model's own classification head to each window's first token. Same parameters, same state_dict,
  same logits as the padded batch (tests/test_speedups.py checks logits, loss and every gradient).
Architectures not in PACKED_HEADS (e.g. DeBERTa: relative positions over the whole row) are not packed.
"""

from __future__ import annotations

import types

import numpy as np
import torch

VARLEN_ATTENTION = "bertfit_varlen"  # transformers attention-interface name of the varlen FlashAttention path


# ------------------------------------------------------------------------------------------------ the layout
def pack_rows(ids: list, types_: list | None, pad_id: int, pad_to_multiple_of: int | None) -> dict:
    """Windows (lists/arrays of token ids, and token types for pairs) -> one packed row and its boundaries."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    width = -(-total // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else total
    input_ids = np.full(width, pad_id, dtype=np.int64)
    positions = np.zeros(width, dtype=np.int64)
    cu = np.zeros(len(ids) + 1 + (width > total), dtype=np.int64)
    cu[1:len(ids) + 1] = np.cumsum(lengths)
    for i, x in enumerate(ids):
        input_ids[cu[i]:cu[i + 1]] = x
        positions[cu[i]:cu[i + 1]] = np.arange(lengths[i])
    if width > total:  # the pad tail: its own segment (attends only to itself), never read
        cu[-1] = width
        positions[total:] = np.arange(width - total)
    batch = {"input_ids": torch.from_numpy(input_ids)[None], "position_ids": torch.from_numpy(positions)[None],
             "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
             "window_starts": torch.from_numpy(cu[:len(ids)].copy()),
             "max_seqlen": int(np.diff(cu).max()) if len(cu) > 1 else 0}
    if types_ is not None:
        token_types = np.zeros(width, dtype=np.int64)
        for i, x in enumerate(types_):
            token_types[cu[i]:cu[i + 1]] = x
        batch["token_type_ids"] = torch.from_numpy(token_types)[None]
    return batch


# -------------------------------------------------------------------------------- per-architecture heads
def _bert_head(model, first):  # BertPooler (dense + tanh of [CLS]), dropout, classifier
    return model.classifier(model.dropout(model.bert.pooler(first[:, None])))


def _first_token_head(model, first):  # RoBERTa / XLM-R / CamemBERT / ELECTRA heads read features[:, 0]
    return model.classifier(first[:, None])


def _distilbert_head(model, first):
    return model.classifier(model.dropout(torch.nn.functional.relu(model.pre_classifier(first))))


def _modernbert_head(model, first):
    return model.classifier(model.drop(model.head(first)))


# model_type -> (head on first-token states [B, H], offset of the first position id, encoder attribute)
PACKED_HEADS = {
    "bert": (_bert_head, 0), "distilbert": (_distilbert_head, 0), "modernbert": (_modernbert_head, 0),
    "electra": (_first_token_head, 0), "roberta": (_first_token_head, None), "xlm-roberta": (_first_token_head, None),
    "camembert": (_first_token_head, None),  # None: RoBERTa-style positions start at pad_token_id + 1
}


def packing_problem(model) -> str | None:
    """Why ``model`` cannot take packed batches, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKED_HEADS:
        return f"{model_type or type(model).__name__} is not one of the packable architectures " \
               f"({', '.join(sorted(PACKED_HEADS))})"
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return f"{type(model).__name__} is not a sequence classifier"
    if model_type == "modernbert" and getattr(config, "classifier_pooling", "cls") != "cls":
        return f"ModernBERT with classifier_pooling {config.classifier_pooling!r} (only cls is packed)"
    if getattr(config, "is_decoder", False):
        return "a decoder model"
    return None


# ------------------------------------------------------------------------------------- masks / varlen
def packed_masks(model, cu_seqlens: torch.Tensor, length: int, dtype, device):
    """Block-diagonal attention mask(s) for a packed row, made by transformers' own mask functions so they have
    the form the model's attention implementation expects (and ModernBERT's local layers keep their window)."""
    from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

    segment = torch.searchsorted(cu_seqlens[1:].to(device), torch.arange(length, device=device), right=True)

    def same_window(batch_idx, head_idx, q_idx, kv_idx):
        return segment[q_idx] == segment[kv_idx]

    shape = torch.empty(1, length, 0, dtype=dtype, device=device)  # only its batch, length, dtype, device are read
    kwargs = {"config": model.config, "inputs_embeds": shape, "attention_mask": None,
              "and_mask_function": same_window}
    full = create_bidirectional_mask(**kwargs)
    if model.config.model_type == "modernbert":
        return {"full_attention": full, "sliding_attention": create_bidirectional_sliding_window_mask(**kwargs)}
    return full


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     sliding_window=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                     max_length_k=None, **kwargs):
    """transformers attention-interface function: torch's varlen FlashAttention over the packed row.
    query/key/value [1, heads, T, d] -> output [1, T, heads, d]. The kernel has no attention-probability dropout
    (the notice at start-up says so); the rest of the model's dropout is unchanged."""
    if cu_seq_lens_q is None:
        raise RuntimeError("bertfit_varlen attention needs packed inputs (cu_seq_lens_q); use packing: false")
    q, k, v = (x.transpose(1, 2)[0] for x in (query, key, value))  # [T, heads, d]
    window = [sliding_window - 1, sliding_window - 1] if sliding_window else None
    out = varlen_kernel(q.device)(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                                  scale=scaling, window_size=window)
    return out[None], None


def varlen_kernel(device):
    """torch.nn.attention.varlen.varlen_attn on CUDA; elsewhere ``reference_varlen`` (the same computation,
    one sdpa call per window) so the plumbing is testable on CPU."""
    if device.type == "cuda":
        from torch.nn.attention.varlen import varlen_attn

        return lambda q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=None: varlen_attn(
            q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)
    return reference_varlen


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=None):
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [heads, n, d]
        mask = None
        if window_size is not None:
            n = end - start
            pos = torch.arange(n, device=q.device)
            mask = (pos[:, None] - pos[None, :]).abs() <= window_size[0]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


def use_varlen_attention(model) -> None:
    """Route the model's attention through ``varlen_attention`` (registered once with transformers)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, lambda *args, **kwargs: None)  # varlen needs no mask
    model.set_attn_implementation(VARLEN_ATTENTION)


# ------------------------------------------------------------------------------------------ the forward
def enable_packed_inputs(model) -> None:
    """Give ``model`` a forward that also takes packed batches (``cu_seqlens`` given); padded batches still go to
    its own forward. One instance attribute: parameters, state_dict and save_pretrained are unchanged."""
    original = model.forward
    head, position_offset = PACKED_HEADS[model.config.model_type]
    if position_offset is None:
        position_offset = model.config.pad_token_id + 1

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
                window_starts=None, max_seqlen=None, **kwargs):
        if cu_seqlens is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, **kwargs)
        from transformers.modeling_outputs import SequenceClassifierOutput

        encoder = self.base_model
        inputs = {"input_ids": input_ids, "position_ids": position_ids + position_offset}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.config._attn_implementation == VARLEN_ATTENTION:
            cu = cu_seqlens.to(torch.int32)
            inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen)
        else:
            dtype = next(self.parameters()).dtype
            inputs["attention_mask"] = packed_masks(self, cu_seqlens, input_ids.shape[1], dtype, input_ids.device)
        hidden = encoder(**inputs).last_hidden_state  # [1, T, H]
        logits = head(self, hidden[0, window_starts])
        return SequenceClassifierOutput(logits=logits)

    model.forward = types.MethodType(forward, model)
