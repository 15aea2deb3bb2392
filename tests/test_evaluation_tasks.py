"""Evaluation per problem type (issue 17, points 3, 4 and the `max` pooling item of 6): window outputs,
document pooling, metrics, thresholds, reports and the confusion image, checked against hand computations and
direct scikit-learn / scipy calls."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

import train.metrics as tm
from train import evaluation as ev

skm = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def _logits_of(probs):
    """Softmax logits giving exactly these (row-normalised) probabilities."""
    return np.log(np.asarray(probs, dtype=np.float64))


def _logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


def _prefixed(names):
    return {f"{level}_{n}" for level in ("window", "doc") for n in names} | {"num_docs", "num_windows"}


# ----------------------------------------------------------------------- window outputs and pooling


def test_window_outputs_per_task():
    logits = np.array([[2.0, -1.0, 0.5], [800.0, -800.0, 0.0]])
    single = ev.window_outputs(logits, "single_label")
    np.testing.assert_allclose(single.sum(1), 1.0)
    np.testing.assert_allclose(single[0], np.exp(logits[0]) / np.exp(logits[0]).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow for large logits of either sign
        multi = ev.window_outputs(logits, "multi_label")
    np.testing.assert_allclose(multi[0], 1 / (1 + np.exp(-logits[0])))
    np.testing.assert_allclose(multi[1], [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(ev.window_outputs(np.array([[1.5], [-2.0]]), "regression"), [1.5, -2.0])
    with pytest.raises(ValueError, match="one output per window"):
        ev.window_outputs(np.zeros((2, 2)), "regression")
    with pytest.raises(ValueError, match="problem_type"):
        ev.window_outputs(logits, "multiclass")


def test_single_label_mean_and_max_pooling_by_hand():
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    docs = np.array([5, 5, 2, 5])  # unsorted ids, document 5's windows not adjacent
    outputs = ev.window_outputs(_logits_of(probs), "single_label")
    ids, mean = ev.pool_documents(outputs, docs, "single_label", "mean")
    assert ids.tolist() == [2, 5]
    np.testing.assert_allclose(mean, [[0.6, 0.3, 0.1], [1.4 / 3, 1.05 / 3, 0.55 / 3]])
    _, mx = ev.pool_documents(outputs, docs, "single_label", "max")
    np.testing.assert_allclose(mx, [[0.6, 0.3, 0.1], np.array([0.9, 0.7, 0.4]) / 2.0])


def test_two_classes_renormalised_max_and_max_positive_disagree():
    # Window A is 90% negative, window B 70% positive. "max" takes each class's maximum from a different
    # window: [0.9, 0.7] / 1.6 -> negative. "max_positive" takes B's positive probability: [0.3, 0.7].
    outputs = ev.window_outputs(_logits_of([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2]]), "single_label")
    docs = np.array([1, 1, 2])
    _, mx = ev.pool_documents(outputs, docs, "single_label", "max")
    _, mp = ev.pool_documents(outputs, docs, "single_label", "max_positive")
    np.testing.assert_allclose(mx[0], [0.9 / 1.6, 0.7 / 1.6])
    np.testing.assert_allclose(mp, [[0.3, 0.7], [0.8, 0.2]])
    assert mx[0].argmax() == 0 and mp[0].argmax() == 1


def test_max_positive_needs_two_classes():
    outputs = ev.window_outputs(np.zeros((2, 3)), "single_label")
    with pytest.raises(ValueError, match="exactly 2 classes") as info:
        ev.pool_documents(outputs, np.array([0, 0]), "single_label", "max_positive")
    assert "\n" not in str(info.value)


def test_one_pooling_check_names_the_option_and_the_class_count():
    assert ev.check_pooling("single_label", "max_positive", 2) == "max_positive"
    with pytest.raises(ValueError, match="^--pooling max_positive: needs a 2-class model, this one has 3 classes$"):
        ev.check_pooling("single_label", "max_positive", 3, option="--pooling")
    with pytest.raises(ValueError, match="^pooling max: not available for a regression model; choose from mean$"):
        ev.check_pooling("regression", "max", 1)


def test_multi_label_max_and_mean_pooling_by_hand():
    probs = np.array([[0.1, 0.8, 0.3], [0.6, 0.2, 0.3], [0.4, 0.4, 0.9]])
    outputs = ev.window_outputs(_logit(probs), "multi_label")
    docs = np.array([7, 7, 3])
    ids, mx = ev.pool_documents(outputs, docs, "multi_label", "max")
    assert ids.tolist() == [3, 7]
    # per label, the highest window probability; no renormalisation (labels are independent)
    np.testing.assert_allclose(mx, [[0.4, 0.4, 0.9], [0.6, 0.8, 0.3]])
    _, mean = ev.pool_documents(outputs, docs, "multi_label", "mean")
    np.testing.assert_allclose(mean, [[0.4, 0.4, 0.9], [0.35, 0.5, 0.3]])


def test_regression_mean_is_token_weighted():
    values = np.array([1.0, 3.0, 10.0, 2.0])
    docs = np.array([0, 0, 1, 0])
    tokens = np.array([3, 1, 5, 4])
    ids, pooled = ev.pool_documents(values, docs, "regression", "mean", window_tokens=tokens)
    assert ids.tolist() == [0, 1]
    np.testing.assert_allclose(pooled, [(1 * 3 + 3 * 1 + 2 * 4) / 8, 10.0])  # a plain mean would give 2.0
    with pytest.raises(ValueError, match="window_tokens"):
        ev.pool_documents(values, docs, "regression", "mean")
    with pytest.raises(ValueError, match="positive"):
        ev.pool_documents(values, docs, "regression", "mean", window_tokens=np.array([3, 0, 5, 4]))


@pytest.mark.parametrize("problem_type, pooling", [("regression", "max"), ("multi_label", "max_positive"),
                                                   ("single_label", "median"), ("regression", "max_positive")])
def test_invalid_pooling_is_refused_in_one_line(problem_type, pooling):
    outputs = np.zeros(2) if problem_type == "regression" else np.full((2, 2), 0.5)
    with pytest.raises(ValueError) as info:
        ev.pool_documents(outputs, np.array([0, 0]), problem_type, pooling, window_tokens=np.ones(2))
    message = str(info.value)
    assert "\n" not in message and f"pooling {pooling}:" in message and problem_type in message
    assert ", ".join(ev.allowed_poolings(problem_type)) in message  # says what is allowed
    labels = np.zeros(2) if problem_type == "regression" else np.zeros((2, 2)) if problem_type == "multi_label" \
        else np.zeros(2, dtype=int)
    with pytest.raises(ValueError, match="not available"):
        ev.score(np.zeros((2, 1 if problem_type == "regression" else 2)), labels, np.array([0, 0]), problem_type,
                 ["a", "b"], pooling, window_tokens=np.ones(2))


def test_default_and_allowed_poolings():
    assert ev.PROBLEM_TYPES == ("single_label", "multi_label", "regression")
    assert [ev.default_pooling(t) for t in ev.PROBLEM_TYPES] == ["mean", "max", "mean"]
    assert ev.allowed_poolings("single_label") == ("mean", "max", "max_positive")
    assert ev.allowed_poolings("multi_label") == ("max", "mean")
    assert ev.allowed_poolings("regression") == ("mean",)
    with pytest.raises(ValueError, match="problem_type"):
        ev.allowed_poolings("classification")


# ----------------------------------------------------------------------- metrics per task


def _multi_case(seed=0, windows=40, labels=3):
    rng = np.random.default_rng(seed)
    docs = rng.integers(0, 15, windows)
    doc_sets = (rng.random((15, labels)) < 0.4).astype(np.float32)
    doc_sets[0] = 0  # a document without labels
    window_labels = doc_sets[docs]
    logits = rng.normal(size=(windows, labels)) + 2.0 * (window_labels - 0.5)
    return logits, window_labels, docs


def test_score_single_label_matches_sklearn():
    rng = np.random.default_rng(1)
    docs = rng.integers(0, 20, 70)
    doc_class = rng.integers(0, 3, 20)
    labels = doc_class[docs]
    logits = rng.normal(size=(70, 3))
    names = ["neg", "neu", "pos"]
    metrics, extras = ev.score(logits, labels, docs, "single_label", names, "mean")
    assert set(metrics) == _prefixed(tm.metric_names(names, "single_label"))
    ids, probs = ev.pool_documents(ev.softmax(logits), docs, "single_label", "mean")
    np.testing.assert_array_equal(extras["doc_ids"], ids)
    np.testing.assert_array_equal(extras["doc_labels"], doc_class[ids])
    pred = probs.argmax(1)
    assert metrics["doc_accuracy"] == pytest.approx(skm.accuracy_score(doc_class[ids], pred))
    assert metrics["doc_f1_macro"] == pytest.approx(
        skm.f1_score(doc_class[ids], pred, labels=[0, 1, 2], average="macro", zero_division=0))
    assert metrics["doc_loss"] == pytest.approx(skm.log_loss(doc_class[ids], probs, labels=[0, 1, 2]))
    assert metrics["window_loss"] == pytest.approx(skm.log_loss(labels, ev.softmax(logits), labels=[0, 1, 2]))
    np.testing.assert_array_equal(extras["confusion"], skm.confusion_matrix(doc_class[ids], pred, labels=[0, 1, 2]))
    assert extras["thresholds"] is None and extras["label_confusion"] is None
    assert metrics["num_docs"] == len(ids) and metrics["num_windows"] == 70


def test_score_multi_label_matches_sklearn():
    logits, window_labels, docs = _multi_case()
    names = ["sport", "tech", "politics"]
    metrics, extras = ev.score(logits, window_labels, docs, "multi_label", names, "max")
    assert set(metrics) == _prefixed(tm.metric_names(names, "multi_label"))
    ids, probs = ev.pool_documents(ev.window_outputs(logits, "multi_label"), docs, "multi_label", "max")
    np.testing.assert_allclose(extras["doc_outputs"], probs)
    true = extras["doc_labels"]
    assert true.shape == (len(ids), 3) and not true[0].any()
    pred = (probs >= 0.5).astype(int)
    kw = dict(zero_division=0)
    assert metrics["doc_f1_micro"] == pytest.approx(skm.f1_score(true, pred, average="micro", **kw))
    assert metrics["doc_f1_macro"] == pytest.approx(skm.f1_score(true, pred, average="macro", **kw))
    assert metrics["doc_f1_samples"] == pytest.approx(skm.f1_score(true, pred, average="samples", **kw))
    for i, name in enumerate(names):
        assert metrics[f"doc_f1_{name}"] == pytest.approx(skm.f1_score(true[:, i], pred[:, i], **kw))
    assert metrics["doc_subset_accuracy"] == pytest.approx(skm.accuracy_score(true, pred))
    assert metrics["doc_precision_micro"] == pytest.approx(skm.precision_score(true, pred, average="micro", **kw))
    assert metrics["doc_recall_micro"] == pytest.approx(skm.recall_score(true, pred, average="micro", **kw))
    bce = torch.nn.functional.binary_cross_entropy(torch.tensor(probs), torch.tensor(true, dtype=torch.float64))
    assert metrics["doc_loss"] == pytest.approx(float(bce))
    window_bce = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(logits), torch.tensor(window_labels, dtype=torch.float64))
    assert metrics["window_loss"] == pytest.approx(float(window_bce))
    window_pred = (ev.window_outputs(logits, "multi_label") >= 0.5).astype(int)
    assert metrics["window_f1_micro"] == pytest.approx(skm.f1_score(window_labels, window_pred, average="micro"))
    assert extras["confusion"] is None and extras["thresholds"] == [0.5, 0.5, 0.5]
    np.testing.assert_array_equal(extras["label_confusion"], skm.multilabel_confusion_matrix(true, pred))


def test_score_regression_matches_sklearn_and_scipy():
    rng = np.random.default_rng(2)
    docs = rng.integers(0, 12, 50)
    doc_target = rng.uniform(0, 5, 12)
    targets = doc_target[docs].astype(np.float32)
    logits = (targets + rng.normal(scale=0.8, size=50))[:, None]
    tokens = rng.integers(1, 129, 50)
    metrics, extras = ev.score(logits, targets, docs, "regression", [], "mean", window_tokens=tokens)
    assert set(metrics) == _prefixed(tm.metric_names([], "regression"))
    ids, values = ev.pool_documents(logits[:, 0], docs, "regression", "mean", window_tokens=tokens)
    true = doc_target[ids].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(extras["doc_outputs"], values)
    assert metrics["doc_mse"] == pytest.approx(skm.mean_squared_error(true, values))
    assert metrics["doc_loss"] == metrics["doc_mse"]
    assert metrics["doc_mae"] == pytest.approx(skm.mean_absolute_error(true, values))
    assert metrics["doc_pearson"] == pytest.approx(stats.pearsonr(true, values)[0])
    assert metrics["doc_spearman"] == pytest.approx(stats.spearmanr(true, values)[0])
    assert metrics["window_mse"] == pytest.approx(skm.mean_squared_error(targets, logits[:, 0]))
    assert metrics["window_loss"] == metrics["window_mse"]
    assert extras["confusion"] is None and extras["label_confusion"] is None


def test_regression_correlation_of_constant_outputs_is_nan():
    got = tm.regression_metrics([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])
    assert got["mse"] == pytest.approx((1 + 0 + 1) / 3) and np.isnan(got["pearson"]) and np.isnan(got["spearman"])


# ----------------------------------------------------------------------- thresholds


def test_score_applies_given_thresholds():
    probs = np.array([[0.3, 0.9], [0.6, 0.2], [0.2, 0.7]])  # one window per document
    labels = np.array([[1, 1], [1, 0], [0, 1]], dtype=np.float32)
    docs = np.arange(3)
    default, extras = ev.score(_logit(probs), labels, docs, "multi_label", ["a", "b"], "max")
    assert default["doc_f1_a"] == pytest.approx(skm.f1_score([1, 1, 0], [0, 1, 0]))  # 0.5 cuts 0.3 away
    assert extras["thresholds"] == [0.5, 0.5]
    tuned, extras = ev.score(_logit(probs), labels, docs, "multi_label", ["a", "b"], "max", thresholds=[0.25, 0.8])
    assert tuned["doc_f1_a"] == pytest.approx(skm.f1_score([1, 1, 0], [1, 1, 0]))
    assert tuned["doc_f1_b"] == pytest.approx(skm.f1_score([1, 0, 1], [1, 0, 0]))
    assert extras["thresholds"] == [0.25, 0.8]
    with pytest.raises(ValueError, match="2 labels"):
        ev.score(_logit(probs), labels, docs, "multi_label", ["a", "b"], "max", thresholds=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ev.score(_logit(probs), labels, docs, "multi_label", ["a", "b"], "max", thresholds=[1.5, 0.5])


def test_tune_thresholds_picks_the_best_f1_threshold_per_label():
    probs = np.array([[0.35, 0.9, 0.1], [0.40, 0.2, 0.2], [0.20, 0.7, 0.3], [0.10, 0.6, 0.05], [0.30, 0.65, 0.4]])
    labels = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
    chosen = ev.tune_thresholds(probs, labels)
    # label 0: positives 0.30-0.40, negatives <= 0.20: 0.25 and 0.30 are perfect; 0.30 is closer to 0.5
    # label 1: positives 0.65-0.9, negatives <= 0.6: 0.65 is the only perfect cut
    # label 2: no positives, F1 is 0 at every threshold: the default 0.5
    assert chosen == [0.3, 0.65, 0.5]
    # and against a brute force over the grid with scikit-learn: nothing scores higher
    for label, threshold in enumerate(chosen):
        best = max(skm.f1_score(labels[:, label], probs[:, label] >= t, zero_division=0) for t in ev.THRESHOLD_GRID)
        assert skm.f1_score(labels[:, label], probs[:, label] >= threshold, zero_division=0) == best
    assert ev.tune_thresholds(probs, labels) == chosen  # deterministic
    assert ev.THRESHOLD_GRID[0] == 0.05 and ev.THRESHOLD_GRID[-1] == 0.95 and len(ev.THRESHOLD_GRID) == 19


def test_rescore_with_tuned_thresholds_equals_a_fresh_score():
    logits, window_labels, docs = _multi_case(seed=3)
    names = ["a", "b", "c"]
    _, extras = ev.score(logits, window_labels, docs, "multi_label", names, "mean")
    thresholds = ev.tune_thresholds(extras["doc_outputs"], extras["doc_labels"])
    again, _ = ev.rescore(extras, "multi_label", names, "mean", thresholds)
    fresh, _ = ev.score(logits, window_labels, docs, "multi_label", names, "mean", thresholds=thresholds)
    assert again == fresh
    default, _ = ev.score(logits, window_labels, docs, "multi_label", names, "mean")
    assert fresh["doc_f1_macro"] >= default["doc_f1_macro"]  # tuned on these very documents


# ----------------------------------------------------------------------- names, modes, reports, images


def test_metric_names_per_task():
    assert tm.metric_names(["neg", "pos"]) == ["loss", "accuracy", "precision_macro", "recall_macro", "f1_macro",
                                              "f1_neg", "f1_pos", "f1_binary"]
    assert tm.metric_names(["a", "samples"], "multi_label") == [
        "loss", "f1_micro", "f1_macro", "f1_samples", "f1_a", "f1_samples_1", "subset_accuracy",
        "precision_micro", "recall_micro"]
    assert tm.metric_names([], "regression") == ["loss", "mse", "mae", "pearson", "spearman"]


def test_metric_mode():
    for name in ("loss", "doc_loss", "window_loss", "mse", "doc_mse", "window_mae", "mae"):
        assert tm.metric_mode(name) == "min", name
    for name in ("doc_f1_macro", "doc_accuracy", "doc_pearson", "window_spearman", "doc_subset_accuracy",
                 "doc_f1_gloss", "f1_mse"):  # per-label keys ending like a loss stay "max"
        assert tm.metric_mode(name) == "max", name


def test_classification_report_text_is_sklearn_report():
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    text = ev.classification_report_text(probs, np.array([0, 1, 1]), "single_label", ["neg", "pos"])
    assert text == skm.classification_report([0, 1, 1], [0, 1, 0], labels=[0, 1], target_names=["neg", "pos"],
                                              digits=4, zero_division=0)
    multi = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    true = np.array([[1, 1], [0, 1], [1, 0]])
    text = ev.classification_report_text(multi, true, "multi_label", ["x", "y"], thresholds=[0.5, 0.35])
    assert text == skm.classification_report(true, [[1, 0], [0, 1], [1, 1]], labels=[0, 1], target_names=["x", "y"],
                                             digits=4, zero_division=0)
    assert "samples avg" in text
    text = ev.classification_report_text(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 3.0]), "regression", [])
    assert "mse" in text and "0.6667" in text and "pearson" in text


def test_confusion_matrix_image_raw_and_normalised():
    matrix = np.array([[50, 2, 0], [1, 3, 0], [0, 0, 0]])
    raw = ev.confusion_matrix_image(matrix, ["a", "b", "c"])
    norm = ev.confusion_matrix_image(matrix, ["a", "b", "c"], normalize=True)
    for image in (raw, norm):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] > 50 and image.shape[1] > 50
    assert raw.shape == norm.shape and not np.array_equal(raw, norm)  # same canvas, different cells
    with pytest.raises(ValueError, match="3 labels"):
        ev.confusion_matrix_image(np.zeros((2, 2)), ["a", "b", "c"])


# ----------------------------------------------------------------------- run_evaluation


class _ValueModel(torch.nn.Module):
    """Outputs for each window the mean of its first-token id and a fixed offset: deterministic logits."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        values = input_ids[:, :1].float()
        return types.SimpleNamespace(logits=values.repeat(1, self.outputs))


def _accelerator():
    return types.SimpleNamespace(num_processes=1, device=torch.device("cpu"))


def test_run_evaluation_regression_uses_real_lengths_and_output_scale():
    # two documents: doc 0 = windows with values 1 (3 tokens) and 3 (1 token); doc 1 = one window with 2
    ids = torch.tensor([[1, 1, 1, 0], [3, 0, 0, 0], [2, 2, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": torch.tensor([1.0, 1.0, 5.0]),
             "doc_ids": torch.tensor([0, 0, 1]), "rows": torch.tensor([0, 1, 2]),
             "real_lengths": torch.tensor([3, 1, 2])}
    metrics, extras = ev.run_evaluation(_accelerator(), _ValueModel(1), [batch], [], "regression", "mean", 3,
                                        output_scale=(1.0, 2.0))
    # de-standardised window values 3, 7, 5; doc 0 = (3 * 3 + 7 * 1) / 4 = 4
    np.testing.assert_allclose(extras["doc_outputs"], [4.0, 5.0])
    assert metrics["doc_mse"] == pytest.approx(((4 - 1) ** 2 + 0) / 2)
    # without real_lengths the attention mask gives the token counts (here the same)
    del batch["real_lengths"]
    _, again = ev.run_evaluation(_accelerator(), _ValueModel(1), [batch], [], "regression", "mean", 3,
                                 output_scale=(1.0, 2.0))
    np.testing.assert_allclose(again["doc_outputs"], [4.0, 5.0])
    with pytest.raises(RuntimeError, match="expected 4"):
        ev.run_evaluation(_accelerator(), _ValueModel(1), [batch], [], "regression", "mean", 4)


def test_run_evaluation_multi_label_and_single_label():
    ids = torch.tensor([[1, 5], [0, 5], [2, 5]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]),
             "doc_ids": torch.tensor([0, 0, 1]), "rows": torch.tensor([0, 1, 2])}
    metrics, extras = ev.run_evaluation(_accelerator(), _ValueModel(2), [batch], ["a", "b"], "multi_label", "max",
                                        3, thresholds=[0.8, 0.8])
    sig = 1 / (1 + np.exp(-np.array([1.0, 2.0])))
    np.testing.assert_allclose(extras["doc_outputs"], [[sig[0]] * 2, [sig[1]] * 2])
    assert metrics["doc_subset_accuracy"] == 0.0 and extras["thresholds"] == [0.8, 0.8]
    batch["labels"] = torch.tensor([0, 0, 1])
    single, extras = ev.run_evaluation(_accelerator(), _ValueModel(2), [batch], ["a", "b"], "single_label", "mean", 3)
    assert extras["confusion"].shape == (2, 2) and single["num_docs"] == 2.0
