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
        raise ValueError(f"objective: document needs a supported encoder: {problem}")
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
                      docs_per_batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(window logits [N, C], document logits [num_docs, C]) from first-token states computed earlier, a bounded
    number of documents at a time. ``doc_index`` in 0..num_docs-1; every rank that calls it computes the same."""
    weight = next(model.parameters())  # its dtype: bf16 weights under DeepSpeed bf16
    embeddings, doc_index = embeddings.to(weight.device, weight.dtype), doc_index.to(weight.device)
    window_logits = torch.cat([head_logits(model, embeddings[i:i + 4096])
                               for i in range(0, len(embeddings), 4096)]) if len(embeddings) else None
    pooler = getattr(model, POOLER_ATTRIBUTE)
    doc_logits = []
    for start in range(0, num_docs, docs_per_batch):
        stop = min(start + docs_per_batch, num_docs)
        chosen = (doc_index >= start) & (doc_index < stop)
        doc_logits.append(head_logits(model, pooler(embeddings[chosen], doc_index[chosen] - start, stop - start)))
    empty = embeddings.new_zeros(0, model.config.num_labels)
    return (window_logits if window_logits is not None else empty,
            torch.cat(doc_logits) if doc_logits else empty)
