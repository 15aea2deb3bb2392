"""data_prep --task (issue 17): multi-label and regression data, ClassLabel -1, the errors that keep `auto` from
guessing, and --max-length auto."""

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.cli import main as prep_main
from tests.test_data_prep import assert_no_output, assert_one_line_error, write_csv

TOPICS = ["sport", "politics", "tech"]


def run_prep(capsys, *argv):
    capsys.readouterr()  # drop what the test's own setup printed (e.g. `datasets` save progress bars)
    rc = prep_main([str(a) for a in argv] + ["--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def prep_ok(capsys, tmp_path, tiny_model, data, *extra, name="out"):
    out = tmp_path / name
    rc, _, err = run_prep(capsys, "--input", data, "--output", out, "--tokenizer", tiny_model, "--max-length", 24,
                          *extra)
    assert rc == 0, err
    return out, json.loads((out / "manifest.json").read_text())


def prep_bad(capsys, tmp_path, tiny_model, data, *extra):
    out = tmp_path / "bad-out"
    rc, _, err = run_prep(capsys, "--input", data, "--output", out, "--tokenizer", tiny_model, *extra)
    assert "Traceback" not in err
    assert rc == 2, err
    assert_no_output(out)
    return rc, err


def windows_by_id(out: Path) -> dict:
    """id -> list of its windows' labels, over every split."""
    got = {}
    for split in json.loads((out / "manifest.json").read_text())["splits"]:
        ds = datasets.load_from_disk(str(out / split))
        for rid, label in zip(ds["id"], ds["label"]):
            got.setdefault(rid, []).append(label)
    return got


def multi_rows(n=40):
    """(id, text, label set): some documents long enough for several windows, every 7th with no label."""
    rows = []
    for i in range(n):
        labels = [] if i % 7 == 3 else sorted({TOPICS[i % 3], TOPICS[(i // 3) % 3]})
        rows.append((f"d{i}", " ".join(["good match text"] * (1 + i % 12)), labels))
    return rows


def check_multi_label(out: Path, m: dict, rows, names=TOPICS):
    assert m["problem_type"] == "multi_label"
    assert m["labels"] == sorted(names)
    expected = {rid: [int(n in labels) for n in m["labels"]] for rid, _, labels in rows}
    got = windows_by_id(out)
    assert set(got) == set(expected)
    assert any(len(w) > 1 for w in got.values())  # long documents: every window carries the document's set
    for rid, windows in got.items():
        assert all(w == expected[rid] for w in windows), rid
    feature = datasets.load_from_disk(str(out / "train")).features["label"]
    assert feature.feature.dtype == "int8"
    assert sum(s["unlabeled_documents"] for s in m["splits"].values()) == sum(1 for r in rows if not r[2])
    for name in m["labels"]:
        assert sum(s["label_counts"][name] for s in m["splits"].values()) == sum(1 for r in rows if name in r[2])


# ------------------------------------------------------------------------------------------------ multi_label
def test_multi_label_from_jsonl_lists(tmp_path, tiny_model, capsys):
    rows = multi_rows()
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t, "label": ls}) + "\n" for i, t, ls in rows))
    out, m = prep_ok(capsys, tmp_path, tiny_model, path, "--task", "multi_label", "--id-column", "id")
    check_multi_label(out, m, rows)
    assert sum(s["documents"] for s in m["splits"].values()) == len(rows)  # unlabeled documents are kept


def test_multi_label_from_parquet_lists(tmp_path, tiny_model, capsys):
    rows = multi_rows()
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows],
                             "label": pa.array([r[2] for r in rows], pa.list_(pa.string()))}), path)
    out, m = prep_ok(capsys, tmp_path, tiny_model, path, "--task", "multi_label", "--id-column", "id")
    check_multi_label(out, m, rows)


def test_multi_label_from_csv_with_separator(tmp_path, tiny_model, capsys):
    rows = multi_rows()
    # "a; b" with a space and a trailing separator: the names are stripped, empty pieces ignored
    path = write_csv(tmp_path / "m.csv", ["id", "text", "tags"],
                     [(i, t, "; ".join(ls) + (";" if k % 5 == 0 and ls else "")) for k, (i, t, ls) in enumerate(rows)])
    out, m = prep_ok(capsys, tmp_path, tiny_model, path, "--task", "multi_label", "--label-separator", ";",
                     "--label-column", "tags", "--id-column", "id")
    check_multi_label(out, m, rows)


def test_multi_label_from_saved_sequence_of_class_labels(tmp_path, tiny_model, capsys):
    rows = multi_rows()
    names = ["tech", "sport", "politics"]  # ClassLabel order differs from the sorted names the manifest uses
    ds = datasets.Dataset.from_dict(
        {"id": [r[0] for r in rows], "text": [r[1] for r in rows], "label": [[names.index(n) for n in r[2]]
                                                                           for r in rows]},
        features=datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                                    "label": datasets.Sequence(datasets.ClassLabel(names=names))}))
    ds.save_to_disk(str(tmp_path / "saved"))
    out, m = prep_ok(capsys, tmp_path, tiny_model, tmp_path / "saved", "--task", "multi_label", "--id-column", "id")
    check_multi_label(out, m, rows)


def test_multi_label_numeric_names_sort_numerically(tmp_path, tiny_model, capsys):
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps({"text": f"good text {i}", "label": [i % 11, (i + 1) % 11]}) + "\n"
                            for i in range(44)))
    _, m = prep_ok(capsys, tmp_path, tiny_model, path, "--task", "multi_label")
    assert m["labels"] == [str(i) for i in range(11)]


def test_multi_label_labels_option_restricts_orders_and_counts(tmp_path, tiny_model, capsys):
    rows = multi_rows()
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t, "label": ls}) + "\n" for i, t, ls in rows))
    out, m = prep_ok(capsys, tmp_path, tiny_model, path, "--task", "multi_label", "--id-column", "id",
                     "--labels", "tech,sport")
    assert m["labels"] == ["tech", "sport"]  # the given order, not sorted
    # "politics" is removed from each set (and counted); documents are kept, some now with no label
    assert m["labels_not_in_labels"] == {"politics": sum(1 for r in rows if "politics" in r[2])}
    assert sum(s["documents"] for s in m["splits"].values()) == len(rows)
    got = windows_by_id(out)
    for rid, _, labels in rows:
        assert got[rid][0] == [int("tech" in labels), int("sport" in labels)]
    assert sum(s["unlabeled_documents"] for s in m["splits"].values()) == sum(
        1 for r in rows if not {"tech", "sport"} & set(r[2]))
    # --on-unknown-label error applies to each label of a set
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path, "--task", "multi_label", "--labels", "tech,sport",
                       "--on-unknown-label", "error")
    first = next(k for k, r in enumerate(rows, 1) if "politics" in r[2])
    assert_one_line_error(rc, err, "m.jsonl", f"line {first}", "'politics'", "--labels")


# ------------------------------------------------------------------------------------------------- regression
def test_regression_targets_and_manifest_stats(tmp_path, tiny_model, capsys):
    targets = [round(0.25 * i - 3.0, 2) for i in range(50)]
    rows = [(f"r{i}", " ".join(["good text"] * (1 + i % 15)), y) for i, y in enumerate(targets)]
    path = tmp_path / "r.jsonl"
    # ints and floats mixed, as real score columns are
    path.write_text("".join(json.dumps({"id": i, "text": t, "score": int(y) if y == int(y) else y}) + "\n"
                            for i, t, y in rows))
    out, m = prep_ok(capsys, tmp_path, tiny_model, path, "--task", "regression", "--label-column", "score",
                     "--id-column", "id")
    assert m["problem_type"] == "regression" and m["labels"] == []
    arr = np.asarray(targets)
    assert m["target"] == pytest.approx({"min": arr.min(), "max": arr.max(), "mean": arr.mean(), "std": arr.std()})
    by_id = dict((r[0], r[2]) for r in rows)
    got = windows_by_id(out)
    assert any(len(w) > 1 for w in got.values())
    for name, split in m["splits"].items():
        ds = datasets.load_from_disk(str(out / name))
        assert ds.features["label"].dtype == "float32"
        ys = np.asarray([by_id[i] for i in dict.fromkeys(ds["id"])])
        assert split["target"] == pytest.approx({"min": ys.min(), "max": ys.max(), "mean": ys.mean(),
                                                 "std": ys.std()})
        assert "label_counts" not in split
    for rid, windows in got.items():
        assert windows == [pytest.approx(by_id[rid])] * len(windows)  # never standardised on disk


def test_regression_numeric_strings_in_csv(tmp_path, tiny_model, capsys):
    path = write_csv(tmp_path / "r.csv", ["text", "label"], [(f"good text {i}", f" {i / 4:g} ") for i in range(20)])
    _, m = prep_ok(capsys, tmp_path, tiny_model, path, "--task", "regression")
    assert m["target"]["min"] == 0.0 and m["target"]["max"] == 4.75


@pytest.mark.parametrize("bad,shown", [("abc", "'abc'"), ("nan", "'nan'"), ("inf", "'inf'"), ("", "missing")])
def test_regression_bad_target_names_file_and_row(tmp_path, tiny_model, capsys, bad, shown):
    path = write_csv(tmp_path / "r.csv", ["text", "label"], [("good", "1.5"), ("bad", bad), ("ok", "2")])
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path, "--task", "regression")
    assert_one_line_error(rc, err, "r.csv", "row 2", shown)


def test_regression_bad_target_in_jsonl(tmp_path, tiny_model, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": true}\n')
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path, "--task", "regression")
    assert_one_line_error(rc, err, "r.jsonl", "line 2", "True", "not a number")


# -------------------------------------------------------------------------------- auto never guesses silently
def test_list_label_without_task_names_task(tmp_path, tiny_model, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": ["pos", "sport"]}\n{"text": "b", "label": ["neg"]}\n')
    for task in ([], ["--task", "single_label"]):
        rc, err = prep_bad(capsys, tmp_path, tiny_model, path, *task)
        assert_one_line_error(rc, err, "data.jsonl: line 1", 'label ["pos", "sport"] is a list', "--task multi_label")


def test_list_label_from_parquet_and_saved_sequence_without_task(tmp_path, tiny_model, capsys):
    pq.write_table(pa.table({"text": ["a", "b"], "label": [["x"], ["y", "x"]]}), tmp_path / "l.parquet")
    rc, err = prep_bad(capsys, tmp_path, tiny_model, tmp_path / "l.parquet")
    assert_one_line_error(rc, err, "l.parquet: row 1", "is a list", "--task multi_label")
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [[0], [1, 0]]}, features=datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.Sequence(datasets.ClassLabel(names=["x", "y"]))})
    ).save_to_disk(str(tmp_path / "saved"))
    rc, err = prep_bad(capsys, tmp_path, tiny_model, tmp_path / "saved")
    assert_one_line_error(rc, err, "saved", "row 1", '["x"] is a list', "--task multi_label")


def test_float_label_without_task_names_task(tmp_path, tiny_model, capsys):
    path = tmp_path / "f.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": 0.37}\n')
    for task in ([], ["--task", "single_label"]):
        rc, err = prep_bad(capsys, tmp_path, tiny_model, path, *task)
        assert_one_line_error(rc, err, "f.jsonl: line 3", "0.37", "--task regression")
    # a CSV cell is text: under auto "0.37" is refused, --task single_label takes it as a class name
    csv_path = write_csv(tmp_path / "f.csv", ["text", "label"], [("a", "0.5"), ("b", "1.5"), ("c", "0.5")])
    rc, err = prep_bad(capsys, tmp_path, tiny_model, csv_path)
    assert_one_line_error(rc, err, "f.csv: row 1", "'0.5'", "--task regression", "--task single_label")
    _, m = prep_ok(capsys, tmp_path, tiny_model, csv_path, "--task", "single_label", "--split-ratios",
                   "train=0.7,test=0.3")
    assert m["labels"] == ["0.5", "1.5"] and m["problem_type"] == "single_label"


def test_whole_number_labels_stay_single_label(tmp_path, tiny_model, capsys):
    path = tmp_path / "i.parquet"
    pq.write_table(pa.table({"text": [f"t {i}" for i in range(20)], "label": [float(i % 2) for i in range(20)]}),
                   path)
    _, m = prep_ok(capsys, tmp_path, tiny_model, path)
    assert m["problem_type"] == "single_label" and m["labels"] == ["0", "1"]


@pytest.mark.parametrize("task", ["auto", "single_label", "multi_label", "regression"])
@pytest.mark.parametrize("kind", ["dict", "bytes"])
def test_dict_and_bytes_labels_are_errors_in_every_task(tmp_path, tiny_model, capsys, task, kind):
    if kind == "dict":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a", "label": "1"}\n{"text": "b", "label": {"name": "y"}}\n')
        where, shown = "d.jsonl: line 2", '{"name": "y"} is a dict'
    else:
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": ["a", "b"], "label": pa.array([b"x", b"y"], pa.binary())}), path)
        where, shown = "d.parquet: row 1", "is bytes"
    extra = ["--label-separator", ";"] if task == "multi_label" else []
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path, "--task", task, *extra)
    assert_one_line_error(rc, err, where, shown, "--label-column")


def test_multi_label_bad_values(tmp_path, tiny_model, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "a", "label": ["x"]}\n{"text": "b", "label": "x;y"}\n')
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path, "--task", "multi_label")
    assert_one_line_error(rc, err, "m.jsonl: line 2", "'x;y' is text", "--label-separator")
    path.write_text('{"text": "a", "label": ["x"]}\n{"text": "b", "label": null}\n')
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path, "--task", "multi_label")
    assert_one_line_error(rc, err, "m.jsonl: line 2", "missing label", "empty list")
    path.write_text('{"text": "a", "label": ["x"]}\n{"text": "b", "label": ["y", 0.5]}\n')
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path, "--task", "multi_label")
    assert_one_line_error(rc, err, "m.jsonl: line 2", "0.5")
    path.write_text('{"text": "a", "label": []}\n{"text": "b", "label": []}\n')
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path, "--task", "multi_label")
    assert_one_line_error(rc, err, "no document has a label")


def test_task_option_conflicts(tmp_path, tiny_model, capsys):
    path = write_csv(tmp_path / "c.csv", ["text", "label"], [("a", "1"), ("b", "2")])
    for extra, needle in ((["--label-separator", ";"], "--task multi_label"),
                          (["--task", "regression", "--labels", "1,2"], "--labels"),
                          (["--max-length-percentile", "90"], "--max-length auto"),
                          (["--task", "ordinal"], "--task")):
        rc, err = prep_bad(capsys, tmp_path, tiny_model, path, *extra)
        assert_one_line_error(rc, err, needle)


# ----------------------------------------------------------------------------------- ClassLabel -1, one class
def test_class_label_minus_one_is_dropped_and_counted(tmp_path, tiny_model, capsys):
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"good {i}" for i in range(12)], "label": [0, 1] * 6}),
        "test": datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [-1, 0, 1, -1]}),
    }).cast_column("label", datasets.ClassLabel(names=["neg", "pos"]))
    dd.save_to_disk(str(tmp_path / "dd"))
    out, m = prep_ok(capsys, tmp_path, tiny_model, tmp_path / "dd")
    assert m["labels"] == ["neg", "pos"]  # never a class named "-1"
    assert m["dropped"] == {"unlabeled": 2} and m["splits"]["test"]["dropped"] == {"unlabeled": 2}
    assert m["splits"]["test"]["documents"] == 2
    assert sorted(datasets.load_from_disk(str(out / "test"))["label"]) == [0, 1]


def test_class_label_minus_one_with_only_one_class_left_is_an_error(tmp_path, tiny_model, capsys):
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [-1, 1, -1]}).cast_column(
        "label", datasets.ClassLabel(names=["neg", "pos"])).save_to_disk(str(tmp_path / "s"))
    rc, err = prep_bad(capsys, tmp_path, tiny_model, tmp_path / "s")
    assert_one_line_error(rc, err, "only one class ('pos')", "after dropping 2 rows", "--task regression")


def test_single_label_with_one_class_is_an_error(tmp_path, tiny_model, capsys):
    path = write_csv(tmp_path / "one.csv", ["text", "label"], [(f"text {i}", "spam") for i in range(10)])
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path)
    assert_one_line_error(rc, err, "only one class ('spam')", "at least two")
    # ... also when --labels drops every other class
    path = write_csv(tmp_path / "two.csv", ["text", "label"], [(f"text {i}", "ab"[i % 2]) for i in range(10)])
    rc, err = prep_bad(capsys, tmp_path, tiny_model, path, "--labels", "a")
    assert_one_line_error(rc, err, "only one class ('a')", "after dropping 5 rows")


# ----------------------------------------------------------------------------------------- --max-length auto
def test_max_length_auto_records_choice_and_shards_respect_it(tmp_path, tiny_model, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    rows = [(f"d{i}", " ".join(["good match text"] * (1 + i % 20)), "ab"[i % 2]) for i in range(60)]
    path = write_csv(tmp_path / "d.csv", ["id", "text", "label"], rows)
    counts = [len(tok(t)["input_ids"]) for _, t, _ in rows]  # special tokens included
    for percentile in (50, 95):
        out = tmp_path / f"auto{percentile}"
        rc, _, err = run_prep(capsys, "--input", path, "--output", out, "--tokenizer", tiny_model,
                              "--max-length", "auto", "--max-length-percentile", percentile, "--id-column", "id")
        assert rc == 0, err
        m = json.loads((out / "manifest.json").read_text())
        at = int(np.ceil(np.percentile(counts, percentile)))
        chosen = min(512, max(16, -(-at // 8) * 8))
        assert m["max_length_auto"] == {"percentile": percentile, "tokens_at_percentile": at, "chosen": chosen,
                                        "model_positions": 512}
        assert chosen % 8 == 0 and m["chunking"]["max_length"] == chosen
        assert m["chunking"]["chunk_size"] == chosen - 2
        lengths = [n for s in m["splits"] for n in datasets.load_from_disk(str(out / s))["length"]]
        assert max(lengths) == chosen  # the longest documents fill whole windows of exactly that length
        windows = sum(s["windows"] for s in m["splits"].values())
        assert (windows > len(rows)) == (percentile < 100)
    # without auto there is no record of a choice
    _, m = prep_ok(capsys, tmp_path, tiny_model, path, name="fixed")
    assert "max_length_auto" not in m


def test_max_length_auto_floor_and_cap(tmp_path, tiny_model, capsys):
    path = write_csv(tmp_path / "s.csv", ["text", "label"], [("good", "a"), ("bad", "b")] * 5)
    out = tmp_path / "short"
    rc, _, err = run_prep(capsys, "--input", path, "--output", out, "--tokenizer", tiny_model, "--max-length", "auto",
                          "--split-ratios", "train=0.5,test=0.5")
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["max_length_auto"]["tokens_at_percentile"] == 3 and m["max_length_auto"]["chosen"] == 16
    from data_prep.prepare import model_positions

    class Tok:
        model_max_length = 10**30  # "unset"

    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 514,
                                                     "pad_token_id": 1}))
    assert model_positions(Tok(), str(roberta)) == 512
    Tok.model_max_length = 128
    assert model_positions(Tok(), str(roberta)) == 128
    (roberta / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 64}))
    assert model_positions(Tok(), str(roberta)) == 64


def test_multi_label_and_regression_same_output_with_worker_processes(tmp_path, tiny_model, capsys):
    rows = multi_rows(30)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t, "label": ls, "score": k / 3}) + "\n"
                            for k, (i, t, ls) in enumerate(rows)))
    for task in (["--task", "multi_label"], ["--task", "regression", "--label-column", "score"]):
        hashes = []
        for num_proc in (1, 2):
            _, m = prep_ok(capsys, tmp_path, tiny_model, path, *task, "--num-proc", num_proc, "--batch-size", 7,
                           name=f"out-{task[1]}-{num_proc}")
            hashes.append({k: v["content_hash"] for k, v in m["splits"].items()})
        assert hashes[0] == hashes[1]


def test_max_length_auto_counts_both_texts_of_a_pair(tmp_path, tiny_model, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    rows = [("good " * (2 + i % 9), "bad match " * (1 + i % 13), i / 7) for i in range(40)]
    path = write_csv(tmp_path / "p.csv", ["a", "b", "label"], rows)
    out = tmp_path / "pairs"
    rc, _, err = run_prep(capsys, "--input", path, "--output", out, "--tokenizer", tiny_model, "--text-column", "a",
                          "--text-pair-column", "b", "--task", "regression", "--max-length", "auto",
                          "--max-length-percentile", 100)
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    longest = max(len(tok(a, b)["input_ids"]) for a, b, _ in rows)
    assert m["max_length_auto"]["tokens_at_percentile"] == longest
    assert m["chunking"]["max_length"] == -(-longest // 8) * 8
    assert all(s["truncated"] == 0 for s in m["splits"].values())  # the 100th percentile fits every pair
