"""Precision, recall and F1 in one call of scikit-learn's ``precision_recall_fscore_support``.

An `evaluate` module with the call convention of the Hub's ``precision``, ``recall`` and ``f1``
(``predictions``, ``references``, ``labels``, ``pos_label``, ``average``, ``sample_weight``,
``zero_division``) that returns all three scores from one scikit-learn call, shipped inside bertfit so it
loads offline: ``evaluate.load("<path>/precision_recall_f1")``. Loaded with ``config_name="multilabel"``
it takes multi-hot rows (and also accepts ``average="samples"``), like the Hub's ``f1`` module.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import precision_recall_fscore_support

_DESCRIPTION = """
Precision = TP / (TP + FP): the fraction of the examples predicted as a class that truly belong to it.
Recall = TP / (TP + FN): the fraction of the examples of a class that are predicted as that class.
F1 = 2 * (precision * recall) / (precision + recall) = 2 TP / (2 TP + FP + FN): their harmonic mean.
All three come from one call of scikit-learn's precision_recall_fscore_support; per-class scores are
combined according to `average` (macro, micro, weighted, binary, samples (multilabel only) or None).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or of multi-hot `list` of `int` for `multilabel`): Predicted class ids.
    references (`list` of `int`, or of multi-hot `list` of `int` for `multilabel`): Ground-truth class ids.
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
        - 'samples' (`multilabel` only): the mean over examples of each example's score.
        - None: the per-class scores, as numpy float arrays in `labels` order.
    sample_weight (`list` of `float`, optional): Per-example weights. Defaults to None.
    zero_division (0, 1, nan or "warn"): The score of a 0/0 division (see scikit-learn). Defaults to 0.0
        ("warn" also means 0, without a warning). NaN scores are left out of averages.

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
    # "warn" is scikit-learn's default and means 0; we pass 0 so that no warning is printed
    if isinstance(zero_division, str):
        if zero_division == "warn":
            return 0.0
        raise ValueError(f"zero_division must be 0, 1, nan or 'warn', got {zero_division!r}")
    value = float(zero_division)
    if np.isnan(value) or value in (0.0, 1.0):
        return value
    raise ValueError(f"zero_division must be 0, 1, nan or 'warn', got {zero_division!r}")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PrecisionRecallF1(evaluate.Metric):
    def _info(self):
        value = datasets.Value("int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(value) if self.config_name == "multilabel" else value,
                    "references": datasets.Sequence(value) if self.config_name == "multilabel" else value,
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
        averages = _AVERAGES + (("samples",) if self.config_name == "multilabel" else ())
        if average not in averages:
            raise ValueError(f"average must be one of {averages}, got {average!r}")
        zero_division = _zero_division_value(zero_division)
        y_pred = np.asarray(predictions)
        y_true = np.asarray(references)
        if y_pred.shape[0] != y_true.shape[0]:
            raise ValueError(
                f"predictions and references differ in length: {y_pred.shape[0]} vs {y_true.shape[0]}"
            )
        if y_true.shape[0] == 0:
            raise ValueError("precision/recall/f1 are undefined for empty predictions/references")
        if labels is not None and len(set(np.asarray(labels).reshape(-1).tolist())) != len(labels):
            raise ValueError(f"labels contains duplicates: {list(labels)}")
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, pos_label=pos_label, average=average,
            sample_weight=sample_weight, zero_division=zero_division,
        )
        if average is None:
            return {"precision": precision, "recall": recall, "f1": f1}
        return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
