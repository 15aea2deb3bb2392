"""Evaluation: window logits from every rank gathered exactly once, pooled into document predictions,
scored with the project's `evaluate` metric modules."""

from __future__ import annotations

import numpy as np
import torch

from train.data import model_inputs
from train.metrics import classification_metrics, confusion_matrix


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def pool_document_logits(logits: np.ndarray, doc_ids: np.ndarray, pooling: str = "mean"
                         ) -> tuple[np.ndarray, np.ndarray]:
    """One probability vector per document from its windows' logits.

    mean: average of the windows' class probabilities. max: per class, the highest probability any window
    gives it, renormalised to sum to 1. Returns (sorted unique doc ids, probabilities [docs, classes])."""
    order = np.argsort(doc_ids, kind="stable")
    ids = doc_ids[order]
    probs = softmax(logits[order].astype(np.float64))
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    if pooling == "mean":
        counts = np.diff(np.r_[starts, len(ids)])
        pooled = np.add.reduceat(probs, starts, axis=0) / counts[:, None]
    elif pooling == "max":
        pooled = np.maximum.reduceat(probs, starts, axis=0)
        pooled /= pooled.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"pooling must be mean or max, got {pooling!r}")
    return ids[starts], pooled


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
def run_evaluation(accelerator, model, loader, label_names: list[str], pooling: str,
                   expected_windows: int) -> tuple[dict[str, float], np.ndarray]:
    """Metrics (window_* and doc_* keys, losses included) and the document confusion matrix."""
    model.eval()
    logits, labels, docs, rows = [], [], [], []
    for batch in loader:
        out = model(**{k: v for k, v in model_inputs(batch, accelerator.device).items() if k != "labels"})
        logits.append(out.logits.float())
        labels.append(batch["labels"])
        docs.append(batch["doc_ids"])
        rows.append(batch["rows"])
    num_labels = len(label_names)
    local = {
        "logits": torch.cat(logits) if logits else torch.zeros(0, num_labels, device=accelerator.device),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        "docs": torch.cat(docs) if docs else torch.zeros(0, dtype=torch.long),
        "rows": torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long),
    }
    got = gather_exactly_once(accelerator, local)
    model.train()
    # Every window exactly once: a duplicated or missing window would skew the metrics silently.
    if len(got["rows"]) != expected_windows or len(np.unique(got["rows"])) != expected_windows:
        raise RuntimeError(f"evaluation saw {len(got['rows'])} windows ({len(np.unique(got['rows']))} distinct), "
                           f"expected {expected_windows}")
    return score(got["logits"], got["labels"], got["docs"], label_names, pooling)


def score(logits: np.ndarray, labels: np.ndarray, doc_ids: np.ndarray, label_names: list[str],
          pooling: str) -> tuple[dict[str, float], np.ndarray]:
    logits = logits.astype(np.float64)
    probs = softmax(logits)
    metrics = classification_metrics(probs.argmax(1), labels, label_names, prefix="window_")
    metrics["window_loss"] = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    doc_ids_sorted, doc_probs = pool_document_logits(logits, doc_ids, pooling)
    order = np.argsort(doc_ids, kind="stable")
    first = np.flatnonzero(np.r_[True, doc_ids[order][1:] != doc_ids[order][:-1]])
    doc_labels = labels[order][first]
    doc_pred = doc_probs.argmax(1)
    metrics.update(classification_metrics(doc_pred, doc_labels, label_names, prefix="doc_"))
    metrics["doc_loss"] = float(-np.log(np.clip(doc_probs[np.arange(len(doc_labels)), doc_labels], 1e-12,
                                                None)).mean())
    metrics["num_docs"] = float(len(doc_labels))
    metrics["num_windows"] = float(len(labels))
    return metrics, confusion_matrix(doc_pred, doc_labels, len(label_names))


def confusion_matrix_image(matrix: np.ndarray, label_names: list[str]) -> np.ndarray:
    """An RGB image (H, W, 3, uint8) of the confusion matrix for TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(label_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.7 * n), dpi=80)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), label_names, rotation=45, ha="right")
    ax.set_yticks(range(n), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
