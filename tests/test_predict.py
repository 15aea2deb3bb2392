"""predict and evaluate CLIs: windows like data_prep, probabilities like evaluation, pipeline() agreement,
one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.launch import ROOT, tiny_export, train_env

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_model):
    """A bertfit export of the tiny model with 40 documents, many longer than one window."""
    return tiny_export(tmp_path_factory.mktemp("export"), tiny_model, num_docs=40, seed=5, max_words=200)


def cli(tmp_path, module, *args, stdin=None):
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=train_env(tmp_path),
                       capture_output=True, text=True, input=stdin, timeout=300)
    return r


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_probabilities_equal_the_evaluation_path(export, tmp_path):
    r = cli(tmp_path, "train.evaluate", "--model", export["best"], "--data", export["data"], "--split", "test",
            "--output-dir", tmp_path / "eval")
    assert r.returncode == 0, r.stderr
    assert "doc_accuracy=" in r.stdout
    for name in ("metrics.json", "classification_report.txt", "confusion_matrix.png", "predictions.csv"):
        assert (tmp_path / "eval" / name).exists(), name
    evaluated = {row["id"]: row for row in read_csv(tmp_path / "eval" / "predictions.csv")}
    assert len(evaluated) == export["manifest"]["splits"]["test"]["documents"]
    # predict on the raw texts (all 40 documents; compare the 20 test ones), small batches across documents
    r = cli(tmp_path, "train.predict", "--model", export["best"], "--input", export["csv"], "--output",
            tmp_path / "pred.csv", "--batch-size", 5, "--docs-per-block", 7)
    assert r.returncode == 0, r.stderr
    predicted = {row["id"]: row for row in read_csv(tmp_path / "pred.csv")}
    assert len(predicted) == 40
    windows = {d: n for d, n in zip(*_doc_windows(export["data"]))}
    for doc_id, row in evaluated.items():
        got = predicted[doc_id]
        for label in ("class0", "class1"):
            assert float(got[f"prob_{label}"]) == pytest.approx(float(row[f"prob_{label}"]), abs=2e-6), doc_id
        assert got["label"] == row["predicted"]
        assert int(got["windows"]) == windows[doc_id]
    assert max(windows.values()) >= 10  # long documents really were windowed


def _doc_windows(data):
    import datasets

    ds = datasets.load_from_disk(str(data / "test"))
    ids, counts = np.unique(ds["id"], return_counts=True)
    return ids.tolist(), counts.tolist()


def test_pipeline_agrees_with_predict_on_short_texts(export, tmp_path):
    texts = ["good great happy", "bad awful sad lose", "team goal match", "the market price", "love win fine"]
    r = cli(tmp_path, "train.predict", "--model", export["best"], "--output", tmp_path / "p.jsonl",
            stdin="\n".join(texts) + "\n")
    assert r.returncode == 0, r.stderr
    predicted = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["windows"] for p in predicted] == [1] * 5
    script = (f"import json; from transformers import pipeline; "
              f"clf = pipeline('text-classification', model={str(export['best'])!r}); "
              f"print(json.dumps([r['label'] for r in clf({texts!r})]))")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=train_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [p["label"] for p in predicted]


def test_predict_folder_stdin_and_submission_format(export, tmp_path):
    folder = tmp_path / "texts" / "sub"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("good great " * 300)
    (tmp_path / "texts" / "b.txt").write_text("bad awful")
    r = cli(tmp_path, "train.predict", "--model", export["best"], "--input", tmp_path / "texts", "--format",
            "submission")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(r.stdout.splitlines()))
    assert rows[0] == ["id", "label"] and sorted(x[0] for x in rows[1:]) == ["b.txt", "sub/a.txt"]
    assert all(x[1] in ("class0", "class1") for x in rows[1:])


@pytest.mark.parametrize("case", ["missing_model", "no_label_maps", "empty_input", "missing_text_column"])
def test_predict_bad_input_one_line_error(export, tmp_path, tiny_model, case):
    args = ["--model", export["best"], "--input", export["csv"], "--output", tmp_path / "out.csv"]
    if case == "missing_model":
        args[1] = tmp_path / "no-such-model"
        needle = "no such folder"
    elif case == "no_label_maps":
        args[1] = tiny_model  # a plain model folder: LABEL_0/LABEL_1, no bertfit.json
        needle = "no label maps"
    elif case == "empty_input":
        (tmp_path / "empty.csv").write_text("id,text\n")
        args[3] = tmp_path / "empty.csv"
        needle = "no documents"
    else:
        args += ["--text-column", "body"]
        needle = "no column 'body' (--text-column); available columns: id, text, label"
    r = cli(tmp_path, "train.predict", *args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "out.csv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.csv")]
