"""Precision, recall and F1 for single-label classification, in one pass, numpy only.

An `evaluate` module with the call convention of the Hub's ``precision``, ``recall`` and ``f1``
(``predictions``, ``references``, ``labels``, ``pos_label``, ``average``, ``sample_weight``,
``zero_division``) that returns all three scores from one count of TP, FP and FN, shipped inside
bertfit so it loads offline: ``evaluate.load("<path>/precision_recall_f1")``. Results match
scikit-learn's ``precision_recall_fscore_support`` (checked by tests/test_metrics.py).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Precision = TP / (TP + FP): the fraction of the examples predicted as a class that truly belong to it.
Recall = TP / (TP + FN): the fraction of the examples of a class that are predicted as that class.
F1 = 2 * (precision * recall) / (precision + recall) = 2 TP / (2 TP + FP + FN): their harmonic mean.
All three are computed from the same per-class counts; per-class scores are combined according to
`average` (macro, micro, weighted, binary or None).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): Ground-truth class ids.
    labels (`list` of `int`, optional): The class ids to score, in output order. Defaults to the
        sorted classes present in predictions or references. Pass every class id so that classes
        absent from a small evaluation set still count in macro averages and per-class outputs.
        Ignored when `average='binary'`.
    pos_label (`int`): The positive class when `average='binary'`. Defaults to 1.
    average (`str` or None): One of
        - 'binary' (default): only the `pos_label` class; the data must hold at most two classes.
        - 'micro': from the total TP, FP and FN over `labels`.
        - 'macro': unweighted mean of the per-class scores.
        - 'weighted': per-class scores weighted by their support (number of true examples).
        - None: the per-class scores, as numpy float arrays in `labels` order.
    sample_weight (`list` of `float`, optional): Per-example weights. Defaults to None.
    zero_division (0, 1, nan or "warn"): The score of a class whose score is 0/0, for each metric on
        its own condition: precision when no example is predicted as the class (TP + FP == 0), recall
        when the class has no example in the references (TP + FN == 0), F1 when the class is neither
        predicted nor present in the references (TP + FP + FN == 0).
        Defaults to 0.0 ("warn" also means 0, without a warning). NaN scores are left out of averages.

Returns:
    precision (`float` or `numpy.ndarray` of `float`): Between 0 and 1, higher is better.
    recall (`float` or `numpy.ndarray` of `float`): Between 0 and 1, higher is better.
    f1 (`float` or `numpy.ndarray` of `float`): Between 0 and 1, higher is better.
    Each is a float for every `average` except None, which gives one score per class in `labels` order.

Examples:
    >>> prf_metric = evaluate.load("train/metrics/precision_recall_f1")
    >>> prf_metric.compute(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2], average="macro")
    {'precision': 0.2222222222222222, 'recall': 0.3333333333333333, 'f1': 0.26666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


def _zero_division_value(zero_division):
    if isinstance(zero_division, str):
        if zero_division == "warn":  # scikit-learn's default: behaves as 0 (we do not warn)
            return 0.0
        raise ValueError(f"zero_division must be 0, 1, nan or 'warn', got {zero_division!r}")
    value = float(zero_division)
    if np.isnan(value) or value in (0.0, 1.0):
        return value
    raise ValueError(f"zero_division must be 0, 1, nan or 'warn', got {zero_division!r}")


def _per_class_counts(predictions, references, labels, pos_label, average, sample_weight):
    """Return (labels, tp, pred_sum, true_sum) for the classes the `average` mode scores."""
    if average not in _AVERAGES:
        raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
    y_pred = np.asarray(predictions).reshape(-1)
    y_true = np.asarray(references).reshape(-1)
    if y_pred.shape != y_true.shape:
        raise ValueError(
            f"predictions and references differ in length: {y_pred.shape[0]} vs {y_true.shape[0]}"
        )
    if y_true.size == 0:
        raise ValueError("precision/recall/f1 are undefined for empty predictions/references")
    if sample_weight is None:
        weights = np.ones(y_true.shape[0], dtype=np.float64)
    else:
        weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if weights.shape != y_true.shape:
            raise ValueError(f"sample_weight has {weights.shape[0]} entries for {y_true.shape[0]} examples")

    present = np.union1d(y_true, y_pred)
    if average == "binary":
        # Same rule as scikit-learn: the data must hold at most two classes, and `labels` is ignored.
        if present.size > 2:
            raise ValueError(
                f"average='binary' needs at most two classes in the data, found {present.tolist()}; "
                "use average='macro', 'micro', 'weighted' or None (with labels=...) instead"
            )
        if pos_label not in present and present.size >= 2:
            raise ValueError(f"pos_label={pos_label} is not a valid label; it should be one of {present.tolist()}")
        labels = np.asarray([pos_label])
    elif labels is None:
        labels = present
    else:
        labels = np.asarray(labels).reshape(-1)
        if np.unique(labels).size != labels.size:
            raise ValueError(f"labels contains duplicates: {labels.tolist()}")

    # Map each class value to its position in `labels` (-1 when the value is not scored).
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]

    def position(values):
        if sorted_labels.size == 0:
            return np.full(values.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(sorted_labels, values), 0, sorted_labels.size - 1)
        return np.where(sorted_labels[pos] == values, order[pos], -1)

    k = labels.size
    true_idx = position(y_true)
    pred_idx = position(y_pred)
    hit = (y_true == y_pred) & (true_idx >= 0)
    tp = np.bincount(true_idx[hit], weights=weights[hit], minlength=k)[:k]
    true_sum = np.bincount(true_idx[true_idx >= 0], weights=weights[true_idx >= 0], minlength=k)[:k]
    pred_sum = np.bincount(pred_idx[pred_idx >= 0], weights=weights[pred_idx >= 0], minlength=k)[:k]
    return labels, tp, pred_sum, true_sum


def _divide(numerator, denominator, zero_division):
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    zero = denominator == 0
    result = numerator / np.where(zero, 1.0, denominator)
    result[zero] = _zero_division_value(zero_division)
    return result


def _average_scores(scores, true_sum, average):
    """Average per-class scores like scikit-learn (NaNs from zero_division=nan are skipped)."""
    if average is None:
        return scores
    keep = ~np.isnan(scores)
    if scores.size == 0 or not keep.any():
        return float("nan")
    if average == "weighted":
        weights = true_sum[keep]
        if weights.sum() != 0:
            return float(np.average(scores[keep], weights=weights))
    return float(np.mean(scores[keep]))


def _precision_recall_f1(predictions, references, labels, pos_label, average, sample_weight, zero_division):
    _zero_division_value(zero_division)  # validate early
    labels, tp, pred_sum, true_sum = _per_class_counts(
        predictions, references, labels, pos_label, average, sample_weight
    )
    if average == "micro":
        tp, pred_sum, true_sum = (np.atleast_1d(x.sum()) for x in (tp, pred_sum, true_sum))
    # Each metric divides by its own denominator, so each has its own 0/0 condition:
    # precision TP + FP, recall TP + FN, f1 2 TP + FP + FN (= true_sum + pred_sum).
    scores = {
        "precision": _divide(tp, pred_sum, zero_division),
        "recall": _divide(tp, true_sum, zero_division),
        "f1": _divide(2.0 * tp, true_sum + pred_sum, zero_division),
    }
    return {name: _average_scores(value, true_sum, average) for name, value in scores.items()}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PrecisionRecallF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.precision_recall_fscore_support.html"
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
        zero_division=0.0,
    ):
        return _precision_recall_f1(
            predictions, references, labels, pos_label, average, sample_weight, zero_division
        )
