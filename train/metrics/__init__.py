"""Metrics for the training loop and the evaluate CLI, per problem type, computed through `evaluate`
modules that call scikit-learn (as the Hub's own ``accuracy`` and ``f1`` modules do).

bertfit ships its own `evaluate` modules (``train/metrics/<name>/<name>.py``) because
``evaluate.load("accuracy")`` needs the Hub. Loading them by local path works with
``HF_HUB_OFFLINE=1``. There are three:

* ``accuracy``: ``{"accuracy": ...}`` from ``sklearn.metrics.accuracy_score``, like the Hub's
  ``accuracy``; with ``config_name="multilabel"`` it takes multi-hot rows (subset accuracy).
* ``precision_recall_f1``: ``{"precision": ..., "recall": ..., "f1": ...}`` from one
  ``sklearn.metrics.precision_recall_fscore_support`` call, with the arguments of the Hub's
  ``precision``/``recall``/``f1`` (``labels``, ``pos_label``, ``average``, ``sample_weight``,
  ``zero_division``); ``config_name="multilabel"`` takes multi-hot rows and allows
  ``average="samples"``. One module rather than three: one call gives all three scores.
* ``regression``: ``{"mse", "mae", "pearson", "spearman"}`` (scikit-learn's mean_squared_error and
  mean_absolute_error, scipy.stats' pearsonr and spearmanr).

Which modules a problem type uses: :func:`load_metric_modules`. The flat metric dicts the loop logs:
:func:`classification_metrics` (single_label), :func:`multilabel_metrics`, :func:`regression_metrics`;
their names without computing anything: :func:`metric_names`; whether higher is better: :func:`metric_mode`.

How `evaluate` treats a local module, and what this file does about it:

* ``evaluate.load(path)`` copies the script into ``$HF_MODULES_CACHE/evaluate_modules/metrics/
  <name>/<sha256 of the code>/`` (default ``~/.cache/huggingface/modules``) and imports it from
  there. The copy is made under a file lock (``.../metrics/<name>.lock``), so two processes loading
  at once are safe (tests/test_metrics.py starts two at the same moment on an empty cache).
* ``compute()`` by default writes the predictions to an Arrow file
  ``$HF_METRICS_CACHE/<name>/default/<experiment_id>-1-0.arrow`` guarded by a lock. With the default
  ``experiment_id`` two processes computing at the same time collide on that lock: the second one
  stalls for its 1 s lock timeout, then falls back to a random file name. We load every module with
  ``keep_in_memory=True`` (no cache files, no locks during compute) and a per-process
  ``experiment_id`` anyway, so concurrent jobs never wait on each other.

Import cost: this module imports only numpy; `evaluate` (and scikit-learn) are imported on the first
load of the modules.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import evaluate

__all__ = [
    "METRICS_DIR",
    "METRIC_NAMES",
    "PROBLEM_TYPES",
    "classification_metrics",
    "confusion_matrix",
    "load_classification_metrics",
    "load_metric_modules",
    "metric_mode",
    "metric_names",
    "metric_path",
    "multilabel_metrics",
    "regression_metrics",
    "sanitize_label_name",
]

METRICS_DIR = Path(__file__).resolve().parent
"""The folder holding the evaluate modules, one ``<name>/<name>.py`` per name in :data:`METRIC_NAMES`."""

METRIC_NAMES = ("accuracy", "precision_recall_f1", "regression")

PROBLEM_TYPES = ("single_label", "multi_label", "regression")

# module name -> evaluate config name, per problem type
_MODULES_BY_PROBLEM = {
    "single_label": {"accuracy": None, "precision_recall_f1": None},
    "multi_label": {"accuracy": "multilabel", "precision_recall_f1": "multilabel"},
    "regression": {"regression": None},
}

_RESERVED_SUFFIXES = frozenset({"macro", "micro", "weighted", "binary"})
# multi_label also reports f1_samples; single_label keeps today's keys for a label named "samples"
_RESERVED_SUFFIXES_MULTI = _RESERVED_SUFFIXES | {"samples"}

_load_lock = threading.Lock()
_loaded: dict[tuple[int, str | None, str], dict[str, Any]] = {}


def metric_path(name: str) -> Path:
    """Path of the shipped module script ``name`` (one of :data:`METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; bertfit ships {list(METRIC_NAMES)}")
    return METRICS_DIR / name / f"{name}.py"


def check_problem_type(problem_type: str) -> str:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {', '.join(PROBLEM_TYPES)}, got {problem_type!r}")
    return problem_type


def load_metric_modules(problem_type: str = "single_label", cache_dir: str | os.PathLike | None = None
                        ) -> dict[str, "evaluate.EvaluationModule"]:
    """Load the shipped modules a problem type uses once per process; returns ``{name: EvaluationModule}``.

    single_label: ``accuracy`` and ``precision_recall_f1``; multi_label: the same two in their
    ``multilabel`` configuration; regression: ``regression``.

    Works offline: each module is loaded from its local path. Modules are kept in memory
    (``keep_in_memory=True``) with a per-process ``experiment_id``, so several processes can load and
    compute concurrently without touching shared cache files. ``cache_dir`` only moves the (then
    empty) per-metric folders evaluate creates, default ``$HF_METRICS_CACHE``.

    The returned modules are shared within the process; they are not thread-safe (``compute`` buffers
    its inputs on the instance), so do not call the same one from two threads at once.
    """
    check_problem_type(problem_type)
    key = (os.getpid(), None if cache_dir is None else str(cache_dir), problem_type)
    with _load_lock:
        modules = _loaded.get(key)
        if modules is None:
            import evaluate  # lazy: keeps `import train.metrics` cheap

            experiment_id = f"bertfit-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            modules = {}
            for name, config_name in _MODULES_BY_PROBLEM[problem_type].items():
                path = metric_path(name)
                if not path.is_file():
                    raise FileNotFoundError(f"metric module {path} is missing from the bertfit install")
                modules[name] = evaluate.load(
                    str(path),
                    config_name=config_name,
                    keep_in_memory=True,
                    experiment_id=experiment_id,
                    cache_dir=None if cache_dir is None else str(cache_dir),
                )
            _loaded[key] = modules
    return dict(modules)


def load_classification_metrics(cache_dir: str | os.PathLike | None = None) -> dict[str, "evaluate.EvaluationModule"]:
    """The single_label modules (``accuracy``, ``precision_recall_f1``): :func:`load_metric_modules`
    for ``"single_label"``, kept under its old name for the callers that use it."""
    return load_metric_modules("single_label", cache_dir)


def metric_mode(name: str) -> str:
    """``"min"`` for losses and errors (``loss``, ``mse``, ``mae``, with or without a ``doc_`` /
    ``window_`` prefix), ``"max"`` for every other metric (accuracy, F1, precision, recall, correlations).

    Matched on the whole name after the prefix, so a per-label key such as ``f1_gloss`` stays "max"."""
    bare = re.sub(r"^(doc|window)_", "", str(name))
    return "min" if bare in ("loss", "mse", "mae") else "max"


def sanitize_label_name(name: str) -> str:
    """Replace every character outside ``[A-Za-z0-9_]`` by ``_`` ("sci/tech" -> "sci_tech")."""
    return re.sub(r"[^A-Za-z0-9_]", "_", str(name))


def _label_keys(label_names: Sequence[str], reserved: frozenset[str] = _RESERVED_SUFFIXES) -> list[str]:
    """One unique, sanitized key part per label, in label-id order.

    An empty name, a name that would clash with an average key (``f1_macro``, ``f1_binary``, ...) or a
    name that sanitizes to the same string as an earlier label gets its class id appended
    ("a/b", "a-b" -> "a_b", "a_b_1").
    """
    keys: list[str] = []
    used: set[str] = set()
    for idx, name in enumerate(label_names):
        key = sanitize_label_name(name)
        if not key:
            key = f"label_{idx}"
        if key in reserved or key in used:
            key = f"{key}_{idx}"
        while key in used:  # pathological names such as ["a_1", "a", "a"]
            key = f"{key}_{idx}"
        used.add(key)
        keys.append(key)
    return keys


def _as_label_ids(values: Any, what: str) -> np.ndarray:
    """Convert a list / numpy array / torch tensor of class ids to a 1-D int64 array."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor, without importing torch
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim == 0:
        raise ValueError(f"{what} must be a 1-D sequence of class ids, got a scalar")
    if array.ndim != 1:
        raise ValueError(
            f"{what} must be a 1-D sequence of class ids, got shape {array.shape} "
            "(pass argmax over the logits, not the logits)"
        )
    if array.size == 0:
        return array.astype(np.int64)
    if array.dtype == bool:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64, copy=False)
    if np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype(np.int64)
    raise ValueError(f"{what} must hold integer class ids, got dtype {array.dtype}")


def _checked_pair(
    predictions: Any, references: Any, num_labels: int, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    if num_labels < 1:
        raise ValueError(f"need at least one label, got num_labels={num_labels}")
    y_pred = _as_label_ids(predictions, "predictions")
    y_true = _as_label_ids(references, "references")
    if y_pred.shape[0] != y_true.shape[0]:
        raise ValueError(
            f"predictions and references differ in length: {y_pred.shape[0]} vs {y_true.shape[0]}"
        )
    if y_true.shape[0] == 0 and not allow_empty:
        raise ValueError("cannot compute classification metrics on an empty evaluation set (0 examples)")
    for what, array in (("predictions", y_pred), ("references", y_true)):
        bad = (array < 0) | (array >= num_labels)
        if bad.any():
            raise ValueError(
                f"{what} hold class ids outside [0, {num_labels}): {np.unique(array[bad])[:10].tolist()} "
                "(drop ignored positions such as -100 before computing metrics)"
            )
    return y_pred, y_true


def metric_names(label_names: Sequence[str], problem_type: str = "single_label") -> list[str]:
    """The unprefixed metric names the evaluation reports for these labels and problem type (``loss`` first),
    known without loading `evaluate`: for validating ``early_stopping.metric`` (with a ``doc_`` or
    ``window_`` prefix) before training starts.

    single_label: loss, accuracy, precision_macro, recall_macro, f1_macro, f1_<label>..., f1_binary (2 labels).
    multi_label: loss (BCE), f1_micro, f1_macro, f1_samples, f1_<label>..., subset_accuracy, precision_micro,
    recall_micro. regression: loss (= MSE), mse, mae, pearson, spearman.
    """
    check_problem_type(problem_type)
    if isinstance(label_names, str):
        raise TypeError("label_names must be a sequence of names, not a single string")
    if problem_type == "regression":
        return ["loss", "mse", "mae", "pearson", "spearman"]
    if problem_type == "multi_label":
        keys = _label_keys(list(label_names), _RESERVED_SUFFIXES_MULTI)
        return (["loss", "f1_micro", "f1_macro", "f1_samples"] + [f"f1_{key}" for key in keys]
                + ["subset_accuracy", "precision_micro", "recall_micro"])
    names = ["loss", "accuracy", "precision_macro", "recall_macro", "f1_macro"]
    names += [f"f1_{key}" for key in _label_keys(list(label_names))]
    return names + (["f1_binary"] if len(label_names) == 2 else [])


def classification_metrics(
    predictions: Any,
    references: Any,
    label_names: Sequence[str],
    prefix: str = "",
) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1 and per-class F1, computed by the shipped evaluate modules.

    ``predictions`` and ``references`` are class ids in ``[0, len(label_names))`` (lists, numpy arrays
    or torch tensors). Every class id is scored (``labels=range(len(label_names))``), so classes missing
    from a small evaluation set count as 0 in the macro averages (``zero_division=0``).

    Returns a flat dict of plain floats with keys (each prefixed by ``prefix``): ``accuracy``,
    ``precision_macro``, ``recall_macro``, ``f1_macro``, ``f1_<label>`` for every label (names
    sanitized to ``[A-Za-z0-9_]``, see :func:`_label_keys` for clashes), and with exactly two labels
    ``f1_binary`` (positive class = id 1).

    Two ``compute`` calls: ``accuracy``, and ``precision_recall_f1`` with ``average=None`` over every
    class id and ``zero_division=0``. The other numbers are read off those per-class scores, and are
    exactly what the module returns for them (tests/test_metrics.py checks this): with
    ``zero_division=0`` no score is NaN, so ``average="macro"`` is the plain mean of the per-class
    scores; with two labels, ``average="binary", pos_label=1`` scores class 1 alone, i.e. its
    per-class entry.
    """
    if isinstance(label_names, str):
        raise TypeError("label_names must be a sequence of names, not a single string")
    label_names = list(label_names)
    num_labels = len(label_names)
    y_pred, y_true = _checked_pair(predictions, references, num_labels)
    labels = list(range(num_labels))
    modules = load_classification_metrics()

    results: dict[str, float] = {}
    results["accuracy"] = modules["accuracy"].compute(predictions=y_pred, references=y_true)["accuracy"]
    out = modules["precision_recall_f1"].compute(
        predictions=y_pred, references=y_true, labels=labels, average=None, zero_division=0.0
    )
    per_class = {}
    for name in ("precision", "recall", "f1"):
        scores = np.asarray(out[name], dtype=np.float64).reshape(-1)
        if scores.shape[0] != num_labels:  # defensive: the module must return one score per label
            raise RuntimeError(f"{name} returned {scores.shape[0]} per-class scores for {num_labels} labels")
        per_class[name] = scores
        results[f"{name}_macro"] = np.mean(scores)  # = average="macro" (no NaN with zero_division=0)
    for key, score in zip(_label_keys(label_names), per_class["f1"]):
        results[f"f1_{key}"] = score
    if num_labels == 2:
        results["f1_binary"] = per_class["f1"][1]  # = average="binary", pos_label=1
    return {f"{prefix}{key}": float(value) for key, value in results.items()}


def _as_multi_hot(values: Any, what: str, num_labels: int) -> np.ndarray:
    """A [N, num_labels] int64 array of 0/1 (lists, numpy arrays, torch tensors, bools)."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 2 or array.shape[1] != num_labels:
        raise ValueError(f"{what} must be multi-hot rows of {num_labels} labels, got shape {array.shape}")
    if array.size and not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{what} must hold only 0 and 1 (multi-hot); threshold probabilities first")
    return array.astype(np.int64)


def multilabel_metrics(predictions: Any, references: Any, label_names: Sequence[str], prefix: str = "",
                       ) -> dict[str, float]:
    """Multi-label scores from multi-hot rows ``[N, len(label_names)]``, by the shipped modules in their
    ``multilabel`` configuration: ``f1_micro``, ``f1_macro``, ``f1_samples``, ``f1_<label>``,
    ``subset_accuracy``, ``precision_micro``, ``recall_micro`` (each prefixed by ``prefix``).

    Every label is scored (``labels=range(L)``) with ``zero_division=0``: a label never present and never
    predicted scores 0 and counts in ``f1_macro``, and a row with no true and no predicted label scores 0
    in ``f1_samples`` (scikit-learn's convention), as single_label does for absent classes.
    """
    if isinstance(label_names, str):
        raise TypeError("label_names must be a sequence of names, not a single string")
    label_names = list(label_names)
    num_labels = len(label_names)
    y_pred = _as_multi_hot(predictions, "predictions", num_labels)
    y_true = _as_multi_hot(references, "references", num_labels)
    if y_pred.shape[0] != y_true.shape[0]:
        raise ValueError(f"predictions and references differ in length: {y_pred.shape[0]} vs {y_true.shape[0]}")
    if y_true.shape[0] == 0:
        raise ValueError("cannot compute multi-label metrics on an empty evaluation set (0 examples)")
    modules = load_metric_modules("multi_label")
    prf = modules["precision_recall_f1"]
    labels = list(range(num_labels))
    per_label = prf.compute(predictions=y_pred, references=y_true, labels=labels, average=None, zero_division=0.0)
    micro = prf.compute(predictions=y_pred, references=y_true, labels=labels, average="micro", zero_division=0.0)
    samples = prf.compute(predictions=y_pred, references=y_true, labels=labels, average="samples",
                          zero_division=0.0)
    f1 = np.asarray(per_label["f1"], dtype=np.float64).reshape(-1)
    results = {"f1_micro": micro["f1"], "f1_macro": np.mean(f1), "f1_samples": samples["f1"]}
    for key, value in zip(_label_keys(label_names, _RESERVED_SUFFIXES_MULTI), f1):
        results[f"f1_{key}"] = value
    results["subset_accuracy"] = modules["accuracy"].compute(predictions=y_pred, references=y_true)["accuracy"]
    results["precision_micro"] = micro["precision"]
    results["recall_micro"] = micro["recall"]
    return {f"{prefix}{key}": float(value) for key, value in results.items()}


def regression_metrics(predictions: Any, references: Any, prefix: str = "") -> dict[str, float]:
    """``mse``, ``mae``, ``pearson``, ``spearman`` (each prefixed by ``prefix``) by the shipped ``regression``
    module. The correlations are NaN where they are undefined (a constant side, fewer than 2 examples)."""
    values = []
    for what, array in (("predictions", predictions), ("references", references)):
        if hasattr(array, "detach") and hasattr(array, "cpu"):
            array = array.detach().cpu().numpy()
        array = np.asarray(array, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"{what} must be a 1-D sequence of values, got shape {array.shape}")
        values.append(array)
    y_pred, y_true = values
    if y_pred.shape[0] != y_true.shape[0]:
        raise ValueError(f"predictions and references differ in length: {y_pred.shape[0]} vs {y_true.shape[0]}")
    if y_true.shape[0] == 0:
        raise ValueError("cannot compute regression metrics on an empty evaluation set (0 examples)")
    out = load_metric_modules("regression")["regression"].compute(predictions=y_pred, references=y_true)
    return {f"{prefix}{key}": float(out[key]) for key in ("mse", "mae", "pearson", "spearman")}


def confusion_matrix(predictions: Any, references: Any, num_labels: int) -> np.ndarray:
    """``(num_labels, num_labels)`` int64 counts from ``sklearn.metrics.confusion_matrix`` with
    ``labels=range(num_labels)``; rows are true labels, columns predicted labels.

    Empty inputs give an all-zero matrix (scikit-learn refuses them); class ids outside
    ``[0, num_labels)`` raise.
    """
    num_labels = int(num_labels)
    y_pred, y_true = _checked_pair(predictions, references, num_labels, allow_empty=True)
    if y_true.shape[0] == 0:
        return np.zeros((num_labels, num_labels), dtype=np.int64)
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    matrix = sk_confusion_matrix(y_true, y_pred, labels=list(range(num_labels)))
    return matrix.astype(np.int64, copy=False)
