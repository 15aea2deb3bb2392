"""The document objective: a document's windows are encoded, their first-token states pooled into one vector
(``doc_pooler``: mean, max, or attention = a learned score per window), and the model's own classification head
reads the pooled vector; the loss is per document.

Why: with the window objective every window is trained with its document's label although many windows carry no
sign of it, and the pooling of window probabilities is never trained. Here the encoder learns from the
document's label through the pooled representation (belt_nlp and hierarchical models do the same).

- ``attach_document_head(model, pooler)`` adds the pooler as a submodule (``bertfit_doc_pooler``: in the
  checkpoints and in DDP/DeepSpeed like any parameter; the attention scorer starts at zero = mean pooling) and a
  forward that takes ``doc_index`` (each window's document within the batch) and ``num_docs``: document logits.
  Without ``doc_index`` it gives per-window logits (the head on each window alone: what ``pipeline()`` computes
  from the exported encoder); with ``embeddings_only`` the first-token states, for evaluation and prediction of
  documents of any length: windows are encoded in batches across documents, then pooled (``pool_and_classify``).
- Padded and packed batches (train/packing.py) both work.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from train.heads import first_token_head_problem, head_logits

POOLERS = ("mean", "max", "attention")
POOLER_ATTRIBUTE = "bertfit_doc_pooler"  # its parameters' state_dict prefix; the export saves them apart


class DocumentPooler(nn.Module):
    """[windows, hidden] first-token states + each window's document -> [documents, hidden]."""

    def __init__(self, kind: str, hidden: int):
        super().__init__()
        if kind not in POOLERS:
            raise ValueError(f"doc_pooler {kind!r}: choose from {', '.join(POOLERS)}")
        self.kind = kind
        if kind == "attention":
            self.score = nn.Linear(hidden, 1)
            nn.init.zeros_(self.score.weight)  # equal weights at the start: mean pooling, then learned
            nn.init.zeros_(self.score.bias)

    def forward(self, states: torch.Tensor, doc_index: torch.Tensor, num_docs: int) -> torch.Tensor:
        dense, present = by_document(states, doc_index, num_docs)  # [D, W, H], [D, W]
        if self.kind == "mean":
            return dense.sum(1) / present.sum(1, keepdim=True).to(dense.dtype)
        if self.kind == "max":
            return dense.masked_fill(~present[..., None], float("-inf")).amax(1)
        scores = self.score(dense).squeeze(-1).masked_fill(~present, float("-inf"))
        weights = torch.softmax(scores.float(), dim=1).to(dense.dtype)
        return (weights[..., None] * dense).sum(1)


def by_document(states: torch.Tensor, doc_index: torch.Tensor, num_docs: int):
    """Scatter windows into [documents, most windows of a document, hidden] (zeros where a document has fewer
    windows) and the mask of real slots; windows keep their order within a document."""
    doc_index = doc_index.to(states.device)
    order = torch.argsort(doc_index, stable=True)
    counts = torch.bincount(doc_index, minlength=num_docs)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(doc_index)
    slot[order] = torch.arange(len(doc_index), device=states.device) - starts[doc_index[order]]
    width = int(counts.max()) if len(counts) else 0
    dense = states.new_zeros(num_docs, width, states.shape[-1]).index_put((doc_index, slot), states)
    present = torch.zeros(num_docs, width, dtype=torch.bool, device=states.device)
    present[doc_index, slot] = True
    return dense, present


@dataclass
class WindowEmbeddings:
    embeddings: torch.Tensor  # [windows, hidden] first-token states


def document_head_problem(model) -> str | None:
    return first_token_head_problem(model)


def attach_document_head(model, pooler: str) -> None:
    """Give ``model`` a document pooler and the document forward (see the module docstring)."""
    if problem := document_head_problem(model):
        raise ValueError(f"objective: document needs a supported encoder: {problem}; set objective: window "
                         "(every window trained with its document's label) for this one")
    setattr(model, POOLER_ATTRIBUTE, DocumentPooler(pooler, model.config.hidden_size).to(
        next(model.parameters()).device))
    model.bertfit_document_head = True
    model.forward = types.MethodType(document_forward, model)


def has_document_head(model) -> bool:
    return bool(getattr(model, "bertfit_document_head", False))


def first_token_states(model, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                       cu_seqlens=None, window_starts=None, max_seqlen=None) -> torch.Tensor:
    """[windows, hidden] first-token states of a padded or a packed batch."""
    if cu_seqlens is not None:
        from train.packing import packed_first_token_states

        return packed_first_token_states(model, input_ids, position_ids, cu_seqlens, window_starts, max_seqlen,
                                         token_type_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    return model.base_model(**inputs).last_hidden_state[:, 0]


def document_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                     cu_seqlens=None, window_starts=None, max_seqlen=None, doc_index=None, num_docs=None,
                     embeddings_only=False, **kwargs):
    from transformers.modeling_outputs import SequenceClassifierOutput

    states = first_token_states(self, input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens,
                                window_starts, max_seqlen)
    if embeddings_only:
        return WindowEmbeddings(states)
    if doc_index is None:
        return SequenceClassifierOutput(logits=head_logits(self, states))
    pooled = getattr(self, POOLER_ATTRIBUTE)(states, doc_index, num_docs)
    return SequenceClassifierOutput(logits=head_logits(self, pooled))


@torch.no_grad()
def pool_and_classify(model, embeddings: torch.Tensor, doc_index: torch.Tensor, num_docs: int,
                      slots_per_group: int = 65536, windows_per_call: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(window logits [N, C], document logits [num_docs, C]) from first-token states computed earlier.
    ``doc_index`` in 0..num_docs-1; every rank that calls it computes the same.

    Memory stays bounded whatever the document lengths: the states stay where they are (the CPU after a
    gather) and go to the model's device a slice at a time; documents are pooled in groups of similar window
    counts, each group's padded [documents, most windows, hidden] block at most ``slots_per_group`` windows
    (or one document), so a 10,000-window document never pads hundreds of one-window documents to its length."""
    weight = next(model.parameters())  # its dtype: bf16 weights under DeepSpeed bf16

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(weight.device, weight.dtype)

    empty = weight.new_zeros(0, model.config.num_labels)
    window_logits = torch.cat([head_logits(model, on_device(embeddings[i:i + windows_per_call]))
                               for i in range(0, len(embeddings), windows_per_call)]) if len(embeddings) else empty
    pooler = getattr(model, POOLER_ATTRIBUTE)
    doc_index = doc_index.cpu()
    counts = torch.bincount(doc_index, minlength=num_docs)
    doc_order = torch.argsort(counts, stable=True)  # fewest windows first: similar documents share a group
    rank = torch.empty_like(doc_order)
    rank[doc_order] = torch.arange(num_docs)
    window_order = torch.argsort(rank[doc_index], stable=True)  # each group's windows are one slice, in order
    ends = torch.cumsum(counts[doc_order], 0).tolist()
    doc_logits = weight.new_zeros(num_docs, model.config.num_labels)
    first = 0
    while first < num_docs:
        last = first + 1  # the group: ranks first..last-1, widest last (sorted), so its block is size x widest
        while last < num_docs and (last + 1 - first) * int(counts[doc_order[last]]) <= slots_per_group:
            last += 1
        start, stop = (ends[first - 1] if first else 0), ends[last - 1]
        windows = window_order[start:stop]
        pooled = pooler(on_device(embeddings[windows]), (rank[doc_index[windows]] - first).to(weight.device),
                        last - first)
        doc_logits[doc_order[first:last].to(weight.device)] = head_logits(model, pooled)
        first = last
    return window_logits, doc_logits
