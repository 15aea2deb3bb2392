"""The classification heads of the encoders bertfit can pack or pool by document, as functions of the first-token
states: ``head_logits(model, first)`` with first = [windows or documents, hidden] gives what the model's own head
gives for those states (same modules, same parameters).

Why: packed batches (train/packing.py) and the document objective (train/document.py) compute first-token
states themselves (from a packed row; pooled over a document's windows) and then need the model's head on them,
which transformers only runs inside each model's forward.
"""

from __future__ import annotations

import torch


def _bert_head(model, first):  # BertPooler (dense + tanh of [CLS]), dropout, classifier
    return model.classifier(model.dropout(model.bert.pooler(first[:, None])))


def _first_token_head(model, first):  # RoBERTa / XLM-R / CamemBERT / ELECTRA heads read features[:, 0]
    return model.classifier(first[:, None])


def _distilbert_head(model, first):
    return model.classifier(model.dropout(torch.nn.functional.relu(model.pre_classifier(first))))


def _modernbert_head(model, first):
    return model.classifier(model.drop(model.head(first)))


# model_type -> (head on first-token states, offset of the first position id; None: RoBERTa-style, the
# positions start at pad_token_id + 1)
HEADS = {
    "bert": (_bert_head, 0), "distilbert": (_distilbert_head, 0), "modernbert": (_modernbert_head, 0),
    "electra": (_first_token_head, 0), "roberta": (_first_token_head, None), "xlm-roberta": (_first_token_head, None),
    "camembert": (_first_token_head, None),
}


def first_token_head_problem(model) -> str | None:
    """Why ``model``'s head cannot be run on first-token states from outside, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in HEADS:
        return f"{model_type or type(model).__name__} is not one of the supported architectures " \
               f"({', '.join(sorted(HEADS))})"
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return f"{type(model).__name__} is not a sequence classifier"
    if model_type == "modernbert" and getattr(config, "classifier_pooling", "cls") != "cls":
        return f"ModernBERT with classifier_pooling {config.classifier_pooling!r} (only cls)"
    return None


def head_logits(model, first: torch.Tensor) -> torch.Tensor:
    return HEADS[model.config.model_type][0](model, first)


def position_offset(model) -> int:
    offset = HEADS[model.config.model_type][1]
    return model.config.pad_token_id + 1 if offset is None else offset
