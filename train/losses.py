"""The training loss for each problem type, computed by bertfit from the model's logits (the model's own loss
knows no class weights, positive weights or standardised regression targets).

single_label: cross-entropy, optionally class-weighted; multi_label: BCE with logits, optionally with a
per-label positive weight; regression: MSE against (target - mean) / std when targets are standardised.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from train.config import ConfigError

def problem_type_of(manifest: dict) -> str:
    """Data prepared before problem types existed is single-label."""
    return manifest.get("problem_type", "single_label")


def label_weights(setting, label_names: list[str], counts: np.ndarray, totals: np.ndarray, option: str
                  ) -> torch.Tensor | None:
    """null -> None; "balanced" -> totals / counts scaled as sklearn's 'balanced'; {label: weight} -> a vector
    with 1.0 for labels not named. counts/totals: per label, the windows that count (positives / all)."""
    if setting is None:
        return None
    if setting == "balanced":
        if (counts == 0).any():
            missing = [label_names[i] for i in np.flatnonzero(counts == 0)]
            raise ConfigError(f"{option}: balanced needs every label in the training split; no window has "
                              f"{', '.join(map(repr, missing))}")
        return torch.tensor(totals / counts, dtype=torch.float32)
    return torch.tensor([float(setting.get(name, 1.0)) for name in label_names], dtype=torch.float32)


def loss_unit_labels(window_labels: np.ndarray, docs: list[np.ndarray] | None) -> np.ndarray:
    """The labels the loss averages over, for balanced weights: one per window (window objective), or one per
    document (document objective, ``docs`` = each document's window indices; all of them carry its label)."""
    return window_labels if docs is None else window_labels[[int(windows[0]) for windows in docs]]


def make_loss(problem_type: str, label_names: list[str], train_labels: np.ndarray | None, class_weights, pos_weight,
              target_scale: tuple[float, float] | None):
    """loss(logits, labels) for the training loop (settings already checked by the loop's
    resolve_task_settings). train_labels: the training split's label column (one row
    per window: class ids or multi-hot rows), needed only when weights are asked for."""
    if problem_type == "single_label":
        weight = None
        if class_weights is not None:
            counts = np.bincount(train_labels, minlength=len(label_names)).astype(np.float64)
            weight = label_weights(class_weights, label_names, counts,
                                   np.full(len(label_names), len(train_labels) / len(label_names)), "class_weights")

        def loss(logits, labels):
            w = weight.to(logits.device) if weight is not None else None
            return F.cross_entropy(logits.float(), labels, weight=w)
        return loss
    if problem_type == "multi_label":
        weight = None
        if pos_weight is not None:
            positives = train_labels.sum(axis=0).astype(np.float64)
            weight = label_weights(pos_weight, label_names, positives, len(train_labels) - positives, "pos_weight")

        def loss(logits, labels):
            w = weight.to(logits.device) if weight is not None else None
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=w)
        return loss
    mean, std = target_scale or (0.0, 1.0)

    def loss(logits, labels):
        return F.mse_loss(logits.float().squeeze(-1), (labels.float() - mean) / std)
    return loss


def target_scale(manifest: dict, train_split: str, standardize: bool) -> tuple[float, float] | None:
    """(mean, std) of the training split's regression targets, or None (no standardisation)."""
    if not standardize or problem_type_of(manifest) != "regression":
        return None
    stats = manifest["splits"][train_split]["target"]
    return float(stats["mean"]), float(stats["std"]) if stats["std"] > 0 else 1.0
