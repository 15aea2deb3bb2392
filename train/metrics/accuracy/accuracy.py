"""Accuracy through scikit-learn's ``accuracy_score``, as the Hub's ``accuracy`` module computes it.

Same call convention as the Hub's ``accuracy`` (``predictions``, ``references``, optional ``normalize``
and ``sample_weight``), shipped inside bertfit so it loads offline: ``evaluate.load("<path>/accuracy")``.
Loaded with ``config_name="multilabel"`` it takes multi-hot rows and returns subset accuracy (a row
counts as correct only when every label matches), again like the Hub's module.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all the examples:
Accuracy = (TP + TN) / (TP + TN + FP + FN). With `normalize=False` it is the number
(or, with `sample_weight`, the summed weight) of correct predictions instead.
With the `multilabel` configuration each example is a multi-hot row and counts as correct only when the
whole row matches (subset accuracy).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or of `list` of `int` for `multilabel`): Predicted class ids (multi-hot rows).
    references (`list` of `int`, or of `list` of `int` for `multilabel`): Ground-truth class ids (multi-hot rows).
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
    >>> subset = evaluate.load("train/metrics/accuracy", config_name="multilabel")
    >>> subset.compute(references=[[0, 1], [1, 1]], predictions=[[0, 1], [1, 0]])
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
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        y_pred = np.asarray(predictions)
        y_true = np.asarray(references)
        if y_pred.shape[0] != y_true.shape[0]:
            raise ValueError(
                f"predictions and references differ in length: {y_pred.shape[0]} vs {y_true.shape[0]}"
            )
        # scikit-learn returns nan with a warning here; an empty evaluation set is a caller's bug
        if y_true.shape[0] == 0:
            raise ValueError("accuracy is undefined for empty predictions/references")
        if sample_weight is not None and normalize and float(np.sum(sample_weight)) == 0.0:
            raise ValueError("sample_weight sums to zero: normalized accuracy is undefined")
        score = accuracy_score(y_true, y_pred, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}
