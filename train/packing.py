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
Architectures without a first-token head in train/heads.py (e.g. DeBERTa: relative positions over the whole row)
are not packed.
"""

from __future__ import annotations

import types

import numpy as np
import torch

from train.heads import first_token_head_problem, head_logits, position_offset

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


def packing_problem(model) -> str | None:
    """Why ``model`` cannot take packed batches, or None if it can."""
    config = getattr(model, "config", None)
    if problem := first_token_head_problem(model):
        return problem
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
    window = [sliding_window - 1, sliding_window - 1] if sliding_window else [-1, -1]  # -1: unbounded
    out = varlen_kernel(q.device)(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                                  scale=scaling, window_size=window)
    return out[None], None


def varlen_kernel(device):
    """torch.nn.attention.varlen.varlen_attn on CUDA; elsewhere ``reference_varlen`` (the same computation,
    one sdpa call per window) so the plumbing is testable on CPU."""
    return torch_varlen if device.type == "cuda" else reference_varlen


def torch_varlen_problem() -> str | None:
    """Why this torch cannot run ``torch_varlen`` (no varlen_attn, or one without window_size), or None."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    if "window_size" not in inspect.signature(varlen_attn).parameters:
        return f"torch {torch.__version__}'s varlen_attn takes no window_size"
    return None


def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=list(window_size))


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [heads, n, d]
        mask = None
        if window_size[0] >= 0:
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
def packed_first_token_states(model, input_ids, position_ids, cu_seqlens, window_starts, max_seqlen,
                              token_type_ids=None) -> torch.Tensor:
    """The encoder over a packed row -> each window's first-token state [windows, hidden]."""
    inputs = {"input_ids": input_ids, "position_ids": position_ids + position_offset(model)}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    if model.config._attn_implementation == VARLEN_ATTENTION:
        cu = cu_seqlens.to(torch.int32)
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen)
    else:
        dtype = next(model.parameters()).dtype
        inputs["attention_mask"] = packed_masks(model, cu_seqlens, input_ids.shape[1], dtype, input_ids.device)
    return model.base_model(**inputs).last_hidden_state[0, window_starts]


def enable_packed_inputs(model) -> None:
    """Give ``model`` a forward that also takes packed batches (``cu_seqlens`` given); padded batches still go to
    its own forward. One instance attribute: parameters, state_dict and save_pretrained are unchanged. A model
    with a document head (train/document.py) already takes both layouts."""
    if getattr(model, "bertfit_document_head", False):
        return
    original = model.forward

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
                window_starts=None, max_seqlen=None, **kwargs):
        if cu_seqlens is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, **kwargs)
        from transformers.modeling_outputs import SequenceClassifierOutput

        first = packed_first_token_states(self, input_ids, position_ids, cu_seqlens, window_starts, max_seqlen,
                                          token_type_ids)
        return SequenceClassifierOutput(logits=head_logits(self, first))

    model.forward = types.MethodType(forward, model)
