"""Each problem type end to end with the tiny model: data_prep --task -> 2-process training -> evaluate ->
predict -> transformers.pipeline on the export, which must give predict's numbers for a one-window text."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.launch import ROOT, assert_two_ranks, eval_records, run, tail, train_command, train_env, write_config
from train.tiny_model import CLASS_WORDS, FILLER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TOPICS = ["pos", "neg", "sport"]  # multi-label names; topic k is written with CLASS_WORDS[k]


def multi_label_rows(n: int, seed: int = 0) -> list[dict]:
    """Documents about 0-2 topics: a topic's words appear only in documents that carry it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topics = sorted(rng.sample(range(3), [0, 1, 1, 2][i % 4]))
        words = [rng.choice(FILLER) for _ in range(rng.randint(8, 40))]
        for k in topics:
            words += [rng.choice(CLASS_WORDS[k]) for _ in range(4)]
        rng.shuffle(words)
        rows.append({"id": f"d{i}", "text": " ".join(words), "labels": [TOPICS[k] for k in topics]})
    return rows


def regression_rows(n: int, seed: int = 0) -> list[dict]:
    """The target is the share of 'good' words among the signal words, scaled to 1..5."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = rng.randint(0, 6)
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 30))]
        words += [rng.choice(CLASS_WORDS[0]) for _ in range(good)] + [rng.choice(CLASS_WORDS[1])
                                                                       for _ in range(6 - good)]
        rng.shuffle(words)
        rows.append({"id": f"d{i}", "text": " ".join(words), "score": 1 + 4 * good / 6})
    return rows


def prepare(tmp_path: Path, tiny_model: Path, task: str, rows: list[dict], label_column: str, *extra) -> Path:
    from data_prep.cli import main as prep_main

    source = tmp_path / f"{task}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / f"{task}_shards"
    rc = prep_main(["--input", str(source), "--output", str(out), "--tokenizer", str(tiny_model), "--task", task,
                    "--label-column", label_column, "--id-column", "id", "--max-length", "24", "--quiet", *extra])
    assert rc == 0
    return out


def train_two_processes(tmp_path: Path, tiny_model: Path, data: Path, **over) -> Path:
    out = tmp_path / "run"
    cfg = dict(model=str(tiny_model), data=str(data), output_dir=str(out), seed=3, epochs=3,
               per_device_batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every_steps=5, report_to="none")
    cfg.update(over)
    config = write_config(tmp_path / "run.yaml", **cfg)
    log = tmp_path / "train.log"
    rc = run(train_command(config), log, train_env(tmp_path), timeout=600)
    assert rc == 0, tail(log)
    assert_two_ranks(log)
    return out


def cli(tmp_path: Path, module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=train_env(tmp_path), input=stdin,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def pipeline_scores(tmp_path: Path, best: Path, text: str) -> dict[str, float]:
    """transformers.pipeline's scores for one text, each label's, as a plain user would call it."""
    script = tmp_path / "pipe.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from transformers import pipeline
        clf = pipeline("text-classification", model={str(best)!r}, top_k=None)
        print(json.dumps({{r["label"]: r["score"] for r in clf([{text!r}])[0]}}))
    """))
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=train_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def predict_one(tmp_path: Path, best: Path, text: str, *extra: str) -> dict[str, str]:
    r = cli(tmp_path, "train.predict", "--model", str(best), *extra, stdin=text + "\n")
    return next(csv.DictReader(r.stdout.splitlines()))


def check_evaluate_matches_training(tmp_path: Path, out: Path, data: Path, keys: list[str]) -> dict:
    """The evaluate CLI on the validation split reproduces the metrics training logged for the best model."""
    logged = [r for r in eval_records(out) if r["best"]][-1]["eval"]
    cli(tmp_path, "train.evaluate", "--model", str(out / "best"), "--data", str(data), "--split", "validation",
        "--output-dir", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    flat = metrics.get("metrics", metrics)
    for key in keys:
        assert flat[key] == pytest.approx(logged[key], abs=1e-5), key
    return flat


def test_single_label_with_balanced_class_weights_end_to_end(tmp_path, tiny_model):
    from train.tiny_model import write_synthetic_csv

    rows = list(csv.DictReader(open(write_synthetic_csv(tmp_path / "raw.csv", 160, num_labels=2, seed=5))))
    rows = [r for i, r in enumerate(rows) if r["label"] == "class0" or i % 4 == 1]  # 4:1 imbalance
    data = prepare(tmp_path, tiny_model, "single_label", rows, "label")
    out = train_two_processes(tmp_path, tiny_model, data, class_weights="balanced")
    info = json.loads((out / "best" / "bertfit.json").read_text())
    assert info["problem_type"] == "single_label" and info["config"]["class_weights"] == "balanced"
    check_evaluate_matches_training(tmp_path, out, data, ["doc_accuracy", "doc_f1_macro", "doc_loss"])
    text = "good great happy win the day"
    row = predict_one(tmp_path, out / "best", text)
    piped = pipeline_scores(tmp_path, out / "best", text)
    for label in info["labels"]:
        assert float(row[f"prob_{label}"]) == pytest.approx(piped[label], abs=1e-5)
    assert row["label"] == max(piped, key=piped.get)


def test_multi_label_end_to_end(tmp_path, tiny_model):
    data = prepare(tmp_path, tiny_model, "multi_label", multi_label_rows(240), "labels")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["problem_type"] == "multi_label" and manifest["labels"] == sorted(TOPICS)
    out = train_two_processes(tmp_path, tiny_model, data, threshold="tune", pos_weight="balanced")
    info = json.loads((out / "best" / "bertfit.json").read_text())
    assert info["problem_type"] == "multi_label" and len(info["thresholds"]) == 3
    assert info["config"]["early_stopping"] == {**info["config"]["early_stopping"], "metric": "doc_f1_micro",
                                                "mode": "max"}
    metrics = check_evaluate_matches_training(tmp_path, out, data,
                                              ["doc_f1_micro", "doc_f1_macro", "doc_subset_accuracy", "doc_loss"])
    assert metrics["doc_f1_micro"] > 0.5  # it learned something: the topics' words are the only signal
    text = "the ball team match goal news of the day"
    row = predict_one(tmp_path, out / "best", text)
    piped = pipeline_scores(tmp_path, out / "best", text)  # sigmoid per label, from config.problem_type
    for label, threshold in zip(info["labels"], info["thresholds"]):
        assert float(row[f"prob_{label}"]) == pytest.approx(piped[label], abs=1e-5)
    predicted = {label for label, t in zip(info["labels"], info["thresholds"]) if piped[label] >= t}
    assert set(filter(None, row["labels"].split(";"))) == predicted


def test_regression_end_to_end(tmp_path, tiny_model):
    rows = regression_rows(240)
    data = prepare(tmp_path, tiny_model, "regression", rows, "score")
    manifest = json.loads((data / "manifest.json").read_text())
    targets = np.array([r["score"] for r in rows])
    assert manifest["problem_type"] == "regression" and manifest["labels"] == []
    assert manifest["target"]["min"] == pytest.approx(targets.min())
    assert manifest["target"]["max"] == pytest.approx(targets.max())
    out = train_two_processes(tmp_path, tiny_model, data, epochs=4)
    info = json.loads((out / "best" / "bertfit.json").read_text())
    assert info["problem_type"] == "regression" and info["config"]["early_stopping"]["mode"] == "min"
    metrics = check_evaluate_matches_training(tmp_path, out, data, ["doc_mse", "doc_mae", "doc_pearson"])
    assert metrics["doc_pearson"] > 0.3  # the good/bad word share is learnable even for the tiny model
    text = "good great happy bad the day"
    row = predict_one(tmp_path, out / "best", text)
    piped = pipeline_scores(tmp_path, out / "best", text)  # identity: the export outputs raw target values
    assert float(row["value"]) == pytest.approx(next(iter(piped.values())), abs=1e-4)
    assert 0.0 < float(row["value"]) < 6.0  # de-standardised: on the 1..5 scale, not around 0


@pytest.mark.parametrize("case", ["tune_without_eval_split", "unknown_pos_weight_label", "class_weights_multi_label",
                                  "max_positive_multi_label"])
def test_multi_label_settings_that_cannot_work_are_one_line_errors(tmp_path, tiny_model, case):
    data = prepare(tmp_path, tiny_model, "multi_label", multi_label_rows(40), "labels")
    extra, needle = {
        "tune_without_eval_split": ({"threshold": "tune", "eval_split": None},
                                    "threshold: tune needs an eval_split"),
        "unknown_pos_weight_label": ({"pos_weight": {"politics": 2.0}}, "pos_weight: unknown label(s) 'politics'"),
        "class_weights_multi_label": ({"class_weights": "balanced"},
                                      "class_weights is for single-label data; this data is multi_label"),
        "max_positive_multi_label": ({"pooling": "max_positive"},
                                     "pooling max_positive: not available for a multi_label model"),
    }[case]
    config = write_config(tmp_path / "bad.yaml", model=str(tiny_model), data=str(data),
                          output_dir=str(tmp_path / "out"), **extra)
    r = subprocess.run([sys.executable, "-m", "train", "--config", str(config)], cwd=ROOT, env=train_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
