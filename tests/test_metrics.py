"""The shipped evaluate modules (train/metrics/<name>/<name>.py: accuracy, precision_recall_f1, regression)
and the train.metrics API for single_label (multi_label and regression: tests/test_evaluation_tasks.py).

The modules call scikit-learn; every number is still checked against a direct scikit-learn call, so a
wrong argument passed through (labels, average, zero_division, ...) shows. Loading is checked offline,
in fresh processes, and with two processes at once.
"""

from __future__ import annotations

import inspect
import json
import math
import multiprocessing
import os
import queue as queue_module
import fnmatch
import re
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

import train.metrics as tm

NAMES5 = ["world", "sports", "business", "sci/tech", "other label"]
CLASSIFICATION_MODULES = ("accuracy", "precision_recall_f1")  # what load_classification_metrics returns
PRF = ("precision", "recall", "f1")  # the keys precision_recall_f1 returns, in sklearn's order


@pytest.fixture(scope="module")
def skm():
    return pytest.importorskip("sklearn.metrics")


@pytest.fixture(scope="module")
def modules():
    return tm.load_classification_metrics()


@pytest.fixture(scope="module")
def prf(modules):
    return modules["precision_recall_f1"]


def _sk_prf(skm, y_true, y_pred, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning for zero_division="warn"
        return skm.precision_recall_fscore_support(y_true, y_pred, **kwargs)


def _case(name):
    """(references, predictions, num_classes) for a named edge case or a random one."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # deterministic per case
    if name.startswith("random2"):
        return rng.integers(0, 2, 60), rng.integers(0, 2, 60), 2
    if name.startswith("random5"):
        return rng.integers(0, 5, 200), rng.integers(0, 5, 200), 5
    if name == "never_predicted":  # class 3 occurs in the references but is never predicted
        y_true = np.array([0, 1, 2, 3, 3, 0, 1, 2, 3, 4, 4])
        y_pred = np.array([0, 1, 1, 0, 2, 0, 2, 2, 1, 4, 0])
        return y_true, y_pred, 5
    if name == "absent_from_references":  # class 2 is predicted but never a reference; 4 in neither
        y_true = np.array([0, 0, 1, 1, 3, 3, 0])
        y_pred = np.array([0, 2, 1, 2, 3, 0, 2])
        return y_true, y_pred, 5
    if name == "perfect5":
        y = rng.integers(0, 5, 50)
        return y, y.copy(), 5
    if name == "all_wrong5":
        y_true = rng.integers(0, 5, 50)
        return y_true, (y_true + 1 + rng.integers(0, 4, 50)) % 5, 5
    if name == "all_wrong2":
        y_true = rng.integers(0, 2, 30)
        return y_true, 1 - y_true, 2
    if name == "one_class_only":  # every reference and prediction is class 0 of 2
        return np.zeros(9, dtype=int), np.zeros(9, dtype=int), 2
    raise KeyError(name)


CASES = [
    "random2_0",
    "random2_1",
    "random5_0",
    "random5_1",
    "random5_2",
    "never_predicted",
    "absent_from_references",
    "perfect5",
    "all_wrong5",
    "all_wrong2",
    "one_class_only",
]


def test_cases_really_are_edge_cases():
    y_true, y_pred, _ = _case("never_predicted")
    assert 3 in y_true and 3 not in y_pred
    y_true, y_pred, _ = _case("absent_from_references")
    assert 2 in y_pred and 2 not in y_true and 4 not in y_true and 4 not in y_pred
    y_true, y_pred, _ = _case("perfect5")
    assert np.array_equal(y_true, y_pred)
    y_true, y_pred, _ = _case("all_wrong5")
    assert not np.any(y_true == y_pred)


# ----------------------------------------------------------------------- the evaluate modules


@pytest.mark.parametrize("case", CASES)
def test_accuracy_matches_sklearn(skm, modules, case):
    y_true, y_pred, _ = _case(case)
    weights = np.random.default_rng(7).uniform(0.1, 2.0, y_true.shape[0])
    acc = modules["accuracy"]
    for normalize in (True, False):
        got = acc.compute(predictions=y_pred, references=y_true, normalize=normalize)["accuracy"]
        assert isinstance(got, float)
        assert got == pytest.approx(skm.accuracy_score(y_true, y_pred, normalize=normalize))
        got_w = acc.compute(
            predictions=y_pred, references=y_true, normalize=normalize, sample_weight=weights.tolist()
        )["accuracy"]
        assert got_w == pytest.approx(
            skm.accuracy_score(y_true, y_pred, normalize=normalize, sample_weight=weights)
        )


@pytest.mark.parametrize("case", CASES)
def test_prf_matches_sklearn(skm, prf, case):
    y_true, y_pred, k = _case(case)
    all_ids = list(range(k))
    # every average x zero_division with all class ids passed, plus inferred labels (None)
    settings = [(0.0, all_ids), (1.0, all_ids), (np.nan, all_ids), ("warn", None)]
    for average in ("macro", "micro", "weighted", None):
        for zero_division, labels in settings:
            expected = _sk_prf(skm, y_true, y_pred, labels=labels, average=average, zero_division=zero_division)
            out = prf.compute(
                predictions=y_pred, references=y_true, labels=labels, average=average,
                zero_division=zero_division,
            )
            assert list(out) == list(PRF)  # exactly these keys, all from the one call
            for name, want in zip(PRF, expected[:3]):
                got = out[name]
                if average is None:
                    assert isinstance(got, np.ndarray) and got.shape == np.shape(want)
                else:
                    assert isinstance(got, float)
                np.testing.assert_allclose(
                    got, want, rtol=1e-12, atol=1e-12, equal_nan=True,
                    err_msg=f"{name} average={average} zero_division={zero_division} labels={labels}",
                )


@pytest.mark.parametrize("case", [c for c in CASES if _case(c)[2] == 2])
def test_binary_matches_sklearn(skm, prf, case):
    y_true, y_pred, _ = _case(case)
    for pos_label in (1, 0):
        for zero_division in (0.0, 1.0):
            expected = _sk_prf(
                skm, y_true, y_pred, average="binary", pos_label=pos_label, zero_division=zero_division
            )[:3]
            out = prf.compute(
                predictions=y_pred, references=y_true, average="binary", pos_label=pos_label,
                zero_division=zero_division,
            )
            assert list(out) == list(PRF)
            for name, want in zip(PRF, expected):
                got = out[name]
                assert isinstance(got, float)
                assert got == pytest.approx(want, abs=1e-12), f"{name} pos_label={pos_label} {zero_division}"


def test_binary_is_the_default_average(prf):
    y_true, y_pred, _ = _case("random2_0")
    default_out = prf.compute(predictions=y_pred, references=y_true)
    binary_out = prf.compute(predictions=y_pred, references=y_true, average="binary")
    macro_out = prf.compute(predictions=y_pred, references=y_true, average="macro")
    for name in PRF:
        default, binary, macro = default_out[name], binary_out[name], macro_out[name]
        assert default == binary
        assert default != macro  # the random case is not symmetric, so this distinguishes them


def test_binary_on_multiclass_data_raises_like_sklearn(skm, prf):
    y_true, y_pred, _ = _case("random5_0")
    with pytest.raises(ValueError):
        _sk_prf(skm, y_true, y_pred, average="binary")
    with pytest.raises(ValueError, match="binary"):
        prf.compute(predictions=y_pred, references=y_true, average="binary")
    with pytest.raises(ValueError, match="binary"):  # also when it is the default average
        prf.compute(predictions=y_pred, references=y_true)
    # pos_label that is not one of two present classes
    with pytest.raises(ValueError, match="pos_label"):
        prf.compute(predictions=[1, 2, 1], references=[2, 1, 1], average="binary", pos_label=0)


def test_labels_order_and_subset_match_sklearn(skm, prf):
    y_true, y_pred, _ = _case("random5_1")
    for labels in ([3, 0, 4, 1, 2], [4, 1], [2, 7]):  # permutation, subset, with an unseen class id
        for average in (None, "macro", "micro", "weighted"):
            expected = _sk_prf(skm, y_true, y_pred, labels=labels, average=average, zero_division=0.0)[:3]
            out = prf.compute(predictions=y_pred, references=y_true, labels=labels, average=average)
            for name, want in zip(PRF, expected):
                got = out[name]
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"{name} {labels} {average}")


def test_prf_sample_weight_matches_sklearn(skm, prf):
    y_true, y_pred, _ = _case("random5_2")
    weights = np.random.default_rng(3).uniform(0.0, 3.0, y_true.shape[0])
    for average in (None, "macro", "micro", "weighted"):
        expected = _sk_prf(skm, y_true, y_pred, average=average, sample_weight=weights)[:3]
        out = prf.compute(predictions=y_pred, references=y_true, average=average, sample_weight=weights.tolist())
        for name, want in zip(PRF, expected):
            got = out[name]
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"{name} {average}")


def test_zero_division_tiny_example(prf):
    # Class 1 is neither predicted nor referenced: its precision, recall and F1 are all 0/0.
    kwargs = dict(predictions=[0, 0, 2], references=[0, 2, 2], labels=[0, 1, 2], average=None)
    for value in (0.0, 1.0):
        out = prf.compute(**kwargs, zero_division=value)
        for name in PRF:
            assert out[name][1] == value
    out = prf.compute(**kwargs, zero_division=np.nan)
    assert math.isnan(out["f1"][1])
    assert math.isnan(out["precision"][1]) and math.isnan(out["recall"][1])


def test_zero_division_applies_to_each_metric_on_its_own_condition(skm, prf):
    # Class 1 is referenced but never predicted: only precision is 0/0 (TP + FP == 0).
    # Class 2 is predicted but never referenced: only recall is 0/0 (TP + FN == 0).
    # F1 is 0/0 only when TP + FP + FN == 0, so for neither class.
    y_true, y_pred = [0, 0, 1, 1], [0, 2, 0, 0]
    for value in (0.0, 1.0, np.nan):
        out = prf.compute(predictions=y_pred, references=y_true, labels=[0, 1, 2], average=None, zero_division=value)
        np.testing.assert_array_equal(out["precision"][1:], [value, 0.0])
        np.testing.assert_array_equal(out["recall"][1:], [0.0, value])
        np.testing.assert_array_equal(out["f1"][1:], [0.0, 0.0])
        expected = _sk_prf(skm, y_true, y_pred, labels=[0, 1, 2], average=None, zero_division=value)[:3]
        for name, want in zip(PRF, expected):
            np.testing.assert_allclose(out[name], want, rtol=1e-12, atol=1e-12, equal_nan=True)
        # NaN scores are left out of each metric's own average
        macro = prf.compute(predictions=y_pred, references=y_true, labels=[0, 1, 2], average="macro",
                            zero_division=value)
        for name in PRF:
            assert macro[name] == pytest.approx(np.nanmean(out[name]), abs=1e-12), (name, value)


def test_invalid_arguments_raise(modules, prf):
    with pytest.raises(ValueError, match="average"):
        prf.compute(predictions=[0, 1], references=[0, 1], average="samples")
    with pytest.raises(ValueError, match="zero_division"):
        prf.compute(predictions=[0, 1], references=[0, 1], average="macro", zero_division=0.5)
    with pytest.raises(ValueError, match="zero_division"):
        prf.compute(predictions=[0, 1], references=[0, 1], average="macro", zero_division="ignore")
    with pytest.raises(ValueError, match="duplicates"):
        prf.compute(predictions=[0, 1], references=[0, 1], average="macro", labels=[0, 1, 1])
    with pytest.raises(ValueError):
        modules["accuracy"].compute(predictions=[0, 1], references=[0])
    for name in CLASSIFICATION_MODULES:
        with pytest.raises(ValueError):
            modules[name].compute(predictions=[], references=[])


def test_module_info(modules):
    for name, module in modules.items():
        assert module.name == name
        assert set(module.features) == {"predictions", "references"}
        assert all(str(f.dtype).startswith("int") for f in module.features.values())
        assert module.description.strip() and module.citation.strip() and module.inputs_description.strip()
        assert module.keep_in_memory  # no Arrow cache files: concurrent processes never share a lock


# ----------------------------------------------------------------------- train.metrics API


def test_metric_files_live_where_package_data_expects_them():
    assert tm.METRICS_DIR == Path(tm.__file__).resolve().parent
    assert tm.METRIC_NAMES == ("accuracy", "precision_recall_f1", "regression")
    for name in tm.METRIC_NAMES:
        path = tm.metric_path(name)
        assert path == tm.METRICS_DIR / name / f"{name}.py" and path.is_file()
        # pyproject.toml ships train/"metrics/*/*.py" as package data
        assert fnmatch.fnmatch(path.relative_to(tm.METRICS_DIR.parent).as_posix(), "metrics/*/*.py")
        source = path.read_text()
        # the numbers come from scikit-learn (issue 17), not from a re-implementation; no torch
        assert re.search(r"^from sklearn\.metrics import ", source, re.M), name
        assert not re.search(r"^\s*(import|from)\s+torch\b", source, re.M), name
    # no other (stale) module script ships next to them
    assert sorted(p.parent.name for p in tm.METRICS_DIR.glob("*/*.py")) == sorted(tm.METRIC_NAMES)
    for name in ("bleu", "precision", "recall", "f1"):
        with pytest.raises(ValueError):
            tm.metric_path(name)


def test_load_is_cached_and_uses_local_modules(modules):
    again = tm.load_classification_metrics()
    assert set(again) == set(CLASSIFICATION_MODULES)
    for name in CLASSIFICATION_MODULES:
        assert again[name] is modules[name]
        # evaluate imported our script (copied into its modules cache), not a Hub module
        assert Path(inspect.getfile(type(modules[name]))).read_text() == tm.metric_path(name).read_text()


def _expected_keys(names, prefix=""):
    keys = ["accuracy", "precision_macro", "recall_macro", "f1_macro"]
    keys += [f"f1_{re.sub(r'[^A-Za-z0-9_]', '_', n)}" for n in names]
    if len(names) == 2:
        keys.append("f1_binary")
    return {prefix + k for k in keys}


@pytest.mark.parametrize("case", CASES)
def test_classification_metrics_matches_sklearn(skm, case):
    y_true, y_pred, k = _case(case)
    prefix = {2: "doc_", 5: "window_"}[k] if "random" in case else ""
    names = NAMES5[:k] if k == 5 else ["negative", "positive"]
    got = tm.classification_metrics(y_pred, y_true, names, prefix=prefix)
    assert set(got) == _expected_keys(names, prefix)
    assert all(type(v) is float for v in got.values())

    labels = list(range(k))
    assert got[prefix + "accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    p, r, f, _ = _sk_prf(skm, y_true, y_pred, labels=labels, average="macro", zero_division=0.0)
    assert got[prefix + "precision_macro"] == pytest.approx(p, abs=1e-12)
    assert got[prefix + "recall_macro"] == pytest.approx(r, abs=1e-12)
    assert got[prefix + "f1_macro"] == pytest.approx(f, abs=1e-12)
    per_class = _sk_prf(skm, y_true, y_pred, labels=labels, average=None, zero_division=0.0)[2]
    for name, want in zip(names, per_class):
        assert got[prefix + "f1_" + re.sub(r"[^A-Za-z0-9_]", "_", name)] == pytest.approx(want, abs=1e-12)
    if k == 2:
        want = skm.f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0.0)
        assert got[prefix + "f1_binary"] == pytest.approx(want, abs=1e-12)


def test_classification_metrics_exact_keys():
    got = tm.classification_metrics([0, 3, 2, 1], [0, 1, 2, 1], NAMES5)
    assert set(got) == {
        "accuracy", "precision_macro", "recall_macro", "f1_macro",
        "f1_world", "f1_sports", "f1_business", "f1_sci_tech", "f1_other_label",
    }
    got = tm.classification_metrics([0, 1], [0, 1], ["neg", "pos"], prefix="window_")
    assert set(got) == {
        "window_accuracy", "window_precision_macro", "window_recall_macro", "window_f1_macro",
        "window_f1_neg", "window_f1_pos", "window_f1_binary",
    }
    assert "f1_binary" not in tm.classification_metrics([0, 1, 2], [0, 1, 2], ["a", "b", "c"])


def test_classification_metrics_counts_classes_missing_from_eval_set(skm):
    # 4 labels, but the eval set only holds classes 0 and 1: classes 2 and 3 score 0 and still
    # count in the macro average (divided by 4, not 2).
    y_true, y_pred = [0, 1, 1, 0], [0, 1, 1, 0]
    got = tm.classification_metrics(y_pred, y_true, ["a", "b", "c", "d"])
    assert got["f1_c"] == 0.0 and got["f1_d"] == 0.0
    assert got["f1_macro"] == pytest.approx(0.5)
    want = skm.f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro", zero_division=0.0)
    assert got["f1_macro"] == pytest.approx(want)
    assert got["accuracy"] == 1.0


def test_classification_metrics_goes_through_the_evaluate_modules(modules, monkeypatch):
    calls = []
    for name in CLASSIFICATION_MODULES:
        module = modules[name]
        original = module.compute

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs.get("average"), kwargs.get("labels")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "compute", spy)
    got = tm.classification_metrics([0, 1, 1], [0, 1, 0], ["neg", "pos"])
    # one call per module: the macro averages and f1_binary are read off the per-class scores
    assert sorted(calls, key=repr) == sorted(
        [
            ("accuracy", None, None),
            ("precision_recall_f1", None, [0, 1]),
        ],
        key=repr,
    )
    assert got["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("case", CASES)
def test_classification_metrics_equals_the_modules_own_averages(prf, case):
    # classification_metrics derives the macro averages and f1_binary from one average=None call;
    # they must be exactly (not approximately) what the module returns for those averages.
    y_true, y_pred, k = _case(case)
    names = NAMES5[:k] if k == 5 else ["negative", "positive"]
    got = tm.classification_metrics(y_pred, y_true, names)
    macro = prf.compute(predictions=y_pred, references=y_true, labels=list(range(k)), average="macro",
                        zero_division=0.0)
    for name in PRF:
        assert got[f"{name}_macro"] == macro[name], name
    if k == 2:
        binary = prf.compute(predictions=y_pred, references=y_true, average="binary", pos_label=1, zero_division=0.0)
        assert got["f1_binary"] == binary["f1"]


def test_classification_metrics_leaves_numpy_global_rng_alone():
    np.random.seed(1234)
    expected_next = np.random.random()
    np.random.seed(1234)
    tm.classification_metrics([0, 1, 2, 2], [0, 1, 1, 2], ["a", "b", "c"])
    assert np.random.random() == expected_next  # evaluate seeds numpy inside compute, then restores it


def test_label_name_sanitizing_and_clashes():
    assert tm.sanitize_label_name("sci/tech") == "sci_tech"
    assert tm.sanitize_label_name("Ünïcode label-1") == "_n_code_label_1"
    names = ["a/b", "a-b", "macro", "", "binary"]
    got = tm.classification_metrics([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], names)
    per_class = [k for k in got if k.startswith("f1_") and k not in ("f1_macro",)]
    assert len(per_class) == len(names)  # one key per label, nothing overwritten
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", k) for k in got)
    assert "f1_a_b" in got and got["f1_macro"] == 1.0


def test_classification_metrics_input_types():
    torch = pytest.importorskip("torch")
    y_true, y_pred, _ = _case("random5_0")
    from_np = tm.classification_metrics(y_pred, y_true, NAMES5)
    assert tm.classification_metrics(y_pred.tolist(), y_true.tolist(), NAMES5) == from_np
    assert tm.classification_metrics(torch.tensor(y_pred), torch.tensor(y_true), NAMES5) == from_np
    assert tm.classification_metrics(y_pred.astype(np.int32), y_true.astype(np.float32), NAMES5) == from_np
    assert tm.classification_metrics(tuple(y_pred), np.asarray(y_true, dtype=np.uint8), NAMES5) == from_np


def test_classification_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        tm.classification_metrics([], [], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        tm.classification_metrics(np.array([], dtype=int), np.array([], dtype=int), NAMES5)
    with pytest.raises(ValueError, match="-100"):
        tm.classification_metrics([0, 1, 1], [0, -100, 1], ["a", "b"])
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        tm.classification_metrics([0, 2], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="length"):
        tm.classification_metrics([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError, match="logits"):
        tm.classification_metrics(np.zeros((3, 2)), [0, 1, 1], ["a", "b"])
    with pytest.raises(ValueError, match="integer"):
        tm.classification_metrics([0.5, 1.0], [0, 1], ["a", "b"])
    with pytest.raises(TypeError):
        tm.classification_metrics([0, 1], [0, 1], "ab")


@pytest.mark.parametrize("case", CASES)
def test_confusion_matrix_matches_sklearn(skm, case):
    y_true, y_pred, k = _case(case)
    got = tm.confusion_matrix(y_pred, y_true, k)
    assert got.dtype == np.int64 and got.shape == (k, k)
    np.testing.assert_array_equal(got, skm.confusion_matrix(y_true, y_pred, labels=list(range(k))))
    assert got.sum() == len(y_true)
    assert np.trace(got) == int(np.sum(y_true == y_pred))


def test_confusion_matrix_orientation_and_edges():
    # rows = true label, columns = predicted: a single example true 0 predicted 1 lands at [0, 1]
    cm = tm.confusion_matrix(predictions=[1], references=[0], num_labels=3)
    assert cm[0, 1] == 1 and cm.sum() == 1
    empty = tm.confusion_matrix([], [], 4)
    assert empty.shape == (4, 4) and empty.dtype == np.int64 and not empty.any()
    with pytest.raises(ValueError):
        tm.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        tm.confusion_matrix([0, 1], [0], 3)


# ----------------------------------------------------------------------- offline / processes


def _load_in_fresh_process(cache_root, barrier, queue):
    """Spawned worker: fresh evaluate caches, HF_HUB_OFFLINE=1 and no sockets, then load + compute."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_MODULES_CACHE"] = os.path.join(cache_root, "modules")
    os.environ["HF_METRICS_CACHE"] = os.path.join(cache_root, "metrics")
    # evaluate appends its modules cache to sys.path and imports `evaluate_modules.<...>` from the
    # first such folder on sys.path; a spawned child inherits the parent's sys.path, which holds the
    # parent's cache once the parent has loaded a module. Drop it so the fresh cache is really used.
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "evaluate_modules"))]
    import socket

    def _no_network(*args, **kwargs):
        raise OSError("network access attempted while loading metrics")

    socket.socket.connect = _no_network
    socket.create_connection = _no_network
    try:
        import train.metrics as metrics

        barrier.wait(timeout=120)  # start loading at the same moment as the other worker
        loaded = metrics.load_classification_metrics()
        files = {name: inspect.getfile(type(module)) for name, module in loaded.items()}
        values = metrics.classification_metrics([0, 2, 1, 1, 0], [0, 1, 1, 2, 0], ["x", "y/z", "w"])
        queue.put(("ok", os.getpid(), files, values))
    except BaseException as exc:  # report, do not hang the parent
        import traceback

        queue.put(("error", os.getpid(), repr(exc), traceback.format_exc()))


@pytest.fixture(scope="module")
def two_fresh_processes(tmp_path_factory):
    """Start two spawned processes that load the metrics at once into one empty cache.

    Marked slow through its tests: each process imports evaluate, which imports transformers and
    torch (about 6 s of CPU each).
    """
    cache_root = tmp_path_factory.mktemp("evaluate_cache")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_fresh_process, args=(str(cache_root), barrier, queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = []
    deadline = time.monotonic() + 180
    try:
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                results.append(queue.get(timeout=1))
            except queue_module.Empty:  # fail fast when a worker died without reporting
                if not any(proc.is_alive() for proc in procs) and queue.empty():
                    break
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return cache_root, results, [proc.exitcode for proc in procs]


def _successful(two_fresh_processes):
    _, results, exitcodes = two_fresh_processes
    assert len(results) == 2, f"only {len(results)} of 2 workers reported; exit codes {exitcodes}"
    for result in results:
        assert result[0] == "ok", result[-1]
    assert exitcodes == [0, 0]
    return results


@pytest.mark.slow
def test_two_processes_load_at_the_same_time(two_fresh_processes):
    (_, pid_a, files_a, values_a), (_, pid_b, files_b, values_b) = _successful(two_fresh_processes)
    assert pid_a != pid_b
    assert files_a == files_b  # the same copies in the shared cache, written once under evaluate's lock
    assert values_a == values_b
    assert values_a == tm.classification_metrics([0, 2, 1, 1, 0], [0, 1, 1, 2, 0], ["x", "y/z", "w"])
    json.dumps(values_a)  # plain floats: loggable as-is


@pytest.mark.slow
def test_modules_load_offline_from_local_paths(two_fresh_processes):
    # The workers ran with HF_HUB_OFFLINE=1 and every socket connect raising.
    cache_root = two_fresh_processes[0]
    (_, _, files, values), _ = _successful(two_fresh_processes)
    modules_cache = (cache_root / "modules").resolve()
    assert set(files) == set(CLASSIFICATION_MODULES)
    for name, file in files.items():
        # evaluate copied our script into the (fresh) modules cache and imported it from there
        assert Path(file).resolve().is_relative_to(modules_cache), file
        assert Path(file).read_text() == tm.metric_path(name).read_text()
    assert set(values) == {"accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_x", "f1_y_z", "f1_w"}
    assert values["accuracy"] == pytest.approx(0.6)  # 3 of 5 correct
    # keep_in_memory: compute wrote no Arrow cache files (so no shared locks between processes)
    assert [p for p in (cache_root / "metrics").rglob("*") if p.is_file()] == []
