"""data_prep hardening: every bad input is one `error:` line and exit 2, never a traceback, never a write outside
the output folder; interrupts and concurrent runs leave no temporary folders and no mixed output."""

import bz2
import csv
import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from data_prep.cli import main as prep_main

ROOT = Path(__file__).resolve().parents[1]


def run_prep(capsys, *argv):
    capsys.readouterr()  # drop what the test's own set-up printed (e.g. datasets' progress bars)
    rc = prep_main([str(a) for a in argv] + ["--quiet"])
    out, err = capsys.readouterr()
    return rc, err


def assert_error_line(rc, err, *needles, code=2):
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def snapshot(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def rows(n=20):
    return [(f"r{i}", f"{'good great' if i % 2 else 'bad awful'} text {i}", "good" if i % 2 else "bad")
            for i in range(n)]


@pytest.fixture
def good(tmp_path) -> Path:
    (tmp_path / "in").mkdir()
    return write_csv(tmp_path / "in" / "good.csv", ["id", "text", "label"], rows())


def prep_subprocess(*argv, **popen):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update(popen.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ------------------------------------------------------------------------------------------ split names
BAD_NAMES = ["../x", "/abs/x", "a/b", ".", "..", "", "a b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_input_split_name_must_be_plain(tmp_path, capsys, tiny_model, good, name):
    if name.startswith("/"):
        name = f"{tmp_path}/abs"  # a path that, were it written to, would land in this test's folder
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"
    before = snapshot(tmp_path)
    rc, err = run_prep(capsys, "--input", f"{name}={good}", "--output", out, "--tokenizer", tiny_model)
    assert_error_line(rc, err, "--input", f"split name {name!r}", "plain name")
    assert snapshot(tmp_path) == before  # nothing written, inside the output's parent or beside it


@pytest.mark.parametrize("name", ["../esc", "a/b", ".", "..", "tr ain"])
def test_split_column_value_must_be_plain(tmp_path, capsys, tiny_model, name):
    path = write_csv(tmp_path / "s.csv", ["text", "label", "split"],
                     [("good", "1", "train"), ("bad", "0", "test"), ("fine", "1", name), ("awful", "0", "train")])
    (tmp_path / "work").mkdir()
    before = snapshot(tmp_path)
    rc, err = run_prep(capsys, "--input", path, "--split-column", "split", "--output", tmp_path / "work" / "out",
                       "--tokenizer", tiny_model)
    assert_error_line(rc, err, "s.csv: row 3", "--split-column split", f"split name {name!r}")
    assert snapshot(tmp_path) == before


def test_split_ratio_name_must_be_plain(tmp_path, capsys, tiny_model, good):
    rc, err = run_prep(capsys, "--input", good, "--split-ratios", "train=0.5,../t=0.5", "--output",
                       tmp_path / "out", "--tokenizer", tiny_model)
    assert_error_line(rc, err, "--split-ratios", "split name '../t'")
    assert not (tmp_path / "t").exists() and not (tmp_path / "out").exists()


def test_saved_datasetdict_split_key_must_be_plain(tmp_path, capsys, tiny_model):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["good", "bad"] * 4, "label": [1, 0] * 4}),
                               "test": datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    index = tmp_path / "dd" / "dataset_dict.json"
    index.write_text(json.dumps({"splits": ["train", "../test"]}))
    before = snapshot(tmp_path)
    rc, err = run_prep(capsys, "--input", tmp_path / "dd", "--output", tmp_path / "out", "--tokenizer", tiny_model)
    assert_error_line(rc, err, "dataset_dict.json", "split name '../test'")
    assert snapshot(tmp_path) == before


def test_plain_split_names_are_accepted(tmp_path, capsys, tiny_model, good):
    other = write_csv(tmp_path / "other.csv", ["id", "text", "label"], rows(6))
    out = tmp_path / "out"
    rc, err = run_prep(capsys, "--input", f"my-split_1={good}", "--input", f"Test2={other}", "--output", out,
                       "--tokenizer", tiny_model)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["Test2", "manifest.json", "my-split_1"]


# ------------------------------------------------------------------------------- writes outside --output
def test_every_format_writes_only_inside_output(tmp_path, tiny_model):
    """csv, jsonl.gz, parquet, a class-per-folder tree and a saved DatasetDict, with worker processes: the only
    new files are under --output (not beside it, not in HOME, TMPDIR or the caches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs = tmp_path / "in"
    inputs.mkdir()
    data = [(rid, text, label) for rid, text, label in rows(40)]
    write_csv(inputs / "a.csv", ["id", "text", "label"], data)
    with gzip.open(inputs / "b.jsonl.gz", "wt") as fh:
        for rid, text, label in data:
            fh.write(json.dumps({"id": rid, "text": text, "label": label}) + "\n")
    pq.write_table(pa.table({"text": [r[1] for r in data], "label": [r[2] for r in data]}), inputs / "c.parquet")
    for rid, text, label in data:
        (inputs / "tree" / label).mkdir(parents=True, exist_ok=True)
        (inputs / "tree" / label / f"{rid}.txt").write_text(text)
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["bad", "good"])})
    part = {"text": [r[1] for r in data], "label": [int(r[2] == "good") for r in data]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(part, features=features),
                          "test": datasets.Dataset.from_dict(part, features=features)}).save_to_disk(
        str(inputs / "dd"))
    scratch = {name: tmp_path / name for name in ("home", "tmp", "cache")}
    for folder in scratch.values():
        folder.mkdir()
    (tmp_path / "outs").mkdir()
    before = snapshot(tmp_path)
    p = prep_subprocess("--input", inputs / "a.csv", "--input", inputs / "b.jsonl.gz", "--input",
                        inputs / "c.parquet", "--input", inputs / "tree", "--input", inputs / "dd", "--output",
                        tmp_path / "outs" / "out", "--tokenizer", tiny_model, "--num-proc", "2", "--batch-size", "16",
                        "--quiet", env={"HOME": str(scratch["home"]), "TMPDIR": str(scratch["tmp"]),
                                        "XDG_CACHE_HOME": str(scratch["cache"])})
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    new = snapshot(tmp_path) - before
    assert new and all(path == "outs/out" or path.startswith("outs/out/") for path in new), sorted(new)
    assert json.loads((tmp_path / "outs" / "out" / "manifest.json").read_text())["splits"]["train"]["documents"]


# -------------------------------------------------------------------------- --overwrite and the inputs
@pytest.mark.parametrize("case", ["file-inside", "input-is-output", "symlink-into-output", "tokenizer-inside"])
def test_overwrite_refuses_when_an_input_lies_inside_output(tmp_path, capsys, tiny_model, good, case):
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--input", good, "--tokenizer", tiny_model]
    if case == "file-inside":
        shutil.copy(good, out / "data.csv")
        args[1] = needle = out / "data.csv"
    elif case == "input-is-output":
        for rid, text, label in rows(8):
            (out / label).mkdir(exist_ok=True)
            (out / label / f"{rid}.txt").write_text(text)
        args[1:2] = [out, "--format", "folder"]
        needle = out
    elif case == "symlink-into-output":
        shutil.copy(good, out / "data.csv")
        (tmp_path / "link").symlink_to(out)
        args[1] = needle = tmp_path / "link" / "data.csv"
    else:
        shutil.copytree(tiny_model, out / "model")
        args[-1] = needle = out / "model"
    before = snapshot(tmp_path)
    rc, err = run_prep(capsys, *args, "--output", out, "--overwrite")
    assert_error_line(rc, err, f"--output {out}", str(needle), "choose another --output")
    assert snapshot(tmp_path) == before  # the input (and everything else in the output) is still there
    assert (out / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------- interrupts
@pytest.fixture(scope="module")
def big_csv(tmp_path_factory) -> Path:
    """Enough rows that the tiny tokenizer's second pass takes a few seconds."""
    from train.tiny_model import write_synthetic_csv

    return write_synthetic_csv(tmp_path_factory.mktemp("big") / "big.csv", 60_000, num_labels=2)


def wait_for_tmp(p, out: Path, timeout=60):
    """Wait until the run is writing shards (its temporary folder exists)."""
    start = time.time()
    while not leftovers(out):
        assert p.poll() is None, f"finished before writing: {p.communicate()}"
        assert time.time() - start < timeout
        time.sleep(0.05)


def assert_group_gone(pgid: int):
    """No process of the run's process group (the run, its workers, multiprocessing helpers) is left."""
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("a process of the interrupted run is still alive")


@pytest.mark.parametrize("sig,num_proc,to_group", [("SIGTERM", 1, False), ("SIGINT", 2, True),
                                                   ("SIGTERM", 2, False)])
def test_signal_mid_run_removes_temporary_folder(tmp_path, capsys, tiny_model, tiny_csv, big_csv, sig, num_proc,
                                                 to_group):
    out = tmp_path / "out"
    rc, err = run_prep(capsys, "--input", tiny_csv, "--output", out, "--tokenizer", tiny_model)  # an old output
    assert rc == 0, err
    old_manifest = (out / "manifest.json").read_text()
    before = snapshot(tmp_path)
    p = prep_subprocess("--input", big_csv, "--output", out, "--overwrite", "--tokenizer", tiny_model,
                        "--max-length", "24", "--batch-size", "200", "--num-proc", num_proc, start_new_session=True)
    wait_for_tmp(p, out)
    time.sleep(0.3)  # into the encoding loop (with --num-proc 2: while the workers start)
    signum = getattr(signal, sig)
    if to_group:  # Ctrl-C in a terminal reaches the workers too
        os.killpg(p.pid, signum)
    else:
        p.send_signal(signum)
    _, err = p.communicate(timeout=60)
    assert_error_line(p.returncode, err, f"interrupted by {sig}", f"exit {128 + signum}", code=128 + signum)
    assert leftovers(out) == []
    assert snapshot(tmp_path) == before  # the old output untouched, nothing added
    assert (out / "manifest.json").read_text() == old_manifest
    assert_group_gone(p.pid)


def test_next_run_removes_what_a_sigkilled_run_left_but_not_a_live_runs_folders(tmp_path, capsys, tiny_model,
                                                                                  tiny_csv, big_csv):
    import socket

    out = tmp_path / "out"
    p = prep_subprocess("--input", big_csv, "--output", out, "--tokenizer", tiny_model, "--max-length", "24",
                        "--batch-size", "200", start_new_session=True)
    wait_for_tmp(p, out)
    os.killpg(p.pid, signal.SIGKILL)  # no cleanup can run
    p.communicate(timeout=60)
    host = socket.gethostname()
    assert leftovers(out) == [f".out.tmp-{host}-{p.pid}"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [out.parent / f".out.tmp-{host}-{live.pid}", out.parent / f".out.tmp-otherhost-{p.pid}",
                out.parent / f".out.old-{host}-{live.pid}"]
        for folder in kept:  # a run still writing here, and one on another node of a shared file system
            folder.mkdir()
        rc, err = run_prep(capsys, "--input", tiny_csv, "--output", out, "--tokenizer", tiny_model)
        assert rc == 0, err
        assert leftovers(out) == sorted(f.name for f in kept)
    finally:
        live.kill()
        live.wait()


def test_help_documents_exit_codes_and_split_names(capsys):
    assert prep_main(["--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("130 on SIGINT", "143 on SIGTERM", "letters, digits, _ and -"):
        assert needle in text


# ------------------------------------------------------------------------------- concurrent runs
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_appearing_meanwhile_is_refused_or_replaced_whole(tmp_path, capsys, tiny_model, good, monkeypatch,
                                                                  overwrite):
    """Another run finishing first (simulated just before this run's final rename)."""
    import data_prep.prepare as prepare

    out = tmp_path / "out"
    real = prepare.build_manifest

    def other_run_finishes_first(*args, **kwargs):
        out.mkdir()
        (out / "manifest.json").write_text("the other run's")
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "build_manifest", other_run_finishes_first)
    rc, err = run_prep(capsys, "--input", good, "--output", out, "--tokenizer", tiny_model,
                       *(["--overwrite"] if overwrite else []))
    assert leftovers(out) == []
    if not overwrite:
        assert_error_line(rc, err, f"--output {out}", "another process created it", "--overwrite")
        assert sorted(os.listdir(out)) == ["manifest.json"]
        assert (out / "manifest.json").read_text() == "the other run's"
    else:
        assert rc == 0, err
        m = json.loads((out / "manifest.json").read_text())
        assert sorted(os.listdir(out)) == sorted(["manifest.json", *m["splits"]])
        assert m["sources"][0]["path"] == str(good)


def test_two_real_runs_on_one_output_never_mix(tmp_path, capsys, tiny_model, good, big_csv):
    out = tmp_path / "out"
    slow = prep_subprocess("--input", big_csv, "--output", out, "--tokenizer", tiny_model, "--max-length", "24",
                           "--quiet")
    wait_for_tmp(slow, out)  # the slow run has passed its "already exists" check
    rc, err = run_prep(capsys, "--input", good, "--output", out, "--tokenizer", tiny_model)
    assert rc == 0, err
    quick_manifest = (out / "manifest.json").read_text()
    _, err = slow.communicate(timeout=120)
    assert_error_line(slow.returncode, err, f"--output {out}", "another process created it")
    assert (out / "manifest.json").read_text() == quick_manifest
    m = json.loads(quick_manifest)
    assert sorted(os.listdir(out)) == sorted(["manifest.json", *m["splits"]])
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------- reader errors
@pytest.mark.parametrize("key,extra,option", [("text", [], "--text-column"), ("label", [], "--label-column"),
                                              ("pair", ["--text-pair-column", "pair"], "--text-pair-column"),
                                              ("id", ["--id-column", "id"], "--id-column")])
def test_jsonl_row_missing_a_key(tmp_path, capsys, tiny_model, key, extra, option):
    path = tmp_path / "m.jsonl"
    lines = [{"id": f"r{i}", "text": f"good {i}", "pair": "bad", "label": i % 2} for i in range(4)]
    del lines[2][key]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, err = run_prep(capsys, "--input", path, *extra, "--output", tmp_path / "out", "--tokenizer", tiny_model)
    assert_error_line(rc, err, "m.jsonl: line 3", f"no key {key!r}", option)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("suffix,compress", [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_truncated_compressed_input(tmp_path, capsys, tiny_model, good, suffix, compress, fmt):
    if fmt == "csv":
        raw = good.read_bytes()
    else:
        raw = "".join(json.dumps({"text": t, "label": y}) + "\n" for _, t, y in rows(200)).encode()
    blob = compress(raw)
    path = tmp_path / f"data.{fmt}{suffix}"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    rc, err = run_prep(capsys, "--input", path, "--output", tmp_path / "out", "--tokenizer", tiny_model)
    assert_error_line(rc, err, path.name, f"truncated or corrupt {suffix} file")
    assert not (tmp_path / "out").exists()


def test_corrupt_gzip_input(tmp_path, capsys, tiny_model):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(b"this is not gzip data\n")
    rc, err = run_prep(capsys, "--input", path, "--output", tmp_path / "out", "--tokenizer", tiny_model)
    assert_error_line(rc, err, "data.jsonl.gz", "truncated or corrupt .gz file")


def test_unexpected_error_while_reading_names_file_and_row(tmp_path, capsys, tiny_model, monkeypatch):
    import data_prep.readers as readers

    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps({"text": f"good {i}", "label": i % 2}) + "\n" for i in range(6)))
    real = readers._parse_json_line

    def parse(line, p, lineno):
        if lineno == 4:
            raise RuntimeError("reader bug\nsecond line")
        return real(line, p, lineno)

    monkeypatch.setattr(readers, "_parse_json_line", parse)
    rc, err = run_prep(capsys, "--input", path, "--output", tmp_path / "out", "--tokenizer", tiny_model)
    assert_error_line(rc, err, "u.jsonl: cannot read past line 3", "RuntimeError: reader bug")
    assert "second line" not in err


def test_unexpected_error_while_checking_a_row_names_file_and_row(tmp_path, capsys, tiny_model, good, monkeypatch):
    import data_prep.prepare as prepare

    real = prepare.clean_text

    def clean(text, steps):
        if text == "good great text 5":
            raise ValueError("cleaner bug")
        return real(text, steps)

    monkeypatch.setattr(prepare, "clean_text", clean)
    rc, err = run_prep(capsys, "--input", good, "--output", tmp_path / "out", "--tokenizer", tiny_model)
    assert_error_line(rc, err, "good.csv: row 6", "ValueError: cleaner bug")


def test_unexpected_error_while_encoding_names_file_and_rows(tmp_path, capsys, tiny_model, good, monkeypatch):
    import data_prep.prepare as prepare

    calls = {"n": 0}
    real = prepare.encode_job

    def encode(job):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("tokenizer ran out")
        return real(job)

    monkeypatch.setattr(prepare, "encode_job", encode)
    rc, err = run_prep(capsys, "--input", good, "--output", tmp_path / "out", "--tokenizer", tiny_model,
                       "--batch-size", "5")
    assert_error_line(rc, err, "good.csv: row 6 to row 10", "cannot tokenize", "MemoryError: tokenizer ran out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []
