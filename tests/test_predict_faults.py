"""predict/evaluate refuse bad options, model folders and inputs with one `error:` line, exit status 2, no
traceback, and leave no output file (final or temporary) behind."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.launch import ROOT, tiny_export, train_env
from train.evaluate import main as evaluate_main
from train.predict import main as predict_main

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_model):
    """A bertfit export of the tiny model with 12 short documents."""
    return tiny_export(tmp_path_factory.mktemp("faults"), tiny_model, num_docs=12, seed=3, max_words=40)


@pytest.fixture
def out(tmp_path):
    """An empty folder for outputs: every failing run must leave it empty (no result, no temporary file)."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def run(main, args, capfd) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    stdout, stderr = capfd.readouterr()
    return rc, stdout, stderr


def assert_one_error(rc: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def copy_export(export, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(export["best"], model)
    return model


# ------------------------------------------------------------------------------------------- 1. --output
def test_output_in_missing_folder(export, tmp_path, capfd):
    target = tmp_path / "no-such-folder" / "pred.csv"
    rc, _, err = run(predict_main, ["--model", export["best"], "--input", export["csv"], "--output", target], capfd)
    assert_one_error(rc, err, f"--output {target}", "does not exist")
    assert not target.parent.exists()


def test_output_is_an_existing_folder(export, out, capfd):
    rc, _, err = run(predict_main, ["--model", export["best"], "--input", export["csv"], "--output", out], capfd)
    assert_one_error(rc, err, f"--output {out}", "is a folder")
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------ 2. lengths and sizes
@pytest.mark.parametrize("option, value, needle", [
    ("--max-length", 4096, "--max-length 4096: the model has only 512 positions"),
    ("--max-length", 0, "--max-length 0: must be >= 1"),
    ("--chunk-size", 0, "--chunk-size 0: must be >= 1"),
    ("--stride", -1, "--stride -1: must be >= 1"),
    ("--batch-size", 0, "--batch-size 0: must be >= 1"),
    ("--batch-size", -1, "--batch-size -1: must be >= 1"),
    ("--docs-per-block", -3, "--docs-per-block -3: must be >= 1"),
])
def test_predict_refuses_bad_sizes(export, out, capfd, option, value, needle):
    rc, _, err = run(predict_main, ["--model", export["best"], "--input", export["csv"], "--output",
                                    out / "pred.csv", option, value], capfd)
    assert_one_error(rc, err, needle)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("value", [0, -1])
def test_evaluate_refuses_non_positive_batch_size(export, tmp_path, capfd, value):
    # -1 used to score nothing (an empty range) and report the metrics of all-zero logits
    report_dir = tmp_path / "eval"
    rc, _, err = run(evaluate_main, ["--model", export["best"], "--data", export["data"], "--split", "test",
                                     "--output-dir", report_dir, "--batch-size", value], capfd)
    assert_one_error(rc, err, f"--batch-size {value}: must be >= 1")
    assert not report_dir.exists()


# ------------------------------------------------------------------------------------------- 3. --device
@pytest.mark.parametrize("device, needle", [
    ("gpu", "--device gpu: unknown device"),
    ("cuda:x", "--device cuda:x: unknown device"),
    ("cuda", "--device cuda: not available"),
    ("cuda:7", "--device cuda:7: not available"),
    ("mps", "--device mps: not available"),
])
def test_predict_refuses_unknown_or_absent_device(export, out, capfd, device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    rc, _, err = run(predict_main, ["--model", export["best"], "--input", export["csv"], "--output",
                                    out / "pred.csv", "--device", device], capfd)
    assert_one_error(rc, err, needle)
    assert list(out.iterdir()) == []


def test_evaluate_refuses_unknown_device(export, tmp_path, capfd):
    rc, _, err = run(evaluate_main, ["--model", export["best"], "--data", export["data"], "--output-dir",
                                     tmp_path / "eval", "--device", "gpu"], capfd)
    assert_one_error(rc, err, "--device gpu: unknown device")
    assert not (tmp_path / "eval").exists()


# ------------------------------------------------------------------------------- 4. damaged model folder
def _set(path, change):
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("case, needle", [
    ("config_not_json", "config.json is not valid JSON"),
    ("config_not_object", "config.json: expected a JSON object, got a list"),
    ("config_id2label_wrong_type", "config.json: 'id2label' must be an object"),
    ("info_not_json", "bertfit.json is not valid JSON"),
    ("info_missing_labels", "bertfit.json: missing key 'labels'"),
    ("info_missing_chunking", "bertfit.json: missing key 'chunking'"),
    ("info_labels_wrong_type", "bertfit.json: 'labels' must be a non-empty list of distinct strings"),
    ("info_max_length_wrong_type", "bertfit.json: 'chunking.max_length' must be a positive integer, got \"18\""),
    ("info_pooling_unknown", "bertfit.json: 'pooling' must be one of mean, max"),
    ("info_label_count", "3 labels in bertfit.json, but the classifier has 2 outputs"),
    ("missing_folder", "no such folder"),
])
def test_predict_refuses_damaged_model_folder(export, tmp_path, out, capfd, case, needle):
    model = copy_export(export, tmp_path)
    config, info = model / "config.json", model / "bertfit.json"
    if case == "config_not_json":
        config.write_text(config.read_text()[:-10])  # cut short, as by a full disk
    elif case == "config_not_object":
        config.write_text("[]")
    elif case == "config_id2label_wrong_type":
        _set(config, lambda c: c.update(id2label=5))
    elif case == "info_not_json":
        info.write_text("{'labels': ['class0']}")
    elif case == "info_missing_labels":
        _set(info, lambda i: i.pop("labels"))
    elif case == "info_missing_chunking":
        _set(info, lambda i: i.pop("chunking"))
    elif case == "info_labels_wrong_type":
        _set(info, lambda i: i.update(labels="class0,class1"))
    elif case == "info_max_length_wrong_type":
        _set(info, lambda i: i["chunking"].update(max_length="18"))
    elif case == "info_pooling_unknown":
        _set(info, lambda i: i.update(pooling="avg"))
    elif case == "info_label_count":
        _set(info, lambda i: i.update(labels=["class0", "class1", "class2"]))
    else:
        shutil.rmtree(model)
    rc, _, err = run(predict_main, ["--model", model, "--input", export["csv"], "--output", out / "pred.csv"],
                     capfd)
    assert_one_error(rc, err, f"--model {model}", needle)
    assert list(out.iterdir()) == []


def test_evaluate_refuses_damaged_bertfit_json(export, tmp_path, capfd):
    model = copy_export(export, tmp_path)
    _set(model / "bertfit.json", lambda i: i.update(chunking=[18, 16, 12]))
    rc, _, err = run(evaluate_main, ["--model", model, "--data", export["data"], "--output-dir",
                                     tmp_path / "eval"], capfd)
    assert_one_error(rc, err, f"--model {model}", "bertfit.json: 'chunking' must be an object, got a list")
    assert not (tmp_path / "eval").exists()


# --------------------------------------------------------------------------------- 5. bytes on stdin
def _predict_stdin(tmp_path, stdin: bytes, *extra):
    return subprocess.run([sys.executable, "-m", "train.predict", *map(str, extra)], cwd=ROOT,
                          env=train_env(tmp_path), input=stdin, capture_output=True, timeout=300)


def test_stdin_not_utf8_names_line_and_byte_offset(export, tmp_path, out):
    stdin = "good great happy\nbad awful caf\u00e9\n".encode("latin-1")  # é is one byte 0xe9 in Latin-1
    r = _predict_stdin(tmp_path, stdin, "--model", export["best"], "--output", out / "pred.csv")
    assert_one_error(r.returncode, r.stderr.decode(), "stdin: line 2: not valid utf-8 at byte offset 30 (0xe9)",
                     "--encoding")
    assert list(out.iterdir()) == []
    # the fallback named by --encoding is honoured
    r = _predict_stdin(tmp_path, stdin, "--model", export["best"], "--output", out / "pred.csv",
                       "--encoding", "utf-8,latin-1")
    assert r.returncode == 0, r.stderr.decode()
    assert [row["id"] for row in csv.DictReader(open(out / "pred.csv", newline=""))] == ["1", "2"]


# ------------------------------------------------------------------------ 6. a row without the text
def test_jsonl_row_without_text_key(export, tmp_path, out, capfd):
    # the bad row comes after the first block was written to the temporary file: that file must go too
    path = tmp_path / "docs.jsonl"
    records = [{"id": "a", "text": "good great"}, {"id": "b", "text": "bad awful"}, {"id": "c", "body": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rc, _, err = run(predict_main, ["--model", export["best"], "--input", path, "--output", out / "pred.jsonl",
                                    "--docs-per-block", 1], capfd)
    assert_one_error(rc, err, f"{path}: line 3: no key 'text' (--text-column)")
    assert list(out.iterdir()) == []


def test_csv_row_without_text_column(export, tmp_path, out, capfd):
    path = tmp_path / "docs.csv"
    path.write_text("id,label,text\na,class0,good great\nb,class1,bad awful\nc,class0\n")
    rc, _, err = run(predict_main, ["--model", export["best"], "--input", path, "--output", out / "pred.csv",
                                    "--docs-per-block", 1], capfd)
    assert_one_error(rc, err, f"{path}: row 3", "expected 3 fields, found 2")
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------- 7. the export's tokenizer
def _swap_tokenizer(model, tiny):
    """Replace the export's tokenizer by one with the same vocabulary that does not lowercase: same files,
    other ids for any capitalised word."""
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab_file=str(tiny / "vocab.txt"), do_lower_case=False).save_pretrained(model)


def test_predict_refuses_swapped_tokenizer(export, tmp_path, out, capfd):
    model = copy_export(export, tmp_path)
    _swap_tokenizer(model, export["tiny"])
    rc, _, err = run(predict_main, ["--model", model, "--input", export["csv"], "--output", out / "pred.csv"],
                     capfd)
    assert_one_error(rc, err, f"--model {model}: its tokenizer is not the one the model was trained with",
                     "bertfit.json records sha256:")
    assert list(out.iterdir()) == []


def test_evaluate_refuses_swapped_tokenizer(export, tmp_path, capfd):
    model = copy_export(export, tmp_path)
    _swap_tokenizer(model, export["tiny"])
    rc, _, err = run(evaluate_main, ["--model", model, "--data", export["data"], "--output-dir",
                                     tmp_path / "eval"], capfd)
    assert_one_error(rc, err, f"--model {model}: its tokenizer is not the one the model was trained with")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("recorded", [True, False])
def test_matching_or_unrecorded_fingerprint_is_accepted(export, tmp_path, out, capfd, recorded):
    model = copy_export(export, tmp_path)
    if not recorded:  # an export written before fingerprints were recorded
        _set(model / "bertfit.json", lambda i: i.pop("tokenizer_fingerprint"))
    rc, _, err = run(predict_main, ["--model", model, "--input", export["csv"], "--output", out / "pred.csv"],
                     capfd)
    assert rc == 0, err
    assert len(list(csv.DictReader(open(out / "pred.csv", newline="")))) == len(export["rows"])


# ------------------------------------------------------------------------------- 8. evaluate's data
def test_evaluate_refuses_data_of_another_tokenizer(export, tmp_path, capfd):
    data = tmp_path / "shards"
    shutil.copytree(export["data"], data)
    _set(data / "manifest.json", lambda m: m["tokenizer"].update(fingerprint="sha256:" + "0" * 64))
    rc, _, err = run(evaluate_main, ["--model", export["best"], "--data", data, "--output-dir",
                                     tmp_path / "eval"], capfd)
    assert_one_error(rc, err, f"--data {data} was prepared with another tokenizer", "sha256:000000000000")
    assert not (tmp_path / "eval").exists()


def test_evaluate_missing_split_lists_the_splits(export, tmp_path, capfd):
    rc, _, err = run(evaluate_main, ["--model", export["best"], "--data", export["data"], "--split", "dev",
                                     "--output-dir", tmp_path / "eval"], capfd)
    assert_one_error(rc, err, f"--split dev: no such split in --data {export['data']}; available splits: train, test")
    assert not (tmp_path / "eval").exists()


def test_evaluate_output_dir_is_a_file(export, tmp_path, capfd):
    target = tmp_path / "eval"
    target.write_text("not a folder")
    rc, _, err = run(evaluate_main, ["--model", export["best"], "--data", export["data"], "--output-dir", target],
                     capfd)
    assert_one_error(rc, err, f"--output-dir {target}: is a file")
    assert target.read_text() == "not a folder"


def test_evaluate_write_failure_leaves_no_partial_reports(export, tmp_path, capfd):
    # predictions.csv cannot be written (a folder holds its name): metrics.json and the others must not appear
    # either, and no temporary file stays
    report_dir = tmp_path / "eval"
    (report_dir / "predictions.csv").mkdir(parents=True)
    rc, _, err = run(evaluate_main, ["--model", export["best"], "--data", export["data"], "--output-dir",
                                     report_dir], capfd)
    assert_one_error(rc, err, f"--output-dir {report_dir}", "predictions.csv")
    assert sorted(p.name for p in report_dir.iterdir()) == ["predictions.csv"]


def test_evaluate_writes_all_reports(export, tmp_path, capfd):
    report_dir = tmp_path / "eval"
    rc, stdout, err = run(evaluate_main, ["--model", export["best"], "--data", export["data"], "--output-dir",
                                          report_dir, "--batch-size", 3], capfd)
    assert rc == 0, err
    assert "doc_accuracy=" in stdout
    assert sorted(p.name for p in report_dir.iterdir()) == ["classification_report.txt", "confusion_matrix.png",
                                                            "metrics.json", "predictions.csv"]
    assert (report_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report_dir / "metrics.json").read_text())["split"] == "test"
