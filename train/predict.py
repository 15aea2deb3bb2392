"""Classify (or score, for regression) new texts of any length with an exported model.

    python -m train.predict --model runs/bbc/best --input new.csv --output predictions.csv
    echo "a text to classify" | python -m train.predict --model runs/bbc/best

Each text is cleaned and windowed with the settings the model was trained with (saved beside the export), windows
of many documents are batched together, and window outputs are pooled per document exactly as in evaluation.
Memory stays flat however long a document is: only --batch-size windows go through the model at once.
This command is a thin shell over the Python API (train/api.py, ``from bertfit import DocumentClassifier``): it
reads the inputs, calls the API and writes the rows.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import itertools
import json
import os
import sys
from collections import deque
from pathlib import Path

from data_prep.errors import DataPrepError
from data_prep.readers import Source, detect_format, iter_rows, source_columns
from train.api import DocumentClassifier
from train.inference import TARGET_COLUMN, InferenceError, check_positive, check_threshold, csv_cell

# --output suffixes and what they write; anything else is refused (a .parquet name used to get CSV text)
OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


OUTPUT_HELP = """output columns (CSV; JSONL has the same keys, sets as lists, probabilities as one object; Parquet
the same columns as CSV, typed: sets as lists of strings, probabilities and values as floats):
  single-label model   id, label, prob_<label> for every label, windows
  multi-label model    id, labels (the predicted set: every label whose probability >= its threshold, joined
                       with ';'), prob_<label> for every label, windows
  regression model     id, value, windows
  --format submission  two columns: the id and the prediction, named by --submission-columns
A row skipped by --on-empty skip has an empty prediction and windows 0.
Exit status 0, or 2 with one error line."""

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OUTPUT_HELP)
    p.add_argument("--model", required=True, help="an exported model folder (output_dir/best of a training run)")
    p.add_argument("--input", default="-", help="CSV/TSV/JSONL/Parquet file, a .txt file (one document), a folder "
                                                "of .txt files (one document per file, id = relative path), or - "
                                                "for standard input (one document per non-blank line, id = line "
                                                "number). Default: -")
    p.add_argument("--output", default="-", help="output .csv, .jsonl or .parquet file, or - for standard output "
                                                 "(CSV). Written to a temporary name and renamed when complete. "
                                                 "Default: -")
    p.add_argument("--format", default="full", choices=("full", "submission"),
                   help="full: the columns below; submission: just the id and the prediction")
    p.add_argument("--submission-columns", default=None, metavar="ID,TARGET",
                   help="names of the two columns of --format submission, e.g. PassengerId,Survived. Default: "
                        "id,label (id,labels for a multi-label model, id,value for regression)")
    p.add_argument("--text-column", default="text", help="column with the text (table inputs). Default: text")
    p.add_argument("--text-pair-column", default=None,
                   help="column with the second text; only for models trained on pairs. Default: text_pair for a "
                        "pair model (a single-text model ignores a text_pair column)")
    p.add_argument("--id-column", default=None, help="column with document ids. Default: id if present, else the "
                                                     "row number")
    p.add_argument("--on-empty", default="error", choices=("error", "skip", "predict"),
                   help="a document whose text is empty (after the export's cleaning): error; skip (its row stays "
                        "in the output with an empty prediction, so ids line up); or predict (run the model on "
                        "the empty text). Default: error")
    p.add_argument("--threshold", type=float, default=None,
                   help="multi-label models: predict a label when its probability >= this, for every label. "
                        "Default: the export's thresholds (0.5 if it records none)")
    p.add_argument("--pooling", choices=("mean", "max", "max_positive"), default=None,
                   help="how window outputs become one per document: single-label mean, max or max_positive "
                        "(2 classes); multi-label max or mean; regression mean. Default: as in training (a "
                        "document-objective model: its document head; --pooling pools its per-window outputs instead)")
    p.add_argument("--chunk-size", type=int, default=None, help="content tokens per window. Default: as in training")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts. Default: as in training")
    p.add_argument("--max-length", type=int, default=None, help="window length incl. special tokens. Default: as "
                                                                "in training")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (memory). Default: 32")
    p.add_argument("--docs-per-block", type=int, default=256,
                   help="documents tokenized and batched together (windows of different documents share "
                        "batches). Default: 256")
    p.add_argument("--encoding", default="utf-8", help="encoding(s) of the input files, e.g. utf-8,latin-1")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... Default: cuda if available")
    return p


def parse_submission_columns(value: str | None) -> tuple[str, str] | None:
    """--submission-columns ID,TARGET: exactly two distinct, non-empty names."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",")]
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise InferenceError(f"--submission-columns {value}: give two distinct column names, e.g. id,target")
    return names[0], names[1]


def pair_column_for(args, pair_model: bool) -> str | None:
    """The pair column to read: pair columns are used only for pair models (a single-text model fed a
    ``text_pair`` column used to switch silently to pair encoding)."""
    if not pair_model:
        if args.text_pair_column is not None:
            raise InferenceError(f"--text-pair-column {args.text_pair_column}: the model was trained on single "
                                 "texts (bertfit.json task 'single'); pair columns are only for pair models")
        return None
    return args.text_pair_column or "text_pair"


def iter_documents(args, clf: DocumentClassifier):
    """Iterator of (id, document) pairs: document is the (text, pair_text) cleaned with the export's steps by the
    API (pair_text None for single-text models), or None for an empty one that --on-empty skip leaves
    unpredicted."""
    encodings = tuple(e.strip() for e in args.encoding.split(",") if e.strip())
    if not encodings:
        raise InferenceError(f"--encoding {args.encoding!r}: give at least one encoding, e.g. utf-8,latin-1")
    for encoding in encodings:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise InferenceError(f"--encoding {encoding}: unknown encoding") from None
    pair_col = pair_column_for(args, clf.pair_model)
    path = None if args.input == "-" else Path(args.input)
    if path is not None and not path.exists():
        raise InferenceError(f"--input {path}: no such file or folder")
    is_table = path is not None and not (path.is_file() and path.suffix.lower() == ".txt") and not (
        path.is_dir() and not (path / "state.json").exists())
    if pair_col is not None and not is_table:
        raise InferenceError(f"--model {args.model} was trained on text pairs; give a table input (CSV/TSV/JSONL/"
                             f"Parquet) with the pair column {pair_col!r} (--text-pair-column)")

    def document(doc_id: str, loc: str, text, pair=None):
        """Clean, then apply --on-empty (emptiness judged after cleaning, as data_prep does); the errors name
        the row and column, which the API cannot know."""
        text, pair = clf.clean(text, pair)
        empty = {"texts": args.text_column, "text_pairs": pair_col}.get(clf.empty_part(text, pair))
        if empty is not None:
            if args.on_empty == "error":
                raise InferenceError(f"{loc}: empty text in column {empty!r}{clf.after_cleaning()}; "
                                     "--on-empty skip or predict keeps going")
            if args.on_empty == "skip":
                return doc_id, None
        return doc_id, (text, pair)

    if path is None:
        text = decode_stdin(sys.stdin.buffer.read(), encodings)
        lines = [line.rstrip("\n") for line in io.StringIO(text, newline=None)]  # \n, \r\n, \r: as TextIOWrapper
        # blank lines separate documents (ids stay line numbers); a line emptied by cleaning is an empty document
        return (document(str(i), f"stdin: line {i}", line) for i, line in enumerate(lines, 1) if line.strip())
    if path.is_file() and path.suffix.lower() == ".txt":  # one document
        from data_prep.readers import pick_encoding

        return iter([document(path.name, str(path), path.read_text(encoding=pick_encoding(path, encodings,
                                                                                           str(path))))])
    if not is_table:
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise InferenceError(f"--input {path}: no .txt files in the folder")
        from data_prep.readers import pick_encoding

        return (document(f.relative_to(path).as_posix(), str(f),
                         f.read_text(encoding=pick_encoding(f, encodings, str(f)))) for f in files)
    source = Source(path, detect_format(path))
    columns = source_columns(source, encodings)
    if args.text_column not in columns:
        raise InferenceError(f"{path}: no column {args.text_column!r} (--text-column); available columns: "
                             f"{', '.join(map(str, columns))}")
    if pair_col is not None and pair_col not in columns:
        raise InferenceError(f"{path}: no column {pair_col!r} (--text-pair-column): the model was trained on text "
                             f"pairs; available columns: {', '.join(map(str, columns))}")
    id_col = args.id_column or ("id" if "id" in columns else None)
    if id_col is not None and id_col not in columns:
        raise InferenceError(f"{path}: no column {id_col!r} (--id-column); available columns: "
                             f"{', '.join(map(str, columns))}")
    wanted = [c for c in (args.text_column, pair_col, id_col) if c]

    def rows():
        for n, (loc, record) in enumerate(iter_rows(source, list(dict.fromkeys(wanted)), encodings), 1):
            # JSONL rows are whole objects: the columns were read off the first one, a later one may lack a key
            for column, option in ((args.text_column, "--text-column"), (pair_col, "--text-pair-column"),
                                   (id_col, "--id-column")):
                if column is not None and column not in record:
                    raise InferenceError(f"{loc}: no key {column!r} ({option})")
            yield document(str(record[id_col]) if id_col else str(n), loc, record[args.text_column],
                           record[pair_col] if pair_col else None)

    return rows()


def decode_stdin(data: bytes, encodings: tuple[str, ...]) -> str:
    """Standard input decoded with the first of ``encodings`` that decodes all of it (like pick_encoding does
    for files); else one line naming the line and byte offset of the first bad byte."""
    first_error = None
    for encoding in encodings:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as exc:
            first_error = first_error or exc
    offset = first_error.start
    line = data.count(b"\n", 0, offset) + 1
    raise InferenceError(f"stdin: line {line}: not valid {', '.join(encodings)} at byte offset {offset} "
                         f"(0x{data[offset]:02x}); pass --encoding (e.g. --encoding utf-8,latin-1) if the input "
                         "uses another encoding")


def output_format(output: str) -> str:
    """csv, jsonl or parquet, from --output's suffix (standard output is CSV); one line for any other suffix."""
    if output == "-":
        return "csv"
    suffix = Path(output).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InferenceError(f"--output {output}: unknown output format {suffix or '(no suffix)'}; give a .csv, "
                             ".jsonl or .parquet file name, or - for standard output")
    return OUTPUT_FORMATS[suffix]


def check_output(output: str) -> None:
    """--output must be a file name with a known suffix in an existing folder; checked before the model is
    loaded."""
    if output == "-":
        return
    path = Path(output)
    if path.is_dir():
        raise InferenceError(f"--output {output}: is a folder; give a file name (.csv, .jsonl or .parquet)")
    if not path.parent.is_dir():
        raise InferenceError(f"--output {output}: folder {path.parent} does not exist")
    output_format(output)


def output_header(args, problem_type: str, labels: list[str], submission_columns: tuple[str, str]) -> list[str]:
    if args.format == "submission":
        return list(submission_columns)
    probs = [] if problem_type == "regression" else [f"prob_{name}" for name in labels]
    return ["id", TARGET_COLUMN[problem_type], *probs, "windows"]


def parquet_schema(header: list[str], problem_type: str, submission: bool):
    """Typed columns: id as text, the prediction as a string / list of strings / float, probabilities as
    floats, windows as an integer (a skipped document's prediction and probabilities are null)."""
    import pyarrow as pa

    target = {"single_label": pa.string(), "multi_label": pa.list_(pa.string()),
              "regression": pa.float64()}[problem_type]
    types = [pa.string(), target] if submission else [pa.string(), target, *[pa.float64()] * (len(header) - 3),
                                                        pa.int64()]
    return pa.schema(list(zip(header, types)))


class ParquetRows:
    """Rows written to a Parquet file in row groups of ``group`` rows, so memory stays flat for any input."""

    def __init__(self, path: Path, schema, group: int = 4096):
        import pyarrow.parquet as pq

        self.schema, self.group, self.rows = schema, group, []
        self.writer = pq.ParquetWriter(path, schema)

    def writerow(self, row: list) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.group:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            columns = [list(column) for column in zip(*self.rows)]
            self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def write_rows(args, clf: DocumentClassifier, submission_columns: tuple[str, str], results) -> int:
    """Stream (id, DocumentPrediction) rows to --output (temporary file renamed at the end) or stdout; returns
    rows written."""
    problem_type, labels = clf.problem_type, clf.labels
    target = TARGET_COLUMN[problem_type]  # also the name of the DocumentPrediction field holding the prediction
    fmt = output_format(args.output)
    header = output_header(args, problem_type, labels, submission_columns)
    out_path = None if args.output == "-" else Path(args.output)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}" if out_path else None
    try:
        if fmt == "parquet":
            fh = ParquetRows(tmp, parquet_schema(header, problem_type, args.format == "submission"))
        else:
            fh = open(tmp, "w", newline="", encoding="utf-8") if tmp else sys.stdout
    except OSError as exc:
        raise InferenceError(f"--output {args.output}: cannot write: {exc.strerror or exc}") from None
    n = 0
    try:
        writer = csv.writer(fh) if fmt == "csv" else fh if fmt == "parquet" else None
        if fmt == "csv":
            writer.writerow(header)
        for doc_id, result in results:
            predicted = getattr(result, target)
            probs = result.probabilities
            if fmt == "jsonl":
                if args.format == "submission":
                    rec = {submission_columns[0]: doc_id, submission_columns[1]: predicted}
                else:
                    rec = {"id": doc_id, target: predicted}
                    if problem_type != "regression":
                        rec["probabilities"] = probs
                    rec["windows"] = result.windows
                fh.write(json.dumps(rec) + "\n")
            elif args.format == "submission":
                writer.writerow([doc_id, csv_cell(predicted) if fmt == "csv" else predicted])
            else:
                prob_cells = ([] if problem_type == "regression" else
                              list(probs.values()) if probs is not None else [None] * len(labels))
                if fmt == "csv":
                    prob_cells = ["" if p is None else f"{p:.6f}" for p in prob_cells]
                    predicted = csv_cell(predicted)
                writer.writerow([doc_id, predicted, *prob_cells, result.windows])
            n += 1
        if tmp:
            fh.close()
            os.replace(tmp, out_path)
    except BaseException:
        if tmp:
            fh.close()
            tmp.unlink(missing_ok=True)
        raise
    return n


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        check_positive({"--batch-size": args.batch_size, "--docs-per-block": args.docs_per_block,
                        "--max-length": args.max_length, "--chunk-size": args.chunk_size, "--stride": args.stride})
        check_threshold(args.threshold)
        submission_columns = parse_submission_columns(args.submission_columns)
        check_output(args.output)
        clf = DocumentClassifier.from_pretrained(
            args.model, args.device, batch_size=args.batch_size, docs_per_block=args.docs_per_block,
            pooling=args.pooling, threshold=args.threshold, on_empty=args.on_empty, chunk_size=args.chunk_size,
            stride=args.stride, max_length=args.max_length)
        submission_columns = submission_columns or ("id", TARGET_COLUMN[clf.problem_type])
        ids_and_documents = iter_documents(args, clf)
        from tqdm.auto import tqdm

        progress = tqdm(unit="doc", desc="predict", disable=not sys.stderr.isatty(), file=sys.stderr)

        def results():
            # tee the ids past the API: it reads the documents one block ahead of the results it yields
            ids = deque()

            def documents():
                for doc_id, document in ids_and_documents:
                    ids.append(doc_id)
                    yield document

            for result in clf.predict_cleaned(documents()):
                progress.update(1)
                yield ids.popleft(), result

        stream = results()
        first = next(stream, None)  # an empty input is an error before anything is written
        if first is None:
            raise InferenceError(f"--input {args.input}: no documents to classify")
        written = write_rows(args, clf, submission_columns, itertools.chain([first], stream))
        progress.close()
    except (InferenceError, DataPrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output != "-":
        print(f"predict: {written} documents -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
