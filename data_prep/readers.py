"""Stream rows out of raw inputs: CSV/TSV, JSONL, Parquet, a class-per-folder tree of .txt files, a saved
``datasets`` folder. Every row comes with a location string ("reviews.csv: row 12") for error messages.

Readers stream: nothing holds a whole corpus in memory, so data_prep's memory does not grow with the corpus.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import hashlib
import json
import lzma
import math
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import DataPrepError, one_line
from data_prep.splits import check_split_name

FORMATS = ("csv", "tsv", "jsonl", "parquet", "folder", "saved")
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
# Folder-tree rows have fixed column names.
FOLDER_COLUMNS = ("text", "label", "id")
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents exceed the 128 KiB default


@dataclass
class Source:
    path: Path
    format: str
    split: str | None = None  # given with --input SPLIT=PATH, or the key of a saved DatasetDict
    dataset_key: str | None = None  # which split of a saved DatasetDict
    encodings: dict[str, str] = field(default_factory=dict)  # file -> encoding chosen in the scan
    scanned: bool = False  # after the first pass every file is known to decode

    @property
    def name(self) -> str:
        return f"{self.path}[{self.dataset_key}]" if self.dataset_key else str(self.path)


def _strip_compression(path: Path) -> tuple[str, object]:
    suffix = path.suffix.lower()
    if suffix in _COMPRESSED:
        return path.with_suffix("").suffix.lower(), _COMPRESSED[suffix]
    return suffix, open


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "saved"
        return "folder"
    suffix, _ = _strip_compression(path)
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    raise DataPrepError(f"{path}: cannot tell the format from the name; pass --format "
                        f"({', '.join(FORMATS)})")


def expand_sources(inputs: list[tuple[str | None, Path]], fmt: str) -> list[Source]:
    """One Source per input (a saved DatasetDict becomes one Source per split)."""
    sources = []
    for split, path in inputs:
        if not path.exists():
            raise DataPrepError(f"--input {path}: no such file or folder")
        f = detect_format(path) if fmt == "auto" else fmt
        if f not in FORMATS:
            raise DataPrepError(f"--format {f!r}: unknown; choose from auto, {', '.join(FORMATS)}")
        if f in ("folder", "saved") and not path.is_dir():
            raise DataPrepError(f"--input {path}: format {f!r} needs a folder")
        if f not in ("folder", "saved") and path.is_dir():
            raise DataPrepError(f"--input {path}: is a folder, but format {f!r} needs a file")
        if f == "saved" and (path / "dataset_dict.json").exists():
            index = path / "dataset_dict.json"
            try:
                keys = json.loads(index.read_text())["splits"]
            except Exception as exc:
                raise DataPrepError(f"{index}: not a readable DatasetDict index: {one_line(exc)}") from None
            for key in keys:  # each becomes a folder under --output
                check_split_name(key, str(index))
            if split is not None:
                raise DataPrepError(f"--input {split}={path}: a saved DatasetDict carries its own splits "
                                    f"({', '.join(keys)}); give it without SPLIT=")
            sources += [Source(path, f, key, key) for key in keys]
        else:
            sources.append(Source(path, f, split))
    return sources


# ----------------------------------------------------------------------------------------------- encodings
def _open_binary(path: Path):
    _, opener = _strip_compression(path)
    return opener(path, "rb")


# What reading raises for a compressed file cut short or damaged (bz2 raises an OSError without errno).
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def read_problem(path: Path, exc: BaseException) -> str:
    """Why a file could not be read, in a few words: a damaged compressed file, or the exception itself."""
    suffix = path.suffix.lower()
    if suffix in _COMPRESSED and isinstance(exc, _READ_ERRORS) and not getattr(exc, "errno", None):
        return f"truncated or corrupt {suffix} file ({one_line(exc)})"
    return one_line(exc)


def check_encoding(path: Path, encoding: str) -> tuple[int, int] | None:
    """None if the file decodes; else (byte offset, byte value) of the first bad byte (decompressed stream).
    This is the first full read of every CSV/TSV/JSONL file, so a damaged compressed file shows here."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset = 0
    try:
        with _open_binary(path) as fh:
            while block := fh.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    return offset + exc.start, block[exc.start]
                offset += len(block)
    except _READ_ERRORS as exc:
        raise DataPrepError(f"{path}: {read_problem(path, exc)}") from None
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        return offset + exc.start, -1
    return None


def pick_encoding(path: Path, encodings: tuple[str, ...], label: str) -> str:
    """The first of ``encodings`` that decodes the whole file; else a one-line error with the byte offset."""
    first_error = None
    for enc in encodings:
        bad = check_encoding(path, enc)
        if bad is None:
            return enc
        first_error = first_error or (enc, bad)
    enc, (offset, byte) = first_error
    shown = f" (0x{byte:02x})" if byte >= 0 else " (truncated sequence at end of file)"
    tried = ", ".join(encodings)
    raise DataPrepError(f"{label}: not valid {tried} at byte offset {offset}{shown}; "
                        "pass --encoding (e.g. --encoding utf-8,latin-1) if the file uses another encoding")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    except OSError as exc:
        raise DataPrepError(f"{path}: {read_problem(path, exc)}") from None
    return h.hexdigest()


def source_sha256(source: Source) -> str:
    """sha256 of a file, or of the sorted (relative path, file sha256) list of a folder."""
    if source.path.is_file():
        return file_sha256(source.path)
    h = hashlib.sha256()
    for f in sorted(p for p in source.path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(source.path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- columns
def source_columns(source: Source, encodings: tuple[str, ...]) -> list[str]:
    f = source.format
    if f == "folder":
        return list(FOLDER_COLUMNS)
    if f in ("csv", "tsv"):
        enc = source.encodings.setdefault(str(source.path), pick_encoding(source.path, encodings, str(source.path)))
        with _text_open(source.path, enc) as fh:
            header = next(csv.reader(fh, delimiter="," if f == "csv" else "\t"), None)
        if not header:
            raise DataPrepError(f"{source.path}: empty file (no header row)")
        return header
    if f == "jsonl":
        enc = source.encodings.setdefault(str(source.path), pick_encoding(source.path, encodings, str(source.path)))
        with _text_open(source.path, enc) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    return list(_parse_json_line(line, source.path, lineno).keys())
        raise DataPrepError(f"{source.path}: empty file (no JSON lines)")
    if f == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(source.path).schema_arrow.names)
        except Exception as exc:
            raise DataPrepError(f"{source.path}: not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    if f == "saved":
        return list(_load_saved(source).column_names)
    raise DataPrepError(f"--format {f!r}: unknown")


def _text_open(path: Path, encoding: str):
    _, opener = _strip_compression(path)
    return opener(path, "rt", encoding=encoding, newline="")


def _parse_json_line(line: str, path: Path, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataPrepError(f"{path}: line {lineno}: invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise DataPrepError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _load_saved(source: Source):
    import datasets

    try:
        ds = datasets.load_from_disk(str(source.path))
    except Exception as exc:
        raise DataPrepError(f"{source.path}: not a readable saved dataset: {str(exc).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[source.dataset_key]
    return ds


# ---------------------------------------------------------------------------------------------------- rows
def iter_rows(source: Source, columns: list[str], encodings: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """Yield (location, {column: value}) for every row of a source, in a fixed order. Whatever goes wrong while
    reading is a DataPrepError naming the file and the last row read."""
    loc = None
    try:
        for loc, record in _iter_rows(source, columns, encodings):
            yield loc, record
    except DataPrepError:
        raise
    except Exception as exc:
        where = f"cannot read past {loc.removeprefix(source.name + ': ')}" if loc else "cannot read"
        raise DataPrepError(f"{source.name}: {where}: {read_problem(source.path, exc)}") from exc


def _iter_rows(source: Source, columns: list[str], encodings: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    f = source.format
    if f == "folder":
        yield from _iter_folder(source, encodings)
    elif f in ("csv", "tsv"):
        yield from _iter_csv(source, columns, encodings, "," if f == "csv" else "\t")
    elif f == "jsonl":
        enc = source.encodings.get(str(source.path)) or pick_encoding(source.path, encodings, str(source.path))
        with _text_open(source.path, enc) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield f"{source.path}: line {lineno}", _parse_json_line(line, source.path, lineno)
    elif f == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(source.path).iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield f"{source.path}: row {row}", record
    elif f == "saved":
        ds = _load_saved(source).select_columns(columns)
        label_names = _class_label_names(ds)
        list_label_names = _list_class_label_names(ds)
        row = 0
        for batch in ds.iter(batch_size=1024):
            n = len(next(iter(batch.values())))
            for i in range(n):
                row += 1
                record = {c: batch[c][i] for c in columns}
                for c, names in label_names.items():
                    if record[c] == -1:  # the Hub's "no label" (e.g. an unlabeled test split)
                        record[c] = NO_LABEL
                    elif record[c] is not None and 0 <= record[c] < len(names):
                        record[c] = names[record[c]]
                for c, names in list_label_names.items():
                    ids = record[c]
                    if ids is None:
                        continue
                    if -1 in ids:
                        record[c] = NO_LABEL
                    else:
                        record[c] = [names[k] if k is not None and 0 <= k < len(names) else k for k in ids]
                yield f"{source.name}: row {row}", record


class NoLabel(int):
    """A ClassLabel -1 ("no label" on the Hub). Equal to -1 wherever it is used as a plain value (ids, groups,
    splits); data_prep drops such rows when it is the label (reason "unlabeled")."""


NO_LABEL = NoLabel(-1)


def _class_label_names(ds) -> dict[str, list[str]]:
    import datasets

    return {c: feat.names for c, feat in ds.features.items() if isinstance(feat, datasets.ClassLabel)}


def _list_class_label_names(ds) -> dict[str, list[str]]:
    """Columns holding lists of ClassLabel ids (multi-label sets saved as Sequence(ClassLabel))."""
    import datasets

    return {c: feat.feature.names for c, feat in ds.features.items()
            if not isinstance(feat, datasets.ClassLabel) and isinstance(getattr(feat, "feature", None),
                                                                       datasets.ClassLabel)}


def _iter_csv(source: Source, columns: list[str], encodings: tuple[str, ...], delimiter: str):
    enc = source.encodings.get(str(source.path)) or pick_encoding(source.path, encodings, str(source.path))
    with _text_open(source.path, enc) as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            header = next(reader)
            width = len(header)
            index = [header.index(c) for c in columns]
            row = 0
            for values in reader:
                row += 1
                if not values:  # a blank line is not a row
                    continue
                if len(values) != width:
                    raise DataPrepError(f"{source.path}: row {row} (line {reader.line_num}): malformed row, "
                                        f"expected {width} fields, found {len(values)}")
                yield f"{source.path}: row {row}", {c: values[i] for c, i in zip(columns, index)}
        except csv.Error as exc:
            raise DataPrepError(f"{source.path}: line {reader.line_num}: malformed CSV: {exc}") from None


def _iter_folder(source: Source, encodings: tuple[str, ...]):
    root = source.path
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataPrepError(f"{root}: a folder input needs one sub-folder per class holding .txt files")
    for class_dir in class_dirs:
        for f in sorted(class_dir.rglob("*.txt")):
            rel = f.relative_to(root).as_posix()
            enc = source.encodings.get(rel) or (encodings[0] if source.scanned else None)
            if enc is None:
                enc = pick_encoding(f, encodings, str(f))
                if enc != encodings[0]:
                    source.encodings[rel] = enc  # remember only the exceptions
            try:
                text = f.read_text(encoding=enc)
            except OSError as exc:
                raise DataPrepError(f"{f}: {read_problem(f, exc)}") from None
            yield str(f), {"text": text, "label": class_dir.name, "id": rel}


def folder_ignored_files(root: Path) -> int:
    """Files in a folder input that are not read (not .txt, or outside the class sub-folders)."""
    return sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
               and (p.suffix != ".txt" or p.parent == root))


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip() == "")
