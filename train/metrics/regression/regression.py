"""Regression scores: mean squared error and mean absolute error (scikit-learn), Pearson and Spearman
correlation (scipy.stats, which scikit-learn depends on), from one call.

An `evaluate` module shipped inside bertfit so it loads offline: ``evaluate.load("<path>/regression")``.
One module rather than four (the Hub has ``mse``, ``mae``, ``pearsonr``, ``spearmanr``) because the
training loop wants all four on every evaluation and an `evaluate` module must be a single file.
"""

import warnings

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error

_DESCRIPTION = """
MSE = mean((prediction - reference)^2); MAE = mean(|prediction - reference|); Pearson = the linear
correlation of predictions and references; Spearman = the correlation of their ranks. The correlations are
NaN when either side is constant (or with fewer than two examples): they are undefined there.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): Predicted values.
    references (`list` of `float`): Ground-truth values.
    sample_weight (`list` of `float`, optional): Per-example weights for MSE and MAE. Defaults to None.

Returns:
    mse (`float`): 0 or more, lower is better.
    mae (`float`): 0 or more, lower is better.
    pearson (`float`): Between -1 and 1, higher is better (NaN when undefined).
    spearman (`float`): Between -1 and 1, higher is better (NaN when undefined).

Examples:
    >>> regression_metric = evaluate.load("train/metrics/regression")
    >>> regression_metric.compute(predictions=[1.0, 2.0, 4.0], references=[1.0, 3.0, 3.0])
    {'mse': 0.6666666666666666, 'mae': 0.6666666666666666, 'pearson': 0.7559289460184543, 'spearman': 0.8660254037844387}
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


def _correlation(function, y_true, y_pred):
    # undefined (not an error) for a constant side or a single example: NaN, without scipy's warning
    if y_true.shape[0] < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(function(y_true, y_pred)[0])


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Regression(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float64"),
                    "references": datasets.Value("float64"),
                }
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.mean_squared_error.html",
                "https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html",
                "https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.spearmanr.html",
            ],
        )

    def _compute(self, predictions, references, sample_weight=None):
        y_pred = np.asarray(predictions, dtype=np.float64).reshape(-1)
        y_true = np.asarray(references, dtype=np.float64).reshape(-1)
        if y_pred.shape != y_true.shape:
            raise ValueError(
                f"predictions and references differ in length: {y_pred.shape[0]} vs {y_true.shape[0]}"
            )
        if y_true.size == 0:
            raise ValueError("regression scores are undefined for empty predictions/references")
        if not (np.all(np.isfinite(y_pred)) and np.all(np.isfinite(y_true))):
            raise ValueError("predictions and references must be finite numbers")
        return {
            "mse": float(mean_squared_error(y_true, y_pred, sample_weight=sample_weight)),
            "mae": float(mean_absolute_error(y_true, y_pred, sample_weight=sample_weight)),
            "pearson": _correlation(pearsonr, y_true, y_pred),
            "spearman": _correlation(spearmanr, y_true, y_pred),
        }
