"""The Python API (issue 19): ``from bertfit import DocumentClassifier`` gives what ``python -m train.predict``
writes, column for column, for every problem type; long documents are windowed with bounded batches; empty,
ragged and pair inputs; and the predict/evaluate help texts, Parquet output and the model card evaluate updates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.launch import ROOT, train_env
from tests.test_predict_faults import assert_one_error, run
from tests.test_predict_tasks import (CHUNKING, MULTI_LABELS, SHORT_TEXTS, exports, read_csv, read_jsonl,  # noqa: F401
                                      task_data, write_csv)
from train.api import DocumentClassifier, DocumentPrediction
from train.evaluate import main as evaluate_main
from train.inference import InferenceError
from train.predict import main as predict_main

pytestmark = pytest.mark.timeout(600)

# Options shared by the CLI and the API in the equality test: small batches and blocks, so windows of several
# documents share forward passes and a document's windows span batches.
BATCH, BLOCK = 3, 2


def long_text(words: int, seed: int = 11) -> str:
    from train.tiny_model import synthetic_texts

    return synthetic_texts(1, 2, seed=seed, min_words=words, max_words=words)[0][0]


def documents_for(name: str) -> list[list[str]]:
    """Rows (id, text[, text_pair]) for the equality test: short, long (several windows) and, for the export
    with clean steps, markup that only cleaning removes."""
    texts = [*SHORT_TEXTS, long_text(70), "good <b>great</b>&amp;  team <br/>goal", long_text(40, seed=3)]
    if name == "pair":
        return [[f"d{i}", t, SHORT_TEXTS[(i + 1) % len(SHORT_TEXTS)]] for i, t in enumerate(texts)]
    return [[f"d{i}", t] for i, t in enumerate(texts)]


def assert_same(a: DocumentPrediction, b: DocumentPrediction) -> None:
    """Same document result up to float noise (a batch padded differently changes the last bits)."""
    assert (a.label, a.labels, a.windows) == (b.label, b.labels, b.windows)
    if a.value is not None or b.value is not None:
        assert a.value == pytest.approx(b.value, abs=1e-6)
    assert (a.probabilities is None) == (b.probabilities is None)
    if a.probabilities is not None:
        assert list(a.probabilities) == list(b.probabilities)
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-6)


def expected_csv_row(result: DocumentPrediction, doc_id: str, clf: DocumentClassifier) -> dict:
    """The CSV row predict documents (OUTPUT_HELP), built from an API result."""
    row = {"id": doc_id}
    if clf.problem_type == "single_label":
        row["label"] = result.label
    elif clf.problem_type == "multi_label":
        row["labels"] = ";".join(result.labels)
    else:
        row["value"] = repr(result.value)
    for label in clf.labels:
        row[f"prob_{label}"] = f"{result.probabilities[label]:.6f}"
    row["windows"] = str(result.windows)
    return row


@pytest.mark.parametrize("name", ["single", "multi", "regression", "clean", "pair"])
def test_cli_and_api_give_identical_outputs(exports, tmp_path, capfd, name):
    rows = documents_for(name)
    header = ["id", "text", "text_pair"] if name == "pair" else ["id", "text"]
    path = write_csv(tmp_path / "docs.csv", header, rows)
    options = ["--batch-size", BATCH, "--docs-per-block", BLOCK]
    for suffix in ("csv", "jsonl"):
        rc, _, err = run(predict_main, ["--model", exports[name], "--input", path, "--output",
                                        tmp_path / f"p.{suffix}", *options], capfd)
        assert rc == 0, err
    clf = DocumentClassifier.from_pretrained(exports[name], device="cpu", batch_size=BATCH, docs_per_block=BLOCK)
    results = clf([r[1] for r in rows], text_pairs=[r[2] for r in rows] if name == "pair" else None)
    assert len(results) == len(rows)
    # long documents were windowed (a pair is one window: data_prep truncates pairs to max_length)
    assert max(r.windows for r in results) == 1 if name == "pair" else max(r.windows for r in results) > 1
    # every CSV column, as text
    assert read_csv(tmp_path / "p.csv") == [expected_csv_row(r, row[0], clf) for r, row in zip(results, rows)]
    # every JSONL key, at full precision
    target = {"single_label": "label", "multi_label": "labels", "regression": "value"}[clf.problem_type]
    want = []
    for r, row in zip(results, rows):
        record = {"id": row[0], target: getattr(r, target)}
        if clf.problem_type != "regression":
            record["probabilities"] = r.probabilities
        want.append({**record, "windows": r.windows})
    assert read_jsonl(tmp_path / "p.jsonl") == want


def test_api_result_shape_per_problem_type(exports):
    """Only the field of the model's problem type is set; probabilities follow the export's labels, and the
    multi-label set uses the export's per-label thresholds (0.5, 0.5, 0.95: business at ~0.8 stays out)."""
    single = DocumentClassifier.from_pretrained(exports["single"], device="cpu")("good great happy")
    assert single.label in ("neg", "neu", "pos") and single.labels is None and single.value is None
    assert list(single.probabilities) == ["neg", "neu", "pos"] and single.windows == 1
    assert single.label == max(single.probabilities, key=single.probabilities.get)
    multi = DocumentClassifier.from_pretrained(exports["multi"], device="cpu")(SHORT_TEXTS)
    assert [m.labels for m in multi] == [["sport"]] * len(SHORT_TEXTS)
    assert all(0.7 < m.probabilities["business"] < 0.9 for m in multi)
    lowered = DocumentClassifier.from_pretrained(exports["multi"], device="cpu", threshold=0.2)(SHORT_TEXTS)
    assert [m.labels for m in lowered] == [MULTI_LABELS] * len(SHORT_TEXTS)
    value = DocumentClassifier.from_pretrained(exports["regression"], device="cpu")("good great happy")
    assert isinstance(value.value, float) and value.label is None and value.probabilities is None


def test_5000_token_document_is_windowed_in_batches_of_at_most_batch_size(exports):
    clf = DocumentClassifier.from_pretrained(exports["single"], device="cpu", batch_size=4)
    text = long_text(5200, seed=21)
    ids = clf.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids  # no over-length warning
    assert len(ids) >= 5000
    # windows of chunk_size content tokens every stride tokens, the last one possibly shorter
    want_windows = len(range(0, len(ids) - CHUNKING["chunk_size"] + CHUNKING["stride"], CHUNKING["stride"]))
    seen = []
    hook = clf.model.register_forward_hook(lambda module, args, kwargs, output: seen.append(
        kwargs["input_ids"].shape), with_kwargs=True)
    try:
        result = clf(["bad awful", text, "team goal"])
    finally:
        hook.remove()
    assert [r.windows for r in result] == [1, want_windows, 1] and want_windows > 400
    assert max(shape[0] for shape in seen) == 4  # never more than batch_size windows through the model at once
    assert sum(shape[0] for shape in seen) == want_windows + 2
    assert max(shape[1] for shape in seen) <= CHUNKING["max_length"]
    # the batch size is a memory knob only: one large batch gives the same probabilities
    big = DocumentClassifier.from_pretrained(exports["single"], device="cpu", batch_size=1024)([text])[0]
    np.testing.assert_allclose(list(big.probabilities.values()), list(result[1].probabilities.values()), atol=1e-6)


def test_empty_inputs(exports):
    clf = DocumentClassifier.from_pretrained(exports["clean"], device="cpu")
    assert clf([]) == []
    with pytest.raises(InferenceError, match=r"texts\[1\]: empty text after cleaning \(html,whitespace\); "
                                             r"on_empty='skip'"):
        clf(["good great", "<p> </p>", "bad"])
    with pytest.raises(InferenceError, match=r"texts\[0\]: empty text"):
        clf([None])
    skip = DocumentClassifier.from_pretrained(exports["clean"], device="cpu", on_empty="skip", docs_per_block=2)
    skipped = skip(["good great", "", "<p> </p>", "bad awful", "  "])
    assert [r.windows for r in skipped] == [1, 0, 0, 1, 0]
    assert skipped[1] == DocumentPrediction()  # no labels, no probabilities
    assert_same(skipped[0], clf("good great"))  # the others keep their places
    assert_same(skipped[3], clf("bad awful"))
    predicted = DocumentClassifier.from_pretrained(exports["clean"], device="cpu", on_empty="predict")(["", "x"])
    assert predicted[0].windows == 1 and predicted[0].probabilities is not None
    with pytest.raises(InferenceError, match="on_empty 'keep': choose from error, skip, predict"):
        DocumentClassifier.from_pretrained(exports["clean"], device="cpu", on_empty="keep")


def test_ragged_documents_batched_together_equal_each_alone(exports):
    """Documents of 1 to dozens of windows share blocks and batches; each result is still its own document's."""
    clf = DocumentClassifier.from_pretrained(exports["multi"], device="cpu", batch_size=5, docs_per_block=3)
    texts = [long_text(n, seed=n) for n in (3, 150, 1, 60, 8, 300, 2)]
    together = clf(texts)
    alone = [clf([t])[0] for t in texts]
    assert len({r.windows for r in together}) >= 4
    for a, b in zip(together, alone):
        assert_same(a, b)


def test_pairs(exports):
    pair = DocumentClassifier.from_pretrained(exports["pair"], device="cpu")
    forward = pair(["good great", "team goal"], text_pairs=["bad awful", "the market"])
    swapped = pair(["bad awful", "the market"], text_pairs=["good great", "team goal"])
    assert [r.windows for r in forward] == [1, 1]
    assert forward[0].probabilities != swapped[0].probabilities  # both texts reach the model, in order
    assert_same(pair("good great", text_pairs="bad awful"), forward[0])
    with pytest.raises(InferenceError, match="text_pairs: the model was trained on text pairs"):
        pair(["good great"])
    with pytest.raises(InferenceError, match="text_pairs: 1 pairs for 2 texts"):
        pair(["good great", "team goal"], text_pairs=["bad awful"])
    with pytest.raises(InferenceError, match=r"text_pairs\[0\]: empty text"):
        pair(["good great"], text_pairs=[" "])
    single = DocumentClassifier.from_pretrained(exports["single"], device="cpu")
    with pytest.raises(InferenceError, match="text_pairs: the model was trained on single texts"):
        single(["good great"], text_pairs=["bad awful"])


def test_api_options_are_checked(exports):
    with pytest.raises(InferenceError, match="batch_size 0: must be >= 1"):
        DocumentClassifier.from_pretrained(exports["single"], device="cpu", batch_size=0)
    with pytest.raises(InferenceError, match="pooling max: not available for a regression model"):
        DocumentClassifier.from_pretrained(exports["regression"], device="cpu", pooling="max")
    with pytest.raises(InferenceError, match="threshold: only for multi-label models"):
        DocumentClassifier.from_pretrained(exports["single"], device="cpu", threshold=0.3)
    # window overrides reach the windowing: 8 content tokens per window give more windows than the export's 16
    text = long_text(70)
    default = DocumentClassifier.from_pretrained(exports["single"], device="cpu")(text)
    small = DocumentClassifier.from_pretrained(exports["single"], device="cpu", chunk_size=8, stride=8)(text)
    assert small.windows > default.windows > 1


def test_import_from_the_bertfit_package(tmp_path):
    import bertfit

    assert bertfit.DocumentClassifier is DocumentClassifier
    # a fresh interpreter outside the checkout's folder (PYTHONPATH as the package install gives it)
    r = subprocess.run([sys.executable, "-c", "from bertfit import DocumentClassifier; "
                        "print(DocumentClassifier.__module__)"], cwd=tmp_path, env=train_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "train.api"


# ----------------------------------------------------------------------------- help texts, --output formats
@pytest.mark.parametrize("main, files", [
    (predict_main, []),
    (evaluate_main, ["metrics.json", "classification_report.txt", "predictions.csv", "confusion_matrix.png"]),
])
def test_help_opens_with_a_plain_sentence(main, files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]  # after the usage block
    assert "``" not in text and ":" not in description.splitlines()[0], description
    assert description[0].isupper() and description.rstrip().endswith("."), description
    for name in files:
        assert name in text.split("\n\n", 2)[2], name  # listed after the description, not only in the usage
    if files:
        assert "single-label models only" in text


def test_parquet_output_is_real_parquet_with_the_csv_columns(exports, tmp_path, capfd):
    import pyarrow.parquet as pq

    rows = documents_for("multi") + [["empty", ""]]
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], rows)
    for suffix in ("csv", "parquet"):
        rc, _, err = run(predict_main, ["--model", exports["multi"], "--input", path, "--output",
                                        tmp_path / f"p.{suffix}", "--on-empty", "skip"], capfd)
        assert rc == 0, err
    assert (tmp_path / "p.parquet").read_bytes()[:4] == b"PAR1"
    table = pq.read_table(tmp_path / "p.parquet")
    assert str(table.schema.field("labels").type.value_type) == "string"  # a list of labels, not ';'-joined text
    got = table.to_pylist()
    want = read_csv(tmp_path / "p.csv")
    assert [list(r) for r in got] == [list(want[0])] * len(want)
    for g, w in zip(got, want):
        assert g["id"] == w["id"] and g["windows"] == int(w["windows"])
        assert ";".join(g["labels"] or []) == w["labels"]
        for label in MULTI_LABELS:
            cell = w[f"prob_{label}"]
            assert (g[f"prob_{label}"] is None) if cell == "" else f"{g[f'prob_{label}']:.6f}" == cell
    assert got[-1]["labels"] is None and got[-1]["windows"] == 0
    rc, _, err = run(predict_main, ["--model", exports["regression"], "--input", path, "--output",
                                    tmp_path / "s.parquet", "--format", "submission", "--on-empty", "skip"], capfd)
    assert rc == 0, err
    sub = pq.read_table(tmp_path / "s.parquet")
    assert sub.column_names == ["id", "value"] and str(sub.schema.field("value").type) == "double"


@pytest.mark.parametrize("name", ["p.txt", "p.tsv", "predictions", "p.parq"])
def test_unknown_output_suffix_is_a_one_line_error(exports, tmp_path, capfd, name):
    path = write_csv(tmp_path / "docs.csv", ["id", "text"], [["a", "good"]])
    rc, _, err = run(predict_main, ["--model", exports["single"], "--input", path, "--output", tmp_path / name],
                     capfd)
    assert_one_error(rc, err, f"--output {tmp_path / name}: unknown output format", ".csv, .jsonl or .parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.csv"]


# ----------------------------------------------------------------------------- evaluate updates the model card
def test_evaluate_into_the_export_rewrites_its_model_card(exports, task_data, tmp_path, capfd):
    model = tmp_path / "model"
    shutil.copytree(exports["multi"], model)
    (model / "README.md").unlink(missing_ok=True)
    rc, stdout, err = run(evaluate_main, ["--model", model, "--data", task_data / "multi", "--split", "test"], capfd)
    assert rc == 0, err
    metrics = json.loads((model / "eval-test" / "metrics.json").read_text())
    card = (model / "README.md").read_text()
    assert "model card" in stdout and card.startswith("---\n")
    assert "### test" in card and f"| f1_micro | {metrics['doc_f1_micro']:.4f} |" in card, card
    # reports written elsewhere are not in the card: it is left alone
    (model / "README.md").write_text("kept")
    rc, _, err = run(evaluate_main, ["--model", model, "--data", task_data / "multi", "--split", "test",
                                     "--output-dir", tmp_path / "elsewhere"], capfd)
    assert rc == 0, err
    assert (model / "README.md").read_text() == "kept"
