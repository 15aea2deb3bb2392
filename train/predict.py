"""``python -m train.predict``: classify new texts of any length with an exported model.

    python -m train.predict --model runs/bbc/best --input new.csv --output predictions.csv
    echo "a text to classify" | python -m train.predict --model runs/bbc/best

Each text is windowed with the settings the model was trained with (saved beside the export), windows of many
documents are batched together, and window probabilities are pooled per document (mean or max), exactly as in
evaluation. Memory stays flat however long a document is: only --batch-size windows go through the model at once.
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
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.readers import Source, detect_format, is_missing, iter_rows, source_columns
from train.evaluation import pool_document_logits
from train.inference import (InferenceError, check_positive, chunk_settings, forward_windows, load_export,
                             window_documents)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Output columns: id, label, prob_<label> for every label, windows. "
                                       "Exit status 0, or 2 with one error line.")
    p.add_argument("--model", required=True, help="an exported model folder (output_dir/best of a training run)")
    p.add_argument("--input", default="-", help="CSV/TSV/JSONL/Parquet file, a .txt file (one document), a folder "
                                                "of .txt files (one document per file, id = relative path), or - "
                                                "for standard input (one document per line). Default: -")
    p.add_argument("--output", default="-", help="output .csv or .jsonl file, or - for standard output (CSV). "
                                                 "Written to a temporary name and renamed when complete. Default: -")
    p.add_argument("--format", default="full", choices=("full", "submission"),
                   help="full: id, label, every label's probability, windows; submission: just id,label")
    p.add_argument("--text-column", default="text", help="column with the text (table inputs). Default: text")
    p.add_argument("--text-pair-column", default=None,
                   help="column with the second text (models trained on pairs). Default: text_pair if present")
    p.add_argument("--id-column", default=None, help="column with document ids. Default: id if present, else the "
                                                     "row number")
    p.add_argument("--pooling", choices=("mean", "max"), default=None,
                   help="how window probabilities become one per document. Default: as in training")
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


def iter_documents(args) -> tuple[list[str] | None, object]:
    """(pair column used or None, iterator of (id, text, pair_text))."""
    encodings = tuple(e.strip() for e in args.encoding.split(",") if e.strip())
    if not encodings:
        raise InferenceError(f"--encoding {args.encoding!r}: give at least one encoding, e.g. utf-8,latin-1")
    for encoding in encodings:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise InferenceError(f"--encoding {encoding}: unknown encoding") from None
    if args.input == "-":
        text = decode_stdin(sys.stdin.buffer.read(), encodings)
        lines = [line.rstrip("\n") for line in io.StringIO(text, newline=None)]  # \n, \r\n, \r: as TextIOWrapper
        docs = [(str(i), line, None) for i, line in enumerate(lines, 1) if line.strip()]
        return None, iter(docs)
    path = Path(args.input)
    if not path.exists():
        raise InferenceError(f"--input {path}: no such file or folder")
    if path.is_file() and path.suffix.lower() == ".txt":  # one document
        from data_prep.readers import pick_encoding

        return None, iter([(path.name, path.read_text(encoding=pick_encoding(path, encodings, str(path))), None)])
    if path.is_dir() and not (path / "state.json").exists():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise InferenceError(f"--input {path}: no .txt files in the folder")
        from data_prep.readers import pick_encoding

        return None, ((f.relative_to(path).as_posix(), f.read_text(encoding=pick_encoding(f, encodings, str(f))),
                       None) for f in files)
    source = Source(path, detect_format(path))
    columns = source_columns(source, encodings)
    if args.text_column not in columns:
        raise InferenceError(f"{path}: no column {args.text_column!r} (--text-column); available columns: "
                             f"{', '.join(map(str, columns))}")
    pair_col = args.text_pair_column or ("text_pair" if "text_pair" in columns else None)
    if pair_col is not None and pair_col not in columns:
        raise InferenceError(f"{path}: no column {pair_col!r} (--text-pair-column); available columns: "
                             f"{', '.join(map(str, columns))}")
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
            text = record[args.text_column]
            if is_missing(text):
                raise InferenceError(f"{loc}: empty text in column {args.text_column!r}")
            pair = record[pair_col] if pair_col else None
            yield (str(record[id_col]) if id_col else str(n)), str(text), (str(pair) if pair is not None else None)

    return pair_col, rows()


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


def check_output(output: str) -> None:
    """--output must be a file name in an existing folder; checked before the model is loaded."""
    if output == "-":
        return
    path = Path(output)
    if path.is_dir():
        raise InferenceError(f"--output {output}: is a folder; give a file name (.csv or .jsonl)")
    if not path.parent.is_dir():
        raise InferenceError(f"--output {output}: folder {path.parent} does not exist")


def blocks(docs, size: int):
    block = []
    for doc in docs:
        block.append(doc)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block


def predict_block(model, tokenizer, settings, pooling: str, batch_size: int, block, pairs: bool):
    """(doc probabilities [docs, labels], windows per doc) for a block of (id, text, pair) documents."""
    texts = [t for _, t, _ in block]
    windows, types, doc_index = window_documents(tokenizer, texts, settings,
                                                 [p for _, _, p in block] if pairs else None)
    logits = forward_windows(model, windows, types, tokenizer.pad_token_id, batch_size)
    _, probs = pool_document_logits(logits, doc_index, pooling)
    return probs, np.bincount(doc_index, minlength=len(block))


def write_rows(args, labels: list[str], results) -> int:
    """Stream result rows to --output (temporary file renamed at the end) or stdout; returns rows written."""
    out_path = None if args.output == "-" else Path(args.output)
    as_jsonl = out_path is not None and out_path.suffix.lower() in (".jsonl", ".json")
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}" if out_path else None
    try:
        fh = open(tmp, "w", newline="", encoding="utf-8") if tmp else sys.stdout
    except OSError as exc:
        raise InferenceError(f"--output {args.output}: cannot write: {exc.strerror or exc}") from None
    n = 0
    try:
        writer = None if as_jsonl else csv.writer(fh)
        if writer:
            writer.writerow(["id", "label"] if args.format == "submission"
                            else ["id", "label", *[f"prob_{lab}" for lab in labels], "windows"])
        for doc_id, probs, windows in results:
            label = labels[int(np.argmax(probs))]
            if as_jsonl:
                rec = {"id": doc_id, "label": label}
                if args.format == "full":
                    rec.update({"probabilities": dict(zip(labels, map(float, probs))), "windows": int(windows)})
                fh.write(json.dumps(rec) + "\n")
            elif args.format == "submission":
                writer.writerow([doc_id, label])
            else:
                writer.writerow([doc_id, label, *[f"{p:.6f}" for p in probs], int(windows)])
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
        check_output(args.output)
        model, tokenizer, info = load_export(args.model, args.device)
        settings = chunk_settings(tokenizer, info, args.chunk_size, args.stride, args.max_length)
        pooling = args.pooling or info["pooling"]
        pair_col, docs = iter_documents(args)
        pairs = pair_col is not None
        if info["task"] == "pair" and not pairs:
            raise InferenceError(f"--model {args.model} was trained on text pairs; give --text-pair-column")
        labels = info["labels"]
        from tqdm.auto import tqdm

        progress = tqdm(unit="doc", desc="predict", disable=not sys.stderr.isatty(), file=sys.stderr)

        def results():
            for block in blocks(docs, args.docs_per_block):
                probs, windows = predict_block(model, tokenizer, settings, pooling, args.batch_size, block, pairs)
                progress.update(len(block))
                for (doc_id, _, _), p, w in zip(block, probs, windows):
                    yield doc_id, p, w

        stream = results()
        first = next(stream, None)  # an empty input is an error before anything is written
        if first is None:
            raise InferenceError(f"--input {args.input}: no documents to classify")
        written = write_rows(args, labels, itertools.chain([first], stream))
        progress.close()
    except (InferenceError, DataPrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output != "-":
        print(f"predict: {written} documents -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
