"""data_prep: formats, windows, splits, determinism, atomic output, and the bad-input catalogue."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from data_prep.chunking import chunk_windows
from data_prep.cli import main as prep_main

ROOT = Path(__file__).resolve().parents[1]


def run_prep(capsys, *argv):
    rc = prep_main([str(a) for a in argv] + ["--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def assert_no_output(out_dir: Path):
    assert not out_dir.exists(), "a failed run left its output folder"
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
    assert not leftovers, f"a failed run left temporary folders: {leftovers}"


def write_csv(path: Path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def load_split(out: Path, split: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(out / split))


def tokenize_content(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("n", [0, 1, 5, 10, 11, 29, 30, 31, 100, 257])
@pytest.mark.parametrize("chunk,stride", [(10, 10), (10, 7), (10, 1), (30, 20)])
def test_chunk_windows_cover_every_token_once_reassembled(n, chunk, stride):
    spans, tail, cap = chunk_windows(n, chunk, stride)
    assert tail == 0 and cap == 0
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s1 - s0 == stride and e0 - s0 == chunk  # full windows, fixed stride
        assert e0 < n  # no window after the one that reached the end
    assert all(0 < e - s <= chunk for s, e in spans) or n == 0


def test_chunk_windows_min_tail_and_cap():
    spans, tail, cap = chunk_windows(23, 10, 10, min_chunk_tokens=4)
    assert spans == [(0, 10), (10, 20)] and tail == 1 and cap == 0
    spans, tail, _ = chunk_windows(3, 10, 10, min_chunk_tokens=5)
    assert spans == [(0, 3)] and tail == 0  # never drop the only window
    spans, tail, cap = chunk_windows(100, 10, 10, max_chunks=3)
    assert spans == [(0, 10), (10, 20), (20, 30)] and cap == 7


# ------------------------------------------------------------------------------------------ basic output
def test_csv_output_layout_and_manifest(tmp_path, tiny_model, tiny_csv, capsys):
    out = tmp_path / "out"
    rc, _, err = run_prep(capsys, "--input", tiny_csv, "--output", out, "--tokenizer", tiny_model,
                          "--max-length", 24, "--chunk-size", 16, "--stride", 12, "--id-column", "id")
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    for key in ("format_version", "labels", "tokenizer", "chunking", "sources", "splits"):
        assert key in m
    assert m["labels"] == ["class0", "class1"]
    assert m["chunking"] == {"max_length": 24, "chunk_size": 16, "stride": 12, "min_chunk_tokens": 1,
                             "max_text_tokens": None, "max_chunks_per_doc": None}
    assert m["tokenizer"]["fingerprint"].startswith("sha256:")
    assert m["sources"][0]["sha256"] and m["sources"][0]["rows"] == 200
    assert list(m["splits"]) == ["train", "validation", "test"]
    assert sum(s["documents"] for s in m["splits"].values()) == 200
    # stratified 80/10/10 of 100 per class
    for split, n in (("train", 160), ("validation", 20), ("test", 20)):
        s = m["splits"][split]
        assert s["documents"] == n and s["label_counts"] == {"class0": n // 2, "class1": n // 2}
        for key in ("windows", "tokens", "truncated", "dropped", "content_hash"):
            assert key in s
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = {r[0]: r for r in csv.reader(open(tiny_csv))}
    ds = load_split(out, "train")
    assert ds.num_rows == m["splits"]["train"]["windows"]
    assert sum(ds["length"]) == m["splits"]["train"]["tokens"]
    for r in ds.select(range(40)):
        assert r["length"] == len(r["input_ids"])  # no padding stored
        assert r["input_ids"][0] == tok.cls_token_id and r["input_ids"][-1] == tok.sep_token_id
        assert len(r["input_ids"]) <= 24
        assert r["label"] == m["labels"].index(rows[r["id"]][2])
        content = tokenize_content(tok, rows[r["id"]][1])
        assert r["input_ids"][1:-1] == content[r["token_start"]:r["token_start"] + 16]
    # every document's windows are numbered 0..num_chunks-1
    by_doc = {}
    for d, k, n in zip(ds["doc_id"], ds["chunk_index"], ds["num_chunks"]):
        by_doc.setdefault(d, []).append((k, n))
    assert sorted(by_doc) == list(range(m["splits"]["train"]["documents"]))
    for windows in by_doc.values():
        assert [k for k, _ in windows] == list(range(windows[0][1]))


def reassemble(windows, overlap, prefix_len, suffix_len):
    tokens = []
    for k, ids in enumerate(windows):
        content = ids[prefix_len:len(ids) - suffix_len]
        tokens.extend(content if k == 0 else content[overlap:])
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("chunk,stride", [(510, 510), (256, 192)])
def test_bbc_windows_reassemble_every_document(tmp_path, minilm_dir, bbc_dir, chunk, stride, capsys):
    """Acceptance: windows without special tokens and overlaps give back each BBC document's full tokens."""
    out = tmp_path / "bbc"
    rc, _, err = run_prep(capsys, "--input", bbc_dir, "--output", out, "--tokenizer", minilm_dir,
                          "--chunk-size", chunk, "--stride", stride, "--encoding", "utf-8,latin-1",
                          "--num-proc", 2)
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert sum(s["documents"] for s in m["splits"].values()) == 2225
    assert m["sources"][0]["files_in_other_encodings"] == {"sports/199.txt": "latin-1"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    checked = long_docs = 0
    for split in m["splits"]:
        ds = load_split(out, split).sort(["doc_id", "chunk_index"])
        docs = {}
        for ids, doc, rid in zip(ds["input_ids"], ds["doc_id"], ds["id"]):
            docs.setdefault(doc, (rid, []))[1].append(ids)
        texts, keys = [], []
        for doc, (rid, windows) in docs.items():
            enc = m["sources"][0].get("files_in_other_encodings", {}).get(rid, "utf-8")
            texts.append((bbc_dir / rid).read_text(encoding=enc))
            keys.append(doc)
        expected = tok(texts, add_special_tokens=False)["input_ids"]
        for doc, full in zip(keys, expected):
            windows = docs[doc][1]
            assert reassemble(windows, chunk - stride, 1, 1) == full, f"{split} doc {doc} ({docs[doc][0]})"
            assert len(windows) == max(1, -(-max(len(full) - chunk, 0) // stride) + 1)
            long_docs += len(windows) > 1
            checked += 1
    assert checked == 2225 and long_docs > 500  # a third of BBC is longer than 512 tokens


# ----------------------------------------------------------------------------------------- determinism
def test_same_inputs_same_hashes_and_num_proc_2_equals_1(tmp_path, tiny_model, tiny_csv, capsys):
    outs = []
    for name, procs in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        rc, _, err = run_prep(capsys, "--input", tiny_csv, "--output", out, "--tokenizer", tiny_model,
                              "--max-length", 20, "--chunk-size", 12, "--stride", 8, "--num-proc", procs,
                              "--batch-size", 17)
        assert rc == 0, err
        outs.append(out)
    hashes = [{k: v["content_hash"] for k, v in json.loads((o / "manifest.json").read_text())["splits"].items()}
              for o in outs]
    assert hashes[0] == hashes[1] == hashes[2]
    for split in hashes[0]:
        a, c = load_split(outs[0], split), load_split(outs[2], split)
        assert a.to_dict() == c.to_dict()


def test_content_hash_changes_with_content(tmp_path, tiny_model, tiny_csv, capsys):
    hashes = []
    for stride in (12, 11):
        out = tmp_path / f"s{stride}"
        rc, _, err = run_prep(capsys, "--input", tiny_csv, "--output", out, "--tokenizer", tiny_model,
                              "--max-length", 20, "--chunk-size", 12, "--stride", stride)
        assert rc == 0, err
        hashes.append(json.loads((out / "manifest.json").read_text())["splits"]["train"]["content_hash"])
    assert hashes[0] != hashes[1]


# --------------------------------------------------------------------------------------------- formats
def _rows(n=30):
    from train.tiny_model import synthetic_texts

    return [(f"d{i}", t, f"class{y}") for i, (t, y) in enumerate(synthetic_texts(n, 2, seed=3))]


def _prep_ok(capsys, inp, out, tiny_model, *extra):
    rc, _, err = run_prep(capsys, "--input", inp, "--output", out, "--tokenizer", tiny_model,
                          "--max-length", 16, "--split-ratios", "train=0.5,test=0.5", *extra)
    assert rc == 0, err
    return json.loads((out / "manifest.json").read_text())


def test_every_input_format_gives_the_same_windows(tmp_path, tiny_model, capsys):
    rows = _rows()
    header = ["id", "text", "label"]
    write_csv(tmp_path / "d.csv", header, rows)
    write_csv(tmp_path / "d.tsv", header, rows, delimiter="\t")
    with open(tmp_path / "d.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(dict(zip(header, r))) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(header)}), tmp_path / "d.parquet")
    labels = sorted({r[2] for r in rows})
    saved = datasets.Dataset.from_dict(
        {"id": [r[0] for r in rows], "text": [r[1] for r in rows], "label": [labels.index(r[2]) for r in rows]},
        features=datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=labels)}))
    saved.save_to_disk(str(tmp_path / "saved"))
    hashes = []
    for name in ("d.csv", "d.tsv", "d.jsonl", "d.parquet", "saved"):
        m = _prep_ok(capsys, tmp_path / name, tmp_path / f"out-{name}", tiny_model, "--id-column", "id")
        hashes.append({k: v["content_hash"] for k, v in m["splits"].items()})
    assert all(h == hashes[0] for h in hashes), hashes


def test_folder_tree_and_saved_datasetdict(tmp_path, tiny_model, capsys):
    for i, (rid, text, label) in enumerate(_rows(12)):
        (tmp_path / "tree" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / label / f"{rid}.txt").write_text(text)
    (tmp_path / "tree" / "README.md").write_text("not a document")
    m = _prep_ok(capsys, tmp_path / "tree", tmp_path / "out-tree", tiny_model)
    assert m["labels"] == ["class0", "class1"] and m["sources"][0]["ignored_files"] == 1
    ids = load_split(tmp_path / "out-tree", "train")["id"]
    assert all(i.startswith("class") and i.endswith(".txt") for i in ids)

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["good great"] * 4 + ["bad awful"] * 4, "label": [1] * 4 + [0] * 4}),
        "test": datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    rc, _, err = run_prep(capsys, "--input", tmp_path / "dd", "--output", tmp_path / "out-dd", "--tokenizer",
                          tiny_model)
    assert rc == 0, err
    m = json.loads((tmp_path / "out-dd" / "manifest.json").read_text())
    assert list(m["splits"]) == ["train", "test"] and m["labels"] == ["0", "1"]
    assert m["splits"]["test"]["documents"] == 2


def test_numeric_labels_sort_numerically(tmp_path, tiny_model, capsys):
    rows = [(f"good text {i}", str(i % 11)) for i in range(44)]
    write_csv(tmp_path / "n.csv", ["text", "label"], rows)
    m = _prep_ok(capsys, tmp_path / "n.csv", tmp_path / "out", tiny_model)
    assert m["labels"] == [str(i) for i in range(11)]


def test_pairs_match_the_tokenizer_and_count_truncation(tmp_path, tiny_model, capsys):
    rows = [("pair%d" % i, "good " * (3 + i % 9), "bad match " * (1 + i % 7), str(i % 2)) for i in range(40)]
    write_csv(tmp_path / "p.csv", ["id", "a", "b", "label"], rows)
    out = tmp_path / "out"
    rc, _, err = run_prep(capsys, "--input", tmp_path / "p.csv", "--output", out, "--tokenizer", tiny_model,
                          "--text-column", "a", "--text-pair-column", "b", "--id-column", "id",
                          "--max-length", 14, "--split-ratios", "train=0.5,test=0.5")
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == "pair"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    by_id = {r[0]: r for r in rows}
    expected_truncated = 0
    for split in m["splits"]:
        ds = load_split(out, split)
        assert "token_type_ids" in ds.column_names and set(ds["num_chunks"]) == {1}
        for r in ds:
            _, a, b, _ = by_id[r["id"]]
            ref = tok(a, b, truncation="longest_first", max_length=14)
            assert r["input_ids"] == ref["input_ids"]
            assert r["token_type_ids"] == ref["token_type_ids"]
            expected_truncated += len(tok(a, b)["input_ids"]) > 14
        assert m["splits"][split]["truncated_by"].get("pair_max_length", 0) == m["splits"][split]["truncated"]
    assert expected_truncated > 0
    assert sum(s["truncated"] for s in m["splits"].values()) == expected_truncated


def test_group_column_never_straddles_splits(tmp_path, tiny_model, capsys):
    rows = [(f"good match {i}", f"doc{i // 5}", str(i % 2)) for i in range(200)]
    write_csv(tmp_path / "g.csv", ["text", "group", "label"], rows)
    out = tmp_path / "out"
    rc, _, err = run_prep(capsys, "--input", tmp_path / "g.csv", "--output", out, "--tokenizer", tiny_model,
                          "--group-column", "group", "--id-column", "text")
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    group_split = {}
    for split in m["splits"]:
        for rid in load_split(out, split)["id"]:
            group = f"doc{int(rid.split()[-1]) // 5}"
            assert group_split.setdefault(group, split) == split
    sizes = {k: v["documents"] for k, v in m["splits"].items()}
    assert sum(sizes.values()) == 200 and 150 <= sizes["train"] <= 170


def test_labels_option_drops_and_counts(tmp_path, tiny_model, capsys):
    rows = [(f"good {i}", ["fresh", "rotten", "plot"][i % 3]) for i in range(60)]
    write_csv(tmp_path / "rt.csv", ["text", "category"], rows)
    out = tmp_path / "out"
    rc, _, err = run_prep(capsys, "--input", tmp_path / "rt.csv", "--output", out, "--tokenizer", tiny_model,
                          "--label-column", "category", "--labels", "fresh,rotten")
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["labels"] == ["fresh", "rotten"]
    assert m["dropped"] == {"label_not_in_labels": 20}
    assert sum(s["documents"] for s in m["splits"].values()) == 40


def test_split_column_and_given_splits(tmp_path, tiny_model, capsys):
    rows = [(f"good {i}", str(i % 2), "train" if i < 30 else "dev") for i in range(40)]
    write_csv(tmp_path / "s.csv", ["text", "label", "split"], rows)
    rc, _, err = run_prep(capsys, "--input", tmp_path / "s.csv", "--output", tmp_path / "o1", "--tokenizer",
                          tiny_model, "--split-column", "split")
    assert rc == 0, err
    m = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert {k: v["documents"] for k, v in m["splits"].items()} == {"train": 30, "dev": 10}
    rc, _, err = run_prep(capsys, "--input", f"train={tmp_path / 's.csv'}", "--input",
                          f"test={tmp_path / 's.csv'}", "--output", tmp_path / "o2", "--tokenizer", tiny_model)
    assert rc == 0, err
    m = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert {k: v["documents"] for k, v in m["splits"].items()} == {"train": 40, "test": 40}


def test_cleaning_and_empty_rows(tmp_path, tiny_model, capsys):
    rows = [("1", "good<br />great   http://x.y/z win", "1"), ("2", "<br />", "0"), ("3", "bad", "0"),
            ("4", "   ", "1"), ("5", "awful sad", "0"), ("6", "fine love", "1")]
    write_csv(tmp_path / "c.csv", ["id", "text", "label"], rows)
    out = tmp_path / "out"
    rc, _, err = run_prep(capsys, "--input", tmp_path / "c.csv", "--output", out, "--tokenizer", tiny_model,
                          "--id-column", "id", "--clean", "html,urls,whitespace", "--on-empty", "drop",
                          "--split-ratios", "train=0.5,test=0.5")
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["dropped"] == {"empty_text": 2} and m["clean"] == ["html", "urls", "whitespace"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for split in m["splits"]:
        for r in load_split(out, split):
            if r["id"] == "1":
                assert tok.decode(r["input_ids"][1:-1]) == "good great win"


def test_num_shards_and_shard_size_cut_between_documents(tmp_path, tiny_model, tiny_csv, capsys):
    for flag, value in (("--num-shards", 3), ("--shard-size", 50)):
        out = tmp_path / flag.strip("-")
        rc, _, err = run_prep(capsys, "--input", tiny_csv, "--output", out, "--tokenizer", tiny_model,
                              "--max-length", 16, flag, value, "--batch-size", 23)
        assert rc == 0, err
        m = json.loads((out / "manifest.json").read_text())
        shards = m["splits"]["train"]["shards"]
        if flag == "--num-shards":
            assert len(shards) == 3
        else:
            assert len(shards) >= m["splits"]["train"]["windows"] // 50
        seen = set()
        for shard in shards:
            docs = set(datasets.Dataset.from_file(str(out / "train" / shard))["doc_id"])
            assert not docs & seen  # a document's windows never straddle shards
            seen |= docs
        assert len(seen) == m["splits"]["train"]["documents"]
        assert load_split(out, "train").num_rows == m["splits"]["train"]["windows"]


def test_failure_mid_write_leaves_nothing_and_keeps_old_output(tmp_path, tiny_model, tiny_csv, capsys,
                                                               monkeypatch):
    out = tmp_path / "out"
    rc, _, err = run_prep(capsys, "--input", tiny_csv, "--output", out, "--tokenizer", tiny_model)
    assert rc == 0, err
    before = (out / "manifest.json").read_text()
    import data_prep.prepare as prepare

    calls = {"n": 0}
    real = prepare.encode_job

    def failing(job):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(job)

    monkeypatch.setattr(prepare, "encode_job", failing)
    rc, _, err = run_prep(capsys, "--input", tiny_csv, "--output", out, "--tokenizer", tiny_model,
                          "--overwrite", "--batch-size", 10)
    assert rc != 0 and "disk full" in err
    assert (out / "manifest.json").read_text() == before  # the old output is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# --------------------------------------------------------------------------------- bad-input catalogue
@pytest.fixture
def good(tmp_path):
    return write_csv(tmp_path / "good.csv", ["id", "text", "label"],
                     [(f"r{i}", f"good match {i}", str(i % 2)) for i in range(20)])


def _bad(tmp_path, capsys, tiny_model, *argv, tokenizer=None):
    out = tmp_path / "out"
    args = list(argv) + ["--output", out]
    if "--tokenizer" not in argv:
        args += ["--tokenizer", tokenizer or tiny_model]
    rc, _, err = run_prep(capsys, *args)
    return rc, err, out


def test_bad_missing_input(tmp_path, capsys, tiny_model):
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", tmp_path / "nope.csv")
    assert_one_line_error(rc, err, "nope.csv", "no such file")
    assert_no_output(out)


def test_bad_unknown_format(tmp_path, capsys, tiny_model, good):
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", good, "--format", "xml")
    assert_one_line_error(rc, err, "--format", "xml")
    (tmp_path / "data.xyz").write_text("x")
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", tmp_path / "data.xyz")
    assert_one_line_error(rc, err, "data.xyz", "--format")
    assert_no_output(out)


def test_bad_missing_column_lists_available(tmp_path, capsys, tiny_model, good):
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", good, "--text-column", "body")
    assert_one_line_error(rc, err, "good.csv", "'body'", "--text-column", "available columns: id, text, label")
    assert_no_output(out)


def test_bad_empty_text_error_or_drop(tmp_path, capsys, tiny_model):
    path = write_csv(tmp_path / "e.csv", ["text", "label"], [("good", "1"), ("  \t ", "0"), ("bad", "0"),
                                                             ("fine", "1")])
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", path)
    assert_one_line_error(rc, err, "e.csv", "row 2", "empty text", "--on-empty drop")
    assert_no_output(out)
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", path, "--on-empty", "drop",
                        "--split-ratios", "train=0.5,test=0.5")
    assert rc == 0, err
    assert json.loads((out / "manifest.json").read_text())["dropped"] == {"empty_text": 1}


@pytest.mark.parametrize("kind", ["csv", "jsonl-null", "parquet-nan"])
def test_bad_missing_label(tmp_path, capsys, tiny_model, kind):
    if kind == "csv":
        path = write_csv(tmp_path / "l.csv", ["text", "label"], [("good", "1"), ("bad", ""), ("ok", "0")])
        where = "row 2"
    elif kind == "jsonl-null":
        path = tmp_path / "l.jsonl"
        path.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": "x", "label": null}\n')
        where = "line 3"
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "l.parquet"
        pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [1.0, float("nan"), 0.0]}), path)
        where = "row 2"
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", path)
    assert_one_line_error(rc, err, path.name, where, "missing label")
    assert_no_output(out)


def test_bad_label_outside_labels(tmp_path, capsys, tiny_model, good):
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", good, "--labels", "0,2",
                        "--on-unknown-label", "error")
    assert_one_line_error(rc, err, "good.csv", "row 2", "'1'", "--labels")
    assert_no_output(out)
    # every row dropped -> a clear error, not an empty dataset
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", good, "--labels", "7,8")
    assert_one_line_error(rc, err, "no rows left")
    assert_no_output(out)


def test_bad_non_utf8_bytes(tmp_path, capsys, tiny_model):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\ngood,1\nprice \xa3 5,0\nbad,0\nfine,1\n")
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", path)
    assert_one_line_error(rc, err, "latin.csv", "byte offset 24", "0xa3", "--encoding")
    assert_no_output(out)
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", path, "--encoding", "latin-1",
                        "--split-ratios", "train=0.5,test=0.5")
    assert rc == 0, err


def test_bad_malformed_csv_row(tmp_path, capsys, tiny_model):
    path = tmp_path / "m.csv"
    path.write_text('text,label\ngood,1\n"bad, very bad",0,extra\nfine,1\n')
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", path)
    assert_one_line_error(rc, err, "m.csv", "row 2", "expected 2 fields, found 3")
    assert_no_output(out)
    path.write_text('text,label\ngood,1\n"unclosed quote,0\n')
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", path)
    assert_one_line_error(rc, err, "m.csv", "malformed CSV")
    assert_no_output(out)


def test_bad_duplicate_ids(tmp_path, capsys, tiny_model):
    path = write_csv(tmp_path / "d.csv", ["id", "text", "label"], [("a", "good", "1"), ("b", "bad", "0"),
                                                                   ("a", "fine", "1")])
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", path, "--id-column", "id")
    assert_one_line_error(rc, err, "d.csv", "row 3", "duplicate id 'a'", "row 1")
    assert_no_output(out)


def test_bad_chunk_and_stride(tmp_path, capsys, tiny_model, good):
    cases = [(["--max-length", "16", "--chunk-size", "15"], ["--chunk-size 15", "--max-length 16", "14"]),
             (["--chunk-size", "10", "--stride", "0"], ["--stride 0"]),
             (["--chunk-size", "10", "--stride", "-3"], ["--stride -3"]),
             (["--chunk-size", "10", "--stride", "11"], ["--stride 11", "--chunk-size"])]
    for extra, needles in cases:
        rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", good, *extra)
        assert_one_line_error(rc, err, *needles)
        assert_no_output(out)


def test_bad_ratios(tmp_path, capsys, tiny_model, good):
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", good, "--split-ratios", "train=0.8,test=0.1")
    assert_one_line_error(rc, err, "--split-ratios", "sum to 0.9")
    assert_no_output(out)
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", good, "--split-ratios",
                        "train=0.98,validation=0.01,test=0.01")
    assert_one_line_error(rc, err, "split 'validation'", "no documents", "20 rows")
    assert_no_output(out)


def test_bad_output_exists(tmp_path, capsys, tiny_model, good):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", good)
    assert_one_line_error(rc, err, "--output", "already exists", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_bad_tokenizer_path(tmp_path, capsys, tiny_model, good):
    rc, err, out = _bad(tmp_path, capsys, tiny_model, "--input", good, "--tokenizer", tmp_path / "no-model")
    assert_one_line_error(rc, err, "--tokenizer", "no-model")
    assert_no_output(out)


def test_cli_subprocess_exit_code_and_help(tmp_path, tiny_model):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "data_prep", "--input", str(tmp_path / "missing.csv"), "--output",
                        str(tmp_path / "o"), "--tokenizer", str(tiny_model)], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.csv" in r.stderr
    r = subprocess.run([sys.executable, "-m", "data_prep", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0
    for opt in ("--input", "--output", "--tokenizer", "--format", "--text-column", "--text-pair-column",
                "--label-column", "--id-column", "--group-column", "--labels", "--split-column", "--split-ratios",
                "--seed", "--max-length", "--chunk-size", "--stride", "--min-chunk-tokens", "--max-text-tokens",
                "--max-chunks-per-doc", "--clean", "--on-empty", "--encoding", "--num-proc", "--num-shards",
                "--shard-size", "--overwrite"):
        assert opt in r.stdout, opt


def test_tokenizer_fingerprint_is_stable_across_loaders_and_save(tmp_path, tiny_model, minilm_dir):
    """data_prep loads the tokenizer class directly (no torch import); train, evaluate and predict must see the
    same fingerprint through AutoTokenizer and after the export's save_pretrained."""
    from transformers import AutoTokenizer

    from data_prep.tokenizer import load_fast_tokenizer, tokenizer_fingerprint

    for folder in (tiny_model, minilm_dir):
        direct = load_fast_tokenizer(str(folder))
        auto = AutoTokenizer.from_pretrained(folder)
        assert tokenizer_fingerprint(direct) == tokenizer_fingerprint(auto)
        auto.save_pretrained(tmp_path / folder.name)
        assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / folder.name)) == tokenizer_fingerprint(auto)
    assert tokenizer_fingerprint(load_fast_tokenizer(str(tiny_model))) != tokenizer_fingerprint(
        load_fast_tokenizer(str(minilm_dir)))
