"""predict / evaluate / export per problem type (issue 17): multi-label sets and thresholds, regression values
(the target scale folded into the export), config.json's problem_type for `transformers.pipeline`, submission
columns, --on-empty, the export's clean steps, and pair columns used only by pair models."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from tests.test_predict_faults import assert_one_error, run
from train.evaluate import main as evaluate_main
from train.predict import main as predict_main

pytestmark = pytest.mark.timeout(600)

CHUNKING = {"max_length": 18, "chunk_size": 16, "stride": 12}
MULTI_LABELS = ["sport", "politics", "business"]
# Multi-label head biases: with small random weights the probabilities stay near sigmoid(bias) = 0.7, 0.3, 0.8
MULTI_BIAS = [math.log(0.7 / 0.3), math.log(0.3 / 0.7), math.log(0.8 / 0.2)]
TARGET_MEAN, TARGET_STD = 3.0, 2.5


class OneProcess:
    """The part of accelerate's Accelerator that export_model uses, for one process."""

    is_main_process = True

    def get_state_dict(self, model):
        return model.state_dict()

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self):
        pass


def build_export(folder, tiny_model, problem_type: str, labels: list[str], seed: int = 0, bias=None,
                 head_scale: float = 1.0, output_scale=None, **info):
    """A tiny random BERT exported by export_model (config.json written as train writes it); returns the live
    model (unchanged by the export). head_scale multiplies the head's weights: a random head's outputs barely
    differ between texts."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from train.export import export_model

    config = BertConfig.from_pretrained(tiny_model, num_labels=len(labels) or 1)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(head_scale)
        if bias is not None:
            model.classifier.bias.copy_(torch.tensor(bias))
    info = {"labels": labels, "chunking": CHUNKING, "task": "single", "problem_type": problem_type, **info}
    export_model(OneProcess(), model, AutoTokenizer.from_pretrained(tiny_model), folder, info,
                 output_scale=output_scale)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("task_exports")
    models = {
        "single": build_export(root / "single", tiny_model, "single_label", ["neg", "neu", "pos"], seed=1),
        "multi": build_export(root / "multi", tiny_model, "multi_label", MULTI_LABELS, seed=2, bias=MULTI_BIAS,
                              thresholds=[0.5, 0.5, 0.95]),
        "regression": build_export(root / "regression", tiny_model, "regression", [], seed=3, head_scale=20.0,
                                   output_scale=(TARGET_MEAN, TARGET_STD),
                                   target={"min": 0.0, "max": 5.0, "mean": TARGET_MEAN, "std": TARGET_STD}),
        "clean": build_export(root / "clean", tiny_model, "multi_label", MULTI_LABELS, seed=4,
                              clean=["html", "whitespace"]),
        "pair": build_export(root / "pair", tiny_model, "single_label", ["no", "yes"], seed=5, task="pair"),
    }
    return {"root": root, "models": models, "tiny": tiny_model, **{name: root / name for name in models}}


def write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def raw_outputs(folder, texts):
    """The exported model's raw outputs on each text as one window ([CLS] text [SEP]), loaded afresh."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.numpy()


def pipeline_scores(folder, texts):
    """transformers.pipeline's scores per text, in the export's label order, with its default function."""
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
    names = [clf.model.config.id2label[i] for i in range(clf.model.config.num_labels)]
    return [[{r["label"]: r["score"] for r in result}[name] for name in names] for result in clf(texts)]


SHORT_TEXTS = ["good great happy", "bad awful sad lose", "team goal match", "the market price", "love win fine"]


def predict_stdin(exports, name, tmp_path, capfd, monkeypatch, *extra, texts=SHORT_TEXTS):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(("\n".join(texts) + "\n").encode())))
    out = tmp_path / f"{name}.jsonl"
    rc, _, err = run(predict_main, ["--model", exports[name], "--output", out, *extra], capfd)
    assert rc == 0, err
    return read_jsonl(out)


# ----------------------------------------------------------------------------- export: config.json, folding
def test_config_json_names_problem_type_and_labels(exports):
    want = {"single": ("single_label_classification", ["neg", "neu", "pos"]),
            "multi": ("multi_label_classification", MULTI_LABELS),
            "regression": ("regression", ["value"])}
    for name, (problem_type, labels) in want.items():
        config = json.loads((exports[name] / "config.json").read_text())
        assert config["problem_type"] == problem_type, name
        assert config["id2label"] == {str(i): lab for i, lab in enumerate(labels)}, name
        assert config["label2id"] == {lab: i for i, lab in enumerate(labels)}, name


def test_export_folds_target_scale_into_the_last_linear_layer(exports):
    """The export outputs mean + std * (the standardised model's output); the live model is left unchanged."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    live = exports["models"]["regression"]
    tokenizer = AutoTokenizer.from_pretrained(exports["regression"])
    batch = tokenizer(SHORT_TEXTS, return_tensors="pt", padding=True)
    exported = AutoModelForSequenceClassification.from_pretrained(exports["regression"]).eval()
    with torch.no_grad():
        standardised = live(**batch).logits
        raw = exported(**batch).logits
    assert standardised.std() > 0  # the texts give different outputs: a constant could hide a wrong scale
    torch.testing.assert_close(raw, TARGET_MEAN + TARGET_STD * standardised, rtol=1e-5, atol=1e-5)
    # the live model still holds its own weights (on one process the state dict shares their storage)
    torch.testing.assert_close(exported.classifier.weight, live.classifier.weight * TARGET_STD)
    assert not torch.allclose(exported.classifier.bias, live.classifier.bias)


def test_fold_finds_a_roberta_style_head():
    """RoBERTa/XLM-R/ELECTRA heads end in classifier.out_proj after a dense layer of the same input size."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from train.export import fold_output_scale, output_layer_name

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, num_labels=1)
    model = RobertaForSequenceClassification(config).eval()
    assert output_layer_name(model) == "classifier.out_proj"
    folded = RobertaForSequenceClassification(config).eval()
    folded.load_state_dict({k: v.float() for k, v in fold_output_scale(model, model.state_dict(), -1.5, 4.0).items()})
    ids = torch.tensor([[0, 5, 9, 12, 2], [0, 7, 7, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, -1.5 + 4.0 * model(input_ids=ids).logits)


# ----------------------------------------------------------------------------- pipeline() == predict
def test_pipeline_softmax_equals_predict_for_single_label(exports, tmp_path, capfd, monkeypatch):
    predicted = predict_stdin(exports, "single", tmp_path, capfd, monkeypatch)
    assert [p["windows"] for p in predicted] == [1] * len(SHORT_TEXTS)
    ours = [[p["probabilities"][lab] for lab in ["neg", "neu", "pos"]] for p in predicted]
    np.testing.assert_allclose(pipeline_scores(exports["single"], SHORT_TEXTS), ours, atol=1e-6)
    np.testing.assert_allclose(np.sum(ours, axis=1), 1.0, atol=1e-6)


def test_pipeline_sigmoid_equals_predict_for_multi_label(exports, tmp_path, capfd, monkeypatch):
    predicted = predict_stdin(exports, "multi", tmp_path, capfd, monkeypatch)
    ours = np.array([[p["probabilities"][lab] for lab in MULTI_LABELS] for p in predicted])
    np.testing.assert_allclose(pipeline_scores(exports["multi"], SHORT_TEXTS), ours, atol=1e-6)
    # independent of both: the sigmoid of the raw logits (a softmax would sum to 1 per text)
    logits = raw_outputs(exports["multi"], SHORT_TEXTS)
    np.testing.assert_allclose(ours, 1 / (1 + np.exp(-logits)), atol=1e-6)
    assert not np.allclose(ours.sum(1), 1.0, atol=0.05)


def test_regression_value_is_the_exports_raw_output(exports, tmp_path, capfd, monkeypatch):
    predicted = predict_stdin(exports, "regression", tmp_path, capfd, monkeypatch)
    assert set(predicted[0]) == {"id", "value", "windows"}
    values = [p["value"] for p in predicted]
    np.testing.assert_allclose(values, raw_outputs(exports["regression"], SHORT_TEXTS)[:, 0], atol=1e-5)
    np.testing.assert_allclose(values, [s[0] for s in pipeline_scores(exports["regression"], SHORT_TEXTS)],
                               atol=1e-5)
    live = exports["models"]["regression"]
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(exports["regression"])(SHORT_TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        standardised = live(**batch).logits[:, 0].numpy()
    np.testing.assert_allclose(values, TARGET_MEAN + TARGET_STD * standardised, atol=1e-5)


def test_regression_csv_columns_and_token_weighted_mean_over_windows(exports, tmp_path, capfd):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from train.tiny_model import synthetic_texts

    long_text = synthetic_texts(1, 2, seed=11, min_words=70, max_words=70)[0][0]
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], [["a", long_text], ["b", "bad day"]])
    rc, _, err = run(predict_main, ["--model", exports["regression"], "--input", path, "--output",
                                    tmp_path / "p.csv"], capfd)
    assert rc == 0, err
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["id", "value", "windows"]
    assert [r["id"] for r in rows] == ["a", "b"] and rows[1]["windows"] == "1"
    assert float(rows[1]["value"]) == pytest.approx(float(raw_outputs(exports["regression"], ["bad day"])[0, 0]),
                                                    abs=1e-5)
    # the long document: windows of 16 content tokens every 12, each weighted by its length (specials included)
    tokenizer = AutoTokenizer.from_pretrained(exports["regression"])
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    starts = list(range(0, len(ids) - CHUNKING["chunk_size"] + CHUNKING["stride"], CHUNKING["stride"]))
    windows = [[tokenizer.cls_token_id, *ids[s:s + CHUNKING["chunk_size"]], tokenizer.sep_token_id] for s in starts]
    assert int(rows[0]["windows"]) == len(windows) and len(windows[-1]) < len(windows[0])
    model = AutoModelForSequenceClassification.from_pretrained(exports["regression"]).eval()
    with torch.no_grad():
        values = np.array([model(input_ids=torch.tensor([w])).logits[0, 0].item() for w in windows])
    weights = np.array([len(w) for w in windows])
    weighted = float((values * weights).sum() / weights.sum())
    assert abs(weighted - values.mean()) > 2e-5  # else this text could not tell the two means apart
    assert float(rows[0]["value"]) == pytest.approx(weighted, abs=2e-6)


# ----------------------------------------------------------------------------- multi-label sets, thresholds
def test_multi_label_sets_follow_the_exports_thresholds_and_threshold_option(exports, tmp_path, capfd):
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], [[f"d{i}", t] for i, t in enumerate(SHORT_TEXTS)])
    rc, _, err = run(predict_main, ["--model", exports["multi"], "--input", path, "--output", tmp_path / "p.csv"],
                     capfd)
    assert rc == 0, err
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["id", "labels", *[f"prob_{lab}" for lab in MULTI_LABELS], "windows"]
    for row in rows:  # probabilities near 0.7 / 0.3 / 0.8; the export's thresholds 0.5 / 0.5 / 0.95
        probs = [float(row[f"prob_{lab}"]) for lab in MULTI_LABELS]
        assert 0.6 < probs[0] < 0.8 and 0.2 < probs[1] < 0.4 and 0.7 < probs[2] < 0.9, probs
        assert row["labels"] == "sport"  # 0.5 everywhere would also give business
    rc, _, err = run(predict_main, ["--model", exports["multi"], "--input", path, "--output", tmp_path / "p.jsonl",
                                    "--threshold", "0.2"], capfd)
    assert rc == 0, err
    assert [r["labels"] for r in read_jsonl(tmp_path / "p.jsonl")] == [MULTI_LABELS] * len(SHORT_TEXTS)


def test_threshold_option_is_checked(exports, tmp_path, capfd):
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], [["a", "good"]])
    rc, _, err = run(predict_main, ["--model", exports["multi"], "--input", path, "--threshold", "1.5"], capfd)
    assert_one_error(rc, err, "--threshold 1.5: must be between 0 and 1")
    rc, _, err = run(predict_main, ["--model", exports["single"], "--input", path, "--threshold", "0.5"], capfd)
    assert_one_error(rc, err, "--threshold: only for multi-label models")


# ----------------------------------------------------------------------------- submission columns
def test_submission_columns_are_named_by_the_option(exports, tmp_path, capfd):
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], [["a", "good great"], ["b", "bad awful sad"]])
    rc, full, err = run(predict_main, ["--model", exports["regression"], "--input", path], capfd)
    assert rc == 0, err
    rc, sub, err = run(predict_main, ["--model", exports["regression"], "--input", path, "--format", "submission",
                                      "--submission-columns", "PassengerId,Score"], capfd)
    assert rc == 0, err
    full_rows = list(csv.DictReader(full.splitlines()))
    sub_rows = list(csv.reader(sub.splitlines()))
    assert sub_rows[0] == ["PassengerId", "Score"]
    assert sub_rows[1:] == [[r["id"], r["value"]] for r in full_rows]
    rc, sub, err = run(predict_main, ["--model", exports["multi"], "--input", path, "--format", "submission"], capfd)
    assert rc == 0, err
    assert list(csv.reader(sub.splitlines()))[0] == ["id", "labels"]
    rc, sub, err = run(predict_main, ["--model", exports["multi"], "--input", path, "--format", "submission",
                                      "--threshold", "0.2"], capfd)
    assert [r[1] for r in list(csv.reader(sub.splitlines()))[1:]] == ["sport;politics;business"] * 2
    for bad in ("id", "id,target,extra", "id,", "id,id"):
        rc, _, err = run(predict_main, ["--model", exports["regression"], "--input", path, "--format", "submission",
                                        "--submission-columns", bad], capfd)
        assert_one_error(rc, err, f"--submission-columns {bad}: give two distinct column names")


# ----------------------------------------------------------------------------- --on-empty
EMPTY_ROWS = [["a", "good great team"], ["b", ""], ["c", "<p> </p>"], ["d", "bad awful"]]


def test_on_empty_error_names_the_row(exports, tmp_path, capfd):
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], EMPTY_ROWS)
    out = tmp_path / "p.csv"
    rc, _, err = run(predict_main, ["--model", exports["clean"], "--input", path, "--output", out], capfd)
    assert_one_error(rc, err, "row 2", "empty text in column 'text'", "--on-empty")
    assert not out.exists() and list(tmp_path.iterdir()) == [path]
    # "<p> </p>" is empty only after the export's html cleaning
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], [EMPTY_ROWS[0], EMPTY_ROWS[2]])
    rc, _, err = run(predict_main, ["--model", exports["clean"], "--input", path, "--output", out], capfd)
    assert_one_error(rc, err, "row 2", "after cleaning (html,whitespace)")


def test_on_empty_skip_keeps_the_rows_and_ids_in_place(exports, tmp_path, capfd):
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], EMPTY_ROWS)
    rc, _, err = run(predict_main, ["--model", exports["clean"], "--input", path, "--output", tmp_path / "p.csv",
                                    "--on-empty", "skip", "--docs-per-block", 2], capfd)
    assert rc == 0, err
    rows = read_csv(tmp_path / "p.csv")
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["windows"] for r in rows] == ["1", "0", "0", "1"]
    assert all(r["labels"] == "" and r["prob_sport"] == "" for r in rows[1:3])
    path2 = write_csv(tmp_path / "kept.csv", ["id", "text"], [EMPTY_ROWS[0], EMPTY_ROWS[3]])
    rc, _, err = run(predict_main, ["--model", exports["clean"], "--input", path2, "--output", tmp_path / "k.csv"],
                     capfd)
    assert rc == 0, err
    assert read_csv(tmp_path / "k.csv") == [rows[0], rows[3]]
    rc, _, err = run(predict_main, ["--model", exports["regression"], "--input", path, "--output",
                                    tmp_path / "r.jsonl", "--on-empty", "skip"], capfd)
    assert rc == 0, err
    assert [(r["id"], r["value"] is None) for r in read_jsonl(tmp_path / "r.jsonl")] == [
        ("a", False), ("b", True), ("c", False), ("d", False)]  # no clean steps: "<p> </p>" is a text


def test_on_empty_predict_runs_the_model_on_the_empty_text(exports, tmp_path, capfd):
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], EMPTY_ROWS)
    rc, _, err = run(predict_main, ["--model", exports["clean"], "--input", path, "--output", tmp_path / "p.jsonl",
                                    "--on-empty", "predict"], capfd)
    assert rc == 0, err
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"] and [r["windows"] for r in rows] == [1, 1, 1, 1]
    empty = 1 / (1 + np.exp(-raw_outputs(exports["clean"], [""])[0]))
    for row in rows[1:3]:
        np.testing.assert_allclose([row["probabilities"][lab] for lab in MULTI_LABELS], empty, atol=1e-6)


# ----------------------------------------------------------------------------- clean steps
def test_the_exports_clean_steps_are_applied(exports, tmp_path, capfd):
    texts = [["html", "good <b>great</b>&amp;  team <br/>goal"], ["plain", "good great & team goal"]]
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], texts)
    probs = {}
    for name in ("clean", "multi"):
        rc, _, err = run(predict_main, ["--model", exports[name], "--input", path, "--output",
                                        tmp_path / f"{name}.jsonl"], capfd)
        assert rc == 0, err
        probs[name] = [r["probabilities"] for r in read_jsonl(tmp_path / f"{name}.jsonl")]
    assert probs["clean"][0] == probs["clean"][1]  # html, entities and whitespace cleaned as data_prep does
    assert probs["multi"][0] != probs["multi"][1]  # an export without clean steps sees the tags


# ----------------------------------------------------------------------------- pair columns
def test_single_text_model_ignores_a_text_pair_column(exports, tmp_path, capfd):
    with_pair = write_csv(tmp_path / "pair.csv", ["id", "text", "text_pair"],
                          [["a", "good great", "bad awful"], ["b", "team goal", "the market"]])
    without = write_csv(tmp_path / "single.csv", ["id", "text"], [["a", "good great"], ["b", "team goal"]])
    outs = []
    for path in (with_pair, without):
        rc, stdout, err = run(predict_main, ["--model", exports["single"], "--input", path], capfd)
        assert rc == 0, err
        outs.append(stdout)
    assert outs[0] == outs[1]  # pair encoding would give other probabilities


def test_explicit_pair_column_for_a_single_text_model_is_an_error(exports, tmp_path, capfd):
    path = write_csv(tmp_path / "pair.csv", ["id", "text", "text_pair"], [["a", "good great", "bad awful"]])
    rc, _, err = run(predict_main, ["--model", exports["single"], "--input", path, "--text-pair-column",
                                    "text_pair"], capfd)
    assert_one_error(rc, err, "--text-pair-column text_pair: the model was trained on single texts")


def test_pair_model_needs_its_pair_column(exports, tmp_path, capfd, monkeypatch):
    path = write_csv(tmp_path / "single.csv", ["id", "text", "other"], [["a", "good great", "bad"]])
    rc, _, err = run(predict_main, ["--model", exports["pair"], "--input", path], capfd)
    assert_one_error(rc, err, "no column 'text_pair' (--text-pair-column)", "trained on text pairs",
                     "available columns: id, text, other")
    rc, _, err = run(predict_main, ["--model", exports["pair"], "--input", path, "--text-pair-column", "second"],
                     capfd)
    assert_one_error(rc, err, "no column 'second' (--text-pair-column)")
    txt = tmp_path / "doc.txt"
    txt.write_text("good great")
    rc, _, err = run(predict_main, ["--model", exports["pair"], "--input", txt], capfd)
    assert_one_error(rc, err, "trained on text pairs; give a table input")
    rc, stdout, err = run(predict_main, ["--model", exports["pair"], "--input", path, "--text-pair-column",
                                         "other"], capfd)
    assert rc == 0, err
    rows = list(csv.DictReader(stdout.splitlines()))
    assert [r["id"] for r in rows] == ["a"] and rows[0]["windows"] == "1"


# ----------------------------------------------------------------------------- bertfit.json's new keys
@pytest.mark.parametrize("name, change, needle", [
    ("multi", {"problem_type": "multilabel"}, "'problem_type' must be one of single_label, multi_label, regression"),
    ("multi", {"thresholds": [0.5, 0.5]}, "'thresholds' must be null or a list of 3 numbers in [0, 1]"),
    ("multi", {"thresholds": [0.5, 1.5, 0.5]}, "'thresholds' must be null or a list of 3 numbers in [0, 1]"),
    ("single", {"thresholds": [0.5, 0.5, 0.5]}, "'thresholds' must be null for a single_label model"),
    ("multi", {"clean": ["html", "emoji"]}, "'clean' must be a list of cleaning steps"),
    ("regression", {"pooling": "max"}, "'pooling' must be one of mean for a regression model"),
    ("multi", {"pooling": "max_positive"}, "'pooling' must be one of max, mean for a multi_label model"),
    ("regression", {"labels": ["a", "b"]}, "'labels' must be at most one list of distinct strings"),
    ("multi", {"labels": []}, "'labels' must be a non-empty list"),
])
def test_damaged_new_keys_are_one_line_errors(exports, tmp_path, capfd, name, change, needle):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(exports[name], model)
    info = json.loads((model / "bertfit.json").read_text())
    info.update(change)
    (model / "bertfit.json").write_text(json.dumps(info))
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], [["a", "good"]])
    rc, _, err = run(predict_main, ["--model", model, "--input", path], capfd)
    assert_one_error(rc, err, f"--model {model}: bertfit.json: {needle}")


def test_pooling_option_follows_the_problem_type(exports, tmp_path, capfd):
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], [["a", "good"]])
    rc, _, err = run(predict_main, ["--model", exports["regression"], "--input", path, "--pooling", "max"], capfd)
    assert_one_error(rc, err, "--pooling max: not available for a regression model; choose from mean")
    rc, _, err = run(predict_main, ["--model", exports["single"], "--input", path, "--pooling", "max_positive"],
                     capfd)
    assert_one_error(rc, err, "--pooling max_positive: needs a 2-class model, this one has 3 classes")


# ----------------------------------------------------------------------------- evaluate per task
@pytest.fixture(scope="module")
def task_data(exports, tmp_path_factory):
    """data_prep outputs for a multi-label and a regression CSV, with exports of matching fingerprints."""
    from data_prep.cli import main as prep_main
    from train.tiny_model import synthetic_texts

    root = tmp_path_factory.mktemp("task_data")
    texts = [t for t, _ in synthetic_texts(24, 2, seed=7, min_words=3, max_words=40)]
    write_csv(root / "multi.csv", ["id", "text", "label"],
              [[f"m{i}", t, ";".join(MULTI_LABELS[j] for j in range(3) if (i >> j) & 1)] for i, t in enumerate(texts)])
    write_csv(root / "regression.csv", ["id", "text", "label"],
              [[f"r{i}", t, f"{(i * 0.37) % 5:.2f}"] for i, t in enumerate(texts)])
    common = ["--tokenizer", str(exports["tiny"]), "--max-length", "18", "--chunk-size", "16", "--stride", "12",
              "--id-column", "id", "--split-ratios", "train=0.5,test=0.5", "--quiet"]
    assert prep_main(["--input", str(root / "multi.csv"), "--output", str(root / "multi"), "--task", "multi_label",
                      "--label-separator", ";", "--labels", ",".join(MULTI_LABELS), *common]) == 0
    assert prep_main(["--input", str(root / "regression.csv"), "--output", str(root / "regression"), "--task",
                      "regression", *common]) == 0
    return root


def test_evaluate_multi_label(exports, task_data, tmp_path, capfd):
    manifest = json.loads((task_data / "multi" / "manifest.json").read_text())
    assert manifest["labels"] == MULTI_LABELS
    rc, stdout, err = run(evaluate_main, ["--model", exports["multi"], "--data", task_data / "multi", "--output-dir",
                                          tmp_path / "eval"], capfd)
    assert rc == 0, err
    assert "doc_f1_micro=" in stdout
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["classification_report.txt", "metrics.json",
                                                                     "predictions.csv"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["problem_type"] == "multi_label" and "doc_f1_micro" in metrics
    assert metrics["thresholds"] == dict(zip(MULTI_LABELS, [0.5, 0.5, 0.95]))
    rows = read_csv(tmp_path / "eval" / "predictions.csv")
    assert list(rows[0]) == ["id", "labels", "predicted", *[f"prob_{lab}" for lab in MULTI_LABELS], "windows"]
    assert len(rows) == manifest["splits"]["test"]["documents"]
    truth = {f"m{i}": ";".join(MULTI_LABELS[j] for j in range(3) if (i >> j) & 1) for i in range(24)}
    assert all(r["labels"] == truth[r["id"]] for r in rows)
    assert all(r["predicted"] == "sport" for r in rows)  # the export's thresholds, as predict
    rc, _, err = run(evaluate_main, ["--model", exports["multi"], "--data", task_data / "multi", "--output-dir",
                                     tmp_path / "eval2", "--threshold", "0.2"], capfd)
    assert rc == 0, err
    assert all(r["predicted"] == ";".join(MULTI_LABELS) for r in read_csv(tmp_path / "eval2" / "predictions.csv"))


def test_evaluate_regression(exports, task_data, tmp_path, capfd):
    rc, stdout, err = run(evaluate_main, ["--model", exports["regression"], "--data", task_data / "regression",
                                          "--output-dir", tmp_path / "eval"], capfd)
    assert rc == 0, err
    assert "doc_mse=" in stdout and "doc_pearson=" in stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = read_csv(tmp_path / "eval" / "predictions.csv")
    assert list(rows[0]) == ["id", "value", "predicted", "windows"]
    errors = np.array([float(r["predicted"]) - float(r["value"]) for r in rows])
    assert metrics["doc_mse"] == pytest.approx(float(np.mean(errors ** 2)), rel=1e-4)
    assert not (tmp_path / "eval" / "confusion_matrix.png").exists()


def test_evaluate_refuses_data_of_another_task_or_cleaning(exports, task_data, tmp_path, capfd):
    rc, _, err = run(evaluate_main, ["--model", exports["regression"], "--data", task_data / "multi",
                                     "--output-dir", tmp_path / "eval"], capfd)
    assert_one_error(rc, err, "is multi_label data, the model is a regression model")
    rc, _, err = run(evaluate_main, ["--model", exports["clean"], "--data", task_data / "multi",
                                     "--output-dir", tmp_path / "eval"], capfd)
    assert_one_error(rc, err, "was cleaned with --clean (none), the model's data with html,whitespace")
    assert not (tmp_path / "eval").exists()
