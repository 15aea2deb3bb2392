"""Evaluation: window outputs from every rank gathered exactly once, turned into per-window outputs for the
problem type, pooled into document outputs, and scored with the project's `evaluate` metric modules.

Per problem type (``single_label``, ``multi_label``, ``regression``):

* window outputs (:func:`window_outputs`): softmax class probabilities, sigmoid label probabilities, the
  raw value;
* document pooling (:func:`pool_documents`): single_label ``mean`` | ``max`` | ``max_positive``;
  multi_label ``max`` (default) | ``mean``; regression ``mean`` weighted by each window's token count;
* metrics (:func:`score`, names in :func:`train.metrics.metric_names`) with ``window_`` and ``doc_``
  prefixes; multi_label predictions are "probability >= threshold" per label (0.5 unless tuned by
  :func:`tune_thresholds`).
"""

from __future__ import annotations

import numpy as np
import torch

from train.data import model_inputs
from train.document import has_document_head, pool_and_classify
from train.metrics import (
    PROBLEM_TYPES,
    check_problem_type,
    classification_metrics,
    confusion_matrix,
    multilabel_metrics,
    regression_metrics,
)

__all__ = [
    "PROBLEM_TYPES",
    "THRESHOLD_GRID",
    "allowed_poolings",
    "classification_report_text",
    "confusion_matrix_image",
    "default_pooling",
    "pool_documents",
    "rescore",
    "run_evaluation",
    "score",
    "softmax",
    "tune_thresholds",
    "window_outputs",
]

_POOLINGS = {
    "single_label": ("mean", "max", "max_positive"),
    "multi_label": ("max", "mean"),
    "regression": ("mean",),
}

THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""The thresholds :func:`tune_thresholds` chooses from: 0.05, 0.10, ..., 0.95."""

DEFAULT_THRESHOLD = 0.5


def default_pooling(problem_type: str) -> str:
    """single_label "mean", multi_label "max" (one window mentioning a topic is enough), regression "mean"."""
    return allowed_poolings(problem_type)[0]


def allowed_poolings(problem_type: str) -> tuple[str, ...]:
    """The pooling names a problem type accepts, the default first. (single_label "max_positive" further needs
    exactly two classes.)"""
    return _POOLINGS[check_problem_type(problem_type)]


def check_pooling(problem_type: str, pooling: str, num_classes: int | None = None, option: str = "pooling") -> str:
    """The pooling, if the problem type (and, given num_classes, the class count) allows it; else a ValueError
    whose one line names ``option`` and the choices. The one check behind training, evaluate, predict and the API."""
    allowed = allowed_poolings(problem_type)
    if pooling not in allowed:
        raise ValueError(f"{option} {pooling}: not available for a {problem_type} model; choose from "
                         f"{', '.join(allowed)}")
    if pooling == "max_positive" and num_classes is not None and num_classes != 2:
        raise ValueError(f"{option} max_positive: needs a 2-class model, this one has {num_classes} classes")
    return pooling


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    # exp of -|x| only, so large logits of either sign never overflow
    e = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def window_outputs(logits: np.ndarray, problem_type: str) -> np.ndarray:
    """What a window says, from raw model outputs: single_label softmax probabilities [N, C]; multi_label
    sigmoid probabilities [N, L]; regression the value ``logits[:, 0]`` -> [N] (float64 throughout)."""
    check_problem_type(problem_type)
    logits = np.asarray(logits, dtype=np.float64)
    if problem_type == "regression":
        if logits.ndim == 2 and logits.shape[1] == 1:
            return logits[:, 0]
        if logits.ndim == 1:
            return logits
        raise ValueError(f"regression expects one output per window, got logits of shape {logits.shape}")
    if logits.ndim != 2:
        raise ValueError(f"{problem_type} expects logits [windows, labels], got shape {logits.shape}")
    return softmax(logits) if problem_type == "single_label" else sigmoid(logits)


def _document_groups(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order that sorts the windows by document, start of each document's run in that order)."""
    order = np.argsort(doc_ids, kind="stable")
    ids = doc_ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, dtype=np.int64)
    return order, starts


def pool_documents(outputs: np.ndarray, doc_ids: np.ndarray, problem_type: str, pooling: str,
                   window_tokens: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One output per document from its windows' outputs (:func:`window_outputs`).

    Returns (sorted unique doc ids, pooled outputs: [docs, C] / [docs, L] / [docs]).

    single_label:
      * ``mean``: the average of the windows' class probabilities.
      * ``max``: per class, the highest probability any window gives it, renormalised to sum to 1. The
        classes' maxima may come from different windows: with two classes, windows [0.9, 0.1] and
        [0.3, 0.7] pool to [0.9, 0.7] / 1.6 = [0.5625, 0.4375], so the document is "negative" although a
        window is 70% positive.
      * ``max_positive`` (two classes only; class id 1 is the positive class): p = the highest positive
        probability over the windows, the document gets [1 - p, p] (the example above: [0.3, 0.7]). For
        "positive if any part of the document is".
    multi_label: ``max`` (per label, the highest window probability: a label is on if any window says so)
    or ``mean`` of the windows' sigmoid probabilities.
    regression: ``mean`` = the windows' values averaged with weights = their real token counts
    (``window_tokens`` required), so a short trailing window counts for what it holds.
    """
    check_problem_type(problem_type)
    check_pooling(problem_type, pooling)
    outputs = np.asarray(outputs, dtype=np.float64)
    doc_ids = np.asarray(doc_ids)
    if outputs.shape[0] != doc_ids.shape[0]:
        raise ValueError(f"{outputs.shape[0]} window outputs for {doc_ids.shape[0]} doc ids")
    if problem_type == "single_label" and pooling == "max_positive" and (outputs.ndim != 2 or outputs.shape[1] != 2):
        raise ValueError(f"pooling 'max_positive' needs exactly 2 classes (class id 1 positive), this model has "
                         f"{outputs.shape[1] if outputs.ndim == 2 else outputs.shape}; use mean or max")
    order, starts = _document_groups(doc_ids)
    ids = doc_ids[order][starts]
    sorted_outputs = outputs[order]
    if len(starts) == 0:
        return ids, sorted_outputs
    counts = np.diff(np.r_[starts, len(order)])
    if problem_type == "regression":
        if window_tokens is None:
            raise ValueError("regression pooling weighs windows by their token counts: window_tokens is required")
        weights = np.asarray(window_tokens, dtype=np.float64).reshape(-1)
        if weights.shape[0] != outputs.shape[0]:
            raise ValueError(f"{weights.shape[0]} window token counts for {outputs.shape[0]} windows")
        if not np.all(weights > 0):
            raise ValueError("window token counts must be positive")
        weights = weights[order]
        pooled = np.add.reduceat(sorted_outputs * weights, starts) / np.add.reduceat(weights, starts)
    elif pooling == "mean":
        pooled = np.add.reduceat(sorted_outputs, starts, axis=0) / counts[:, None]
    elif pooling == "max_positive":
        positive = np.maximum.reduceat(sorted_outputs[:, 1], starts)
        pooled = np.stack([1.0 - positive, positive], axis=1)
    else:  # max
        pooled = np.maximum.reduceat(sorted_outputs, starts, axis=0)
        if problem_type == "single_label":  # per-label probabilities (multi_label) are not a distribution
            pooled /= pooled.sum(axis=1, keepdims=True)
    return ids, pooled


def resolve_thresholds(thresholds, num_labels: int) -> np.ndarray:
    """Per-label thresholds as float64 [L]: None -> 0.5 each; one number -> that for every label."""
    if thresholds is None:
        return np.full(num_labels, DEFAULT_THRESHOLD)
    values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if values.shape[0] == 1 and num_labels != 1:
        values = np.full(num_labels, values[0])
    if values.shape[0] != num_labels:
        raise ValueError(f"thresholds: {values.shape[0]} values for {num_labels} labels")
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"thresholds must lie in [0, 1], got {values.tolist()}")
    return values


def _binary_cross_entropy(probs: np.ndarray, targets: np.ndarray) -> float:
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    return float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())


def _multi_hot(labels: np.ndarray, num_labels: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != num_labels:
        raise ValueError(f"multi_label labels must be multi-hot rows of {num_labels} labels, got shape {labels.shape}")
    if labels.size and not np.all((labels == 0) | (labels == 1)):
        raise ValueError("multi_label labels must hold only 0 and 1")
    return labels.astype(np.int64)


def score(logits: np.ndarray, labels: np.ndarray, doc_ids: np.ndarray, problem_type, label_names=None,
          pooling: str | None = None, window_tokens: np.ndarray | None = None,
          thresholds: list[float] | None = None, doc_logits: np.ndarray | None = None):
    """Window and document metrics for raw model outputs (regression: already de-standardised).

    ``doc_logits`` (a document-objective model, train/document.py): the documents' own logits, one row per
    sorted unique doc id; they replace the pooling of window outputs.

    ``labels`` per window: class ids [N] (single_label), multi-hot [N, L] (multi_label), values [N]
    (regression). ``pooling`` None means :func:`default_pooling`. Returns (metrics, extras): metrics has the
    :func:`train.metrics.metric_names` names with ``window_`` and ``doc_`` prefixes plus ``num_docs`` and
    ``num_windows``; extras is ``{"doc_ids", "doc_outputs", "doc_labels", "confusion", "thresholds",
    "label_confusion", "windows"}`` (confusion: the single_label document confusion matrix, else None;
    thresholds: the multi_label thresholds used, else None; label_confusion: multi_label per-label 2x2
    matrices [L, 2, 2] from sklearn.metrics.multilabel_confusion_matrix, else None; windows: this call's
    inputs, for :func:`rescore`).

    Losses: single_label cross-entropy of the (pooled) probabilities; multi_label mean binary cross-entropy
    of the (pooled) probabilities vs the multi-hot labels; regression mean squared error.
    """
    check_problem_type(problem_type)
    if label_names is None or isinstance(label_names, str):
        raise TypeError("label_names must be a list of label names")
    label_names = list(label_names)
    pooling = default_pooling(problem_type) if pooling is None else pooling
    check_pooling(problem_type, pooling)
    doc_ids = np.asarray(doc_ids)
    outputs = window_outputs(logits, problem_type)
    labels = np.asarray(labels)
    if labels.shape[0] != outputs.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {outputs.shape[0]} windows")
    if doc_logits is None:
        ids, doc_outputs = pool_documents(outputs, doc_ids, problem_type, pooling, window_tokens)
    else:
        ids, doc_outputs = np.unique(doc_ids), window_outputs(doc_logits, problem_type)
        if doc_outputs.shape[0] != ids.shape[0]:
            raise ValueError(f"{doc_outputs.shape[0]} document logits for {ids.shape[0]} documents")
    order, starts = _document_groups(doc_ids)
    doc_labels = labels[order][starts]  # every window of a document carries the document's label(s)
    extras = {"doc_ids": ids, "doc_outputs": doc_outputs, "doc_labels": doc_labels, "confusion": None,
              "thresholds": None, "label_confusion": None,
              "windows": {"logits": np.asarray(logits), "labels": labels, "doc_ids": doc_ids, "tokens": window_tokens,
                          "doc_logits": doc_logits}}

    if problem_type == "single_label":
        labels = labels.astype(np.int64)
        doc_labels = extras["doc_labels"] = doc_labels.astype(np.int64)
        metrics = classification_metrics(outputs.argmax(1), labels, label_names, prefix="window_")
        metrics["window_loss"] = float(-np.log(np.clip(outputs[np.arange(len(labels)), labels], 1e-12, None)).mean())
        doc_pred = doc_outputs.argmax(1)
        metrics.update(classification_metrics(doc_pred, doc_labels, label_names, prefix="doc_"))
        metrics["doc_loss"] = float(-np.log(np.clip(doc_outputs[np.arange(len(doc_labels)), doc_labels], 1e-12,
                                                    None)).mean())
        extras["confusion"] = confusion_matrix(doc_pred, doc_labels, len(label_names))
    elif problem_type == "multi_label":
        labels = _multi_hot(labels, len(label_names))
        doc_labels = extras["doc_labels"] = _multi_hot(doc_labels, len(label_names))
        cut = resolve_thresholds(thresholds, len(label_names))
        metrics = multilabel_metrics((outputs >= cut).astype(np.int64), labels, label_names, prefix="window_")
        metrics["window_loss"] = _binary_cross_entropy(outputs, labels)
        doc_pred = (doc_outputs >= cut).astype(np.int64)
        metrics.update(multilabel_metrics(doc_pred, doc_labels, label_names, prefix="doc_"))
        metrics["doc_loss"] = _binary_cross_entropy(doc_outputs, doc_labels)
        from sklearn.metrics import multilabel_confusion_matrix

        extras["thresholds"] = [float(t) for t in cut]
        extras["label_confusion"] = multilabel_confusion_matrix(doc_labels, doc_pred, labels=list(range(len(label_names))))
    else:
        labels = labels.astype(np.float64).reshape(-1)
        doc_labels = extras["doc_labels"] = doc_labels.astype(np.float64).reshape(-1)
        metrics = regression_metrics(outputs, labels, prefix="window_")
        metrics["window_loss"] = metrics["window_mse"]
        metrics.update(regression_metrics(doc_outputs, doc_labels, prefix="doc_"))
        metrics["doc_loss"] = metrics["doc_mse"]
    metrics["num_docs"] = float(len(ids))
    metrics["num_windows"] = float(len(labels))
    return metrics, extras


def rescore(extras: dict, problem_type: str, label_names: list[str], pooling: str | None,
            thresholds: list[float] | None) -> tuple[dict[str, float], dict]:
    """:func:`score` again on the windows an earlier score()/run_evaluation() saw (``extras["windows"]``), e.g.
    with thresholds tuned on its document outputs, without another forward pass. Returns (metrics, extras)."""
    windows = extras["windows"]
    return score(windows["logits"], windows["labels"], windows["doc_ids"], problem_type, label_names, pooling,
                 window_tokens=windows["tokens"], thresholds=thresholds, doc_logits=windows.get("doc_logits"))


def tune_thresholds(doc_probs: np.ndarray, doc_labels: np.ndarray) -> list[float]:
    """multi_label: per label, the threshold in :data:`THRESHOLD_GRID` whose "probability >= threshold"
    predictions give that label the highest F1 (scikit-learn's f1_score, zero_division=0) on these documents.
    Ties (e.g. a label without positives, F1 0 everywhere) go to the threshold closest to 0.5, then the lower
    one, so the choice is deterministic and falls back to the default."""
    from sklearn.metrics import f1_score

    probs = np.asarray(doc_probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"doc_probs must be [documents, labels], got shape {probs.shape}")
    targets = _multi_hot(doc_labels, probs.shape[1])
    if targets.shape[0] != probs.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"tune_thresholds needs the same, non-zero number of documents in doc_probs "
                         f"({probs.shape[0]}) and doc_labels ({targets.shape[0]})")
    grid = np.asarray(THRESHOLD_GRID)
    # f1[g, label]: the label's F1 when every label is cut at grid[g]
    f1 = np.stack([f1_score(targets, (probs >= t).astype(np.int64), average=None, zero_division=0.0,
                            labels=list(range(probs.shape[1])))
                   for t in grid])
    chosen = []
    for label in range(probs.shape[1]):
        best = np.isclose(f1[:, label], f1[:, label].max(), rtol=0.0, atol=1e-12)
        candidates = grid[best]
        distance = np.round(np.abs(candidates - DEFAULT_THRESHOLD), 6)
        chosen.append(float(candidates[np.lexsort((candidates, distance))[0]]))
    return chosen


def gather_exactly_once(accelerator, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Concatenate every rank's rows (ranks may hold different counts) without the duplicates a padded
    sampler would add; each rank gets the full result."""
    n_local = next(iter(tensors.values())).shape[0]
    out = {}
    if accelerator.num_processes == 1:
        return {k: v.cpu().numpy() for k, v in tensors.items()}
    valid = torch.ones(n_local, dtype=torch.long, device=accelerator.device)
    valid = accelerator.gather(accelerator.pad_across_processes(valid, dim=0, pad_index=0)).cpu().numpy() > 0
    for k, v in tensors.items():
        padded = accelerator.pad_across_processes(v.to(accelerator.device), dim=0)
        out[k] = accelerator.gather(padded).cpu().numpy()[valid]
    return out


@torch.no_grad()
def run_evaluation(accelerator, model, loader, label_names: list[str], problem_type, pooling=None,
                   expected_windows: int | None = None, thresholds=None,
                   output_scale: tuple[float, float] | None = None, real_batches: int | None = None):
    """Every window's outputs from all ranks exactly once, then :func:`score`. Returns (metrics, extras).

    real_batches: only the loader's first real_batches batches count; the rest are fillers that give every rank
    the same number of forward passes (a wrapped model's forward can be a collective: DDP syncs buffers on the
    first one after training, ZeRO-3 gathers parameters on each), so no rank waits for a peer that is done.

    Window token counts (regression pooling) come from ``batch["real_lengths"]``, else the attention mask.
    ``output_scale = (mean, std)`` de-standardises regression outputs (value = logit * std + mean) before
    scoring, so metrics are in the targets' own units.
    """
    check_problem_type(problem_type)
    pooling = default_pooling(problem_type) if pooling is None else pooling
    check_pooling(problem_type, pooling)  # before the forward passes, not after
    if expected_windows is None:
        raise TypeError("run_evaluation needs expected_windows")
    model.eval()
    unwrapped = getattr(model, "module", model)  # DDP's and DeepSpeed's wrappers keep the model as .module
    document_model = has_document_head(unwrapped)  # gather window embeddings; the document head pools them
    logits, labels, docs, rows, tokens = [], [], [], [], []
    for i, batch in enumerate(loader):
        out = model(**model_inputs(batch, accelerator.device), **({"embeddings_only": True} if document_model else {}))
        if real_batches is not None and i >= real_batches:
            continue
        logits.append(out.embeddings.float() if document_model else out.logits.float())
        labels.append(batch["labels"])
        docs.append(batch["doc_ids"])
        rows.append(batch["rows"])
        real = batch.get("real_lengths")
        tokens.append(real if real is not None else batch["attention_mask"].sum(dim=1))
    num_outputs = (unwrapped.config.hidden_size if document_model else
                   1 if problem_type == "regression" else len(label_names))
    empty_labels = {"single_label": torch.zeros(0, dtype=torch.long),
                    "multi_label": torch.zeros(0, len(label_names)),
                    "regression": torch.zeros(0)}[problem_type]
    local = {
        "logits": torch.cat(logits) if logits else torch.zeros(0, num_outputs, device=accelerator.device),
        "labels": torch.cat(labels) if labels else empty_labels,
        "docs": torch.cat(docs) if docs else torch.zeros(0, dtype=torch.long),
        "rows": torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long),
        "tokens": torch.cat(tokens).long() if tokens else torch.zeros(0, dtype=torch.long),
    }
    got = gather_exactly_once(accelerator, local)
    # Every window exactly once: a duplicated or missing window would skew the metrics silently.
    if len(got["rows"]) != expected_windows or len(np.unique(got["rows"])) != expected_windows:
        raise RuntimeError(f"evaluation saw {len(got['rows'])} windows ({len(np.unique(got['rows']))} distinct), "
                           f"expected {expected_windows}")
    doc_logits = None
    if document_model:  # every rank runs the same head calls on the same gathered embeddings (ZeRO-3 gathers)
        ids, doc_index = np.unique(got["docs"], return_inverse=True)
        window_t, doc_t = pool_and_classify(unwrapped, torch.from_numpy(got["logits"]),
                                            torch.from_numpy(doc_index.reshape(-1)), len(ids))
        got["logits"], doc_logits = window_t.float().cpu().numpy(), doc_t.float().cpu().numpy().astype(np.float64)
    model.train()
    window_logits = got["logits"].astype(np.float64)
    if problem_type == "regression" and output_scale is not None:
        mean, std = output_scale
        window_logits = window_logits * float(std) + float(mean)
        doc_logits = None if doc_logits is None else doc_logits * float(std) + float(mean)
    return score(window_logits, got["labels"], got["docs"], problem_type, label_names, pooling,
                 window_tokens=got["tokens"], thresholds=thresholds, doc_logits=doc_logits)


def classification_report_text(doc_outputs: np.ndarray, doc_labels: np.ndarray, problem_type: str,
                               label_names: list[str], thresholds=None) -> str:
    """The documents' report as text. single_label and multi_label: sklearn.metrics.classification_report
    (per label precision/recall/F1/support and the averages; multi_label predictions at the thresholds,
    0.5 by default). regression: MSE, MAE, Pearson and Spearman of the documents in the same spirit."""
    check_problem_type(problem_type)
    from sklearn.metrics import classification_report

    doc_outputs = np.asarray(doc_outputs, dtype=np.float64)
    if problem_type == "regression":
        values = regression_metrics(doc_outputs.reshape(-1), np.asarray(doc_labels, dtype=np.float64).reshape(-1))
        lines = [f"{name:>10}  {values[name]:.4f}" for name in ("mse", "mae", "pearson", "spearman")]
        return "\n".join(lines + [f"{'documents':>10}  {doc_outputs.reshape(-1).shape[0]}"]) + "\n"
    ids = list(range(len(label_names)))
    if problem_type == "single_label":
        pred, true = doc_outputs.argmax(1), np.asarray(doc_labels).astype(np.int64)
    else:
        pred = (doc_outputs >= resolve_thresholds(thresholds, len(label_names))).astype(np.int64)
        true = _multi_hot(doc_labels, len(label_names))
    return classification_report(true, pred, labels=ids, target_names=[str(n) for n in label_names], digits=4,
                                 zero_division=0.0)


def confusion_matrix_image(matrix: np.ndarray, label_names: list[str], normalize: bool = False) -> np.ndarray:
    """An RGB image (H, W, 3, uint8) of the confusion matrix for TensorBoard and the evaluate CLI, drawn by
    sklearn.metrics.ConfusionMatrixDisplay. ``normalize=True`` shows each true-label row as fractions of its
    documents (the diagonal is each class's recall), so rare classes are readable next to frequent ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(matrix)
    n = len(label_names)
    if matrix.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {matrix.shape} for {n} labels")
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True).astype(np.float64)
        shown, fmt = np.divide(matrix, totals, out=np.zeros((n, n)), where=totals > 0), ".2f"
    else:
        shown, fmt = matrix.astype(np.int64), "d"
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.7 * n), dpi=80)
    ConfusionMatrixDisplay(shown, display_labels=[str(name) for name in label_names]).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45, values_format=fmt)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows sum to 1)" if normalize else "true")
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
