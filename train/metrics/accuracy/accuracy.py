"""Accuracy: the fraction (or number) of predictions equal to their reference.

A numpy-only `evaluate` module with the same call convention as the Hub's ``accuracy``
(``predictions``, ``references``, optional ``normalize`` and ``sample_weight``), shipped
inside bertfit so it loads offline: ``evaluate.load("<path>/accuracy")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all the examples:
Accuracy = (TP + TN) / (TP + TN + FP + FN). With `normalize=False` it is the number
(or, with `sample_weight`, the summed weight) of correct predictions instead.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): Ground-truth class ids.
    normalize (`bool`): If True (default), return the fraction of correct predictions;
        if False, return their number (summed `sample_weight` if given).
    sample_weight (`list` of `float`, optional): Per-example weights. Defaults to None.

Returns:
    accuracy (`float`): Between 0 and 1 if `normalize` is True, else between 0 and the
        number of examples (or total weight). Higher is better.

Examples:
    >>> accuracy_metric = evaluate.load("train/metrics/accuracy")
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
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
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        y_pred = np.asarray(predictions).reshape(-1)
        y_true = np.asarray(references).reshape(-1)
        if y_pred.shape != y_true.shape:
            raise ValueError(
                f"predictions and references differ in length: {y_pred.shape[0]} vs {y_true.shape[0]}"
            )
        if y_true.size == 0:
            raise ValueError("accuracy is undefined for empty predictions/references")
        correct = (y_true == y_pred).astype(np.float64)
        if sample_weight is None:
            score = correct.mean() if normalize else correct.sum()
        else:
            weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
            if weights.shape != correct.shape:
                raise ValueError(
                    f"sample_weight has {weights.shape[0]} entries for {correct.shape[0]} examples"
                )
            if normalize:
                if weights.sum() == 0:
                    raise ValueError("sample_weight sums to zero: normalized accuracy is undefined")
                score = np.dot(correct, weights) / weights.sum()
            else:
                score = np.dot(correct, weights)
        return {"accuracy": float(score)}
