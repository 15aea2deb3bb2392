"""The data_prep pipeline: scan the inputs, assign splits, tokenize and window, write shards + manifest.

Two streaming passes over the raw inputs keep memory flat whatever the corpus size:
1. scan: validate every row (columns, labels, ids, empty texts, encodings), collect labels/groups/splits;
2. encode: tokenize in batches (optionally in worker processes), window, and append to each split's shards.
Everything is written to a temporary folder beside the output and renamed into place only when complete.
"""

from __future__ import annotations

import datetime as dt
import errno
import glob
import json
import os
import shutil
import signal
import socket
import sys
import threading
from array import array
from collections import Counter, deque
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import data_prep
from data_prep.chunking import ChunkSettings, encode_pairs, encode_singles
from data_prep.clean import clean_text
from data_prep import labels as task_labels
from data_prep.errors import DataPrepError, one_line
from data_prep.labels import label_text
from data_prep.readers import (NoLabel, Source, expand_sources, folder_ignored_files, is_missing, iter_rows,
                               source_columns, source_sha256)
from data_prep.shards import SplitWriter, columns_to_table, window_features
from data_prep.splits import DEFAULT_RATIOS, assign_splits, check_split_name
from data_prep.tokenizer import (backend_json, load_fast_tokenizer, resolve_pretrained_path,
                                 special_token_template, tokenizer_fingerprint)

MANIFEST = "manifest.json"
SPLIT_ORDER = ("train", "validation", "test")


@dataclass
class PrepOptions:
    inputs: list[tuple[str | None, Path]]
    output: Path
    tokenizer: str
    format: str = "auto"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    id_column: str | None = None
    group_column: str | None = None
    labels: list[str] | None = None
    split_column: str | None = None
    split_ratios: dict[str, float] | None = None
    seed: int = 42
    max_length: int | str | None = None  # "auto": chosen from the data's token lengths
    max_length_percentile: float | None = None  # for "auto"; None = 95
    chunk_size: int | None = None
    stride: int | None = None
    min_chunk_tokens: int = 1
    max_text_tokens: int | None = None
    max_chunks_per_doc: int | None = None
    clean: tuple[str, ...] = ()
    on_empty: str = "error"
    on_unknown_label: str = "drop"
    task: str = "auto"  # auto | single_label | multi_label | regression
    label_separator: str | None = None  # multi_label: split text labels on this
    encodings: tuple[str, ...] = ("utf-8",)
    num_proc: int = 1
    num_shards: int | None = None
    shard_size: int = 50_000
    batch_size: int = 1000
    overwrite: bool = False
    progress: bool = True


class Codes:
    """Strings stored as small integer codes: a few bytes per row, whatever the corpus size."""

    def __init__(self):
        self.values: list[str] = []
        self.index: dict[str, int] = {}
        self.codes = array("q")  # 8-byte signed ints, read back as int64

    def append(self, value: str) -> None:
        code = self.index.get(value)
        if code is None:
            code = self.index[value] = len(self.values)
            self.values.append(value)
        self.codes.append(code)

    def __len__(self) -> int:
        return len(self.codes)

    def decoded(self, mapping: dict[str, int]) -> np.ndarray:
        """The codes translated through ``mapping`` (value -> new code)."""
        table = np.array([mapping.get(v, -1) for v in self.values], dtype=np.int64)
        return table[np.frombuffer(self.codes, dtype=np.int64)] if len(self.codes) else np.zeros(0, np.int64)


@dataclass
class ScanResult:
    """What the first pass learned: one entry per kept row, in reading order, plus drop counts."""

    keep: list[bytearray] = field(default_factory=list)  # per source: 1 = row kept
    labels: Codes = field(default_factory=Codes)  # single_label: class name; multi_label: multi_label_key(set)
    targets: array = field(default_factory=lambda: array("d"))  # regression: the target of every kept row
    labels_removed: Counter = field(default_factory=Counter)  # multi_label: label -> documents it was removed from
    groups: Codes = field(default_factory=Codes)
    given_split: Codes = field(default_factory=Codes)  # "" = no split given
    rows_per_source: list[int] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # (split or None, reason) -> rows


def row_id(source: Source, ordinal: int, record: dict, id_column: str | None) -> str:
    if id_column is not None:
        return label_text(record[id_column])
    if source.format == "folder":
        return record["id"]
    return f"{source.dataset_key or source.path.name}:{ordinal}"


def _text(record: dict, column: str, loc: str) -> str:
    value = record[column]
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if not isinstance(value, str):
        raise DataPrepError(f"{loc}: column {column!r} holds {type(value).__name__}, not text")
    return value


def _columns_needed(opts: PrepOptions, source: Source) -> list[str]:
    if source.format == "folder":
        return ["text", "label", "id"]
    cols = [opts.text_column, opts.label_column]
    for c in (opts.text_pair_column, opts.id_column, opts.group_column, opts.split_column):
        if c is not None and c not in cols:
            cols.append(c)
    return cols


def _named_columns(opts: PrepOptions) -> list[tuple[str, str]]:
    """(option, column) for every column an option names."""
    named = [("--text-column", opts.text_column), ("--label-column", opts.label_column),
             ("--text-pair-column", opts.text_pair_column), ("--id-column", opts.id_column),
             ("--group-column", opts.group_column), ("--split-column", opts.split_column)]
    return [(opt, col) for opt, col in named if col is not None]


def check_columns(opts: PrepOptions, sources: list[Source]) -> None:
    for source in sources:
        if source.format == "folder":
            for opt, col in (("--text-pair-column", opts.text_pair_column), ("--group-column", opts.group_column),
                             ("--split-column", opts.split_column)):
                if col is not None:
                    raise DataPrepError(f"{opt}: a folder input ({source.path}) has only text, label (folder name) "
                                        "and id (file path)")
            continue
        try:
            available = source_columns(source, opts.encodings)
        except DataPrepError:
            raise
        except Exception as exc:
            raise DataPrepError(f"{source.name}: cannot read its columns: {one_line(exc)}") from exc
        for opt, col in _named_columns(opts):
            if col not in available:
                raise DataPrepError(f"{source.name}: no column {col!r} ({opt}); available columns: "
                                    f"{', '.join(map(str, available))}")


def scan(opts: PrepOptions, sources: list[Source]) -> ScanResult:
    """Pass 1: validate every row, decide which rows are kept, remember label/group/split per kept row."""
    result = ScanResult()
    allowed = set(opts.labels) if opts.labels else None
    seen_ids: dict[str, str] = {}
    for source in sources:
        columns = _columns_needed(opts, source)
        text_col = "text" if source.format == "folder" else opts.text_column
        label_col = "label" if source.format == "folder" else opts.label_column
        keep = bytearray()
        ordinal = 0
        loc = None
        # JSONL rows are whole objects: the columns were read off the first one, a later one may lack a key
        required = _named_columns(opts) if source.format == "jsonl" else []
        plain_splits: set[str] = set()
        try:
            for loc, record in iter_rows(source, columns, opts.encodings):
                ordinal += 1
                for opt, col in required:
                    if col not in record:
                        raise DataPrepError(f"{loc}: no key {col!r} ({opt})")
                split = source.split
                if opts.split_column is not None:
                    if is_missing(record[opts.split_column]):
                        raise DataPrepError(f"{loc}: missing split in column {opts.split_column!r}")
                    split = label_text(record[opts.split_column])
                    if split not in plain_splits:  # it becomes a folder name under --output
                        plain_splits.add(check_split_name(split, f"{loc} (--split-column {opts.split_column})"))
                label, unlabeled = read_label(opts, record[label_col], label_col, loc)
                if opts.id_column is not None:
                    if is_missing(record[opts.id_column]):
                        raise DataPrepError(f"{loc}: missing id in column {opts.id_column!r}")
                    rid = label_text(record[opts.id_column])
                    if rid in seen_ids:
                        raise DataPrepError(f"{loc}: duplicate id {rid!r} (first seen at {seen_ids[rid]})")
                    seen_ids[rid] = loc
                texts = [(text_col, _text(record, text_col, loc))]
                if opts.text_pair_column is not None:
                    texts.append((opts.text_pair_column, _text(record, opts.text_pair_column, loc)))
                empty = next((c for c, t in texts if not clean_text(t, opts.clean).strip()), None)
                reason = None
                if empty is not None:
                    if opts.on_empty == "error":
                        raise DataPrepError(f"{loc}: empty text in column {empty!r} (pass --on-empty drop to drop "
                                            "and count such rows)")
                    reason = "empty_text"
                elif unlabeled:
                    reason = "unlabeled"
                elif allowed is not None and opts.task == "multi_label":
                    unknown = [name for name in label if name not in allowed]
                    if unknown and opts.on_unknown_label == "error":
                        raise DataPrepError(f"{loc}: label {unknown[0]!r} is not one of --labels "
                                            f"{','.join(opts.labels)}")
                    # the document keeps its other labels; with none left it is a document with no label
                    result.labels_removed.update(unknown)
                    label = [name for name in label if name in allowed]
                elif allowed is not None and label not in allowed:
                    if opts.on_unknown_label == "error":
                        raise DataPrepError(f"{loc}: label {label!r} is not one of --labels {','.join(opts.labels)}")
                    reason = "label_not_in_labels"
                if reason is not None:
                    keep.append(0)
                    result.dropped[(split, reason)] += 1
                    continue
                if opts.group_column is not None:
                    if is_missing(record[opts.group_column]):
                        raise DataPrepError(f"{loc}: missing group in column {opts.group_column!r}")
                    result.groups.append(label_text(record[opts.group_column]))
                keep.append(1)
                if opts.task == "regression":
                    result.targets.append(label)
                else:
                    result.labels.append(task_labels.multi_label_key(label) if opts.task == "multi_label" else label)
                result.given_split.append(split or "")
        except DataPrepError:
            raise
        except Exception as exc:  # an input nobody foresaw: still one line naming the row
            raise DataPrepError(f"{loc or source.name}: unexpected {one_line(exc)}") from exc
        source.scanned = True
        result.keep.append(keep)
        result.rows_per_source.append(ordinal)
    return result


def read_label(opts: PrepOptions, value, column: str, loc: str):
    """(label, unlabeled): a class name, a sorted list of names (multi_label) or a float (regression); unlabeled is
    True for a saved dataset's ClassLabel -1, which is dropped and counted, never a class named "-1"."""
    if isinstance(value, NoLabel):
        return None, True
    if opts.task == "multi_label":
        if value is None or (isinstance(value, float) and value != value):
            raise DataPrepError(f"{loc}: missing label in column {column!r} (a document with no label has an "
                                "empty list, or empty text with --label-separator)")
        if isinstance(value, str) and not value.strip() and opts.label_separator is not None:
            return [], False
        return task_labels.multi_label(value, loc, opts.label_separator), False
    if is_missing(value):
        raise DataPrepError(f"{loc}: missing label in column {column!r}")
    if opts.task == "regression":
        return task_labels.regression_target(value, loc), False
    return task_labels.single_label(value, loc, opts.task), False


def _natural_label_order(labels: set[str]) -> list[str]:
    """Sorted, numerically when every label is an integer ("2" before "10")."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def check_task_options(opts: PrepOptions) -> None:
    """Options that contradict --task, refused before any data is read."""
    if opts.task not in task_labels.TASK_CHOICES:
        raise DataPrepError(f"--task {opts.task!r}: choose from {', '.join(task_labels.TASK_CHOICES)}")
    if opts.label_separator is not None and opts.task != "multi_label":
        raise DataPrepError("--label-separator splits multi-label text; it needs --task multi_label")
    if opts.label_separator == "":
        raise DataPrepError("--label-separator: give a non-empty separator, e.g. ';'")
    if opts.task == "regression" and opts.labels is not None:
        raise DataPrepError("--labels: --task regression has no label set (the model has one output)")
    if opts.max_length_percentile is not None and opts.max_length != "auto":
        raise DataPrepError("--max-length-percentile picks the length for --max-length auto; pass --max-length auto")


def label_arrays(opts: PrepOptions, problem_type: str, scan_result: ScanResult):
    """(label names, row_labels, strata) for the kept rows.

    ``row_labels(kept_rows)`` gives those rows' shard labels: int64 class ids (single_label), int8 multi-hot rows
    [n, len(names)] (multi_label) or float64 targets (regression). ``strata`` (int64 per kept row) is what the
    split stratifies by: the class for single_label; one stratum (a plain seeded split) for the others."""
    if problem_type == "regression":
        targets = np.frombuffer(scan_result.targets, dtype=np.float64) if len(scan_result.targets) else np.zeros(0)
        if not len(targets):
            raise DataPrepError("no rows left to prepare (every row was dropped; see the counts above)")
        return [], lambda rows: targets[rows], np.zeros(len(targets), dtype=np.int64)
    if not len(scan_result.labels):
        raise DataPrepError("no rows left to prepare (every row was dropped; see the counts above)")
    if problem_type == "multi_label":
        label_sets = [json.loads(key) for key in scan_result.labels.values]
        names = list(opts.labels) if opts.labels else _natural_label_order({n for s in label_sets for n in s})
        if not names:
            raise DataPrepError("--task multi_label: no document has a label (every label set is empty)")
        index = {name: i for i, name in enumerate(names)}
        multi_hot = np.zeros((len(label_sets), len(names)), dtype=np.int8)  # one row per distinct label set
        for k, label_set in enumerate(label_sets):
            multi_hot[k, [index[n] for n in label_set]] = 1
        set_codes = np.frombuffer(scan_result.labels.codes, dtype=np.int64)
        return names, lambda rows: multi_hot[set_codes[rows]], np.zeros(len(set_codes), dtype=np.int64)
    present = set(scan_result.labels.values)
    names = list(opts.labels) if opts.labels else _natural_label_order(present)
    if len(present) < 2:
        dropped = sum(scan_result.dropped.values())
        raise DataPrepError(f"only one class ({next(iter(present))!r}) in the data"
                            + (f" after dropping {dropped} rows" if dropped else "")
                            + "; single-label classification needs at least two (for a numeric target pass "
                            "--task regression)")
    label_ids = scan_result.labels.decoded({name: i for i, name in enumerate(names)})
    return names, lambda rows: label_ids[rows], label_ids


def split_label_summary(problem_type: str, label_names: list[str], class_counts: list[int], row_labels,
                        rows: np.ndarray) -> dict:
    """A split's label keys in the manifest: label_counts (documents per label), plus unlabeled_documents for
    multi_label; target statistics for regression."""
    if problem_type == "regression":
        return {"target": task_labels.target_stats(row_labels(rows))}
    if problem_type == "multi_label":
        multi_hot = row_labels(rows)
        return {"label_counts": dict(zip(label_names, multi_hot.sum(axis=0, dtype=np.int64).tolist())),
                "unlabeled_documents": int((multi_hot.sum(axis=1) == 0).sum())}
    return {"label_counts": dict(zip(label_names, class_counts))}


# Models whose position table starts after the padding index (pad_token_id + 1 slots unused): RoBERTa's 514
# positions hold 512 tokens.
_OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet",
                           "data2vec-text", "ibert", "luke", "markuplm", "roberta-prelayernorm", "xmod"}


def model_positions(tok, tokenizer_name: str) -> int:
    """The longest input the model takes: the tokenizer's model_max_length and the config's position count
    (when the folder has a config.json), whichever is smaller; 512 when neither says."""
    limits = []
    model_max = getattr(tok, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max <= 100_000:  # unset is a huge sentinel
        limits.append(model_max)
    try:
        config = json.loads((Path(resolve_pretrained_path(tokenizer_name)) / "config.json").read_text())
    except (OSError, ValueError, DataPrepError):
        config = {}
    positions = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if isinstance(positions, int) and positions > 0:
        if config.get("model_type") in _OFFSET_POSITION_MODELS:
            pad = config.get("pad_token_id")
            positions -= (pad if isinstance(pad, int) else 1) + 1
        limits.append(positions)
    return min(limits) if limits else 512


def choose_max_length(opts: PrepOptions, sources, scan_result: ScanResult, tok, template, positions: int,
                      row_labels, num_labels: int, split_idx: np.ndarray, num_splits: int) -> dict:
    """--max-length auto: the smallest multiple of 8 >= the percentile of the kept documents' token counts
    (special tokens included; text + pair for pairs), at least 16 and at most the model's positions.
    A tokenizing pre-pass over the kept rows (the same rows and cleaning as the encode pass)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(backend_json(tok))  # without the run-time truncation the encode pass drops too
    pairs = opts.text_pair_column is not None
    num_special = template.num_pair if pairs else template.num_single
    counts = array("q")
    for job in iter_jobs(opts, sources, scan_result, row_labels, num_labels, split_idx, num_splits):
        lengths = [len(e.ids) for e in tokenizer.encode_batch_fast(job["texts"], add_special_tokens=False)]
        if pairs:
            lengths = [a + len(e.ids) for a, e in
                       zip(lengths, tokenizer.encode_batch_fast(job["pairs"], add_special_tokens=False))]
        counts.extend(n + num_special for n in lengths)
    percentile = 95.0 if opts.max_length_percentile is None else float(opts.max_length_percentile)
    at_percentile = int(np.ceil(np.percentile(np.frombuffer(counts, dtype=np.int64), percentile)))
    chosen = min(positions, max(16, -(-at_percentile // 8) * 8))
    return {"percentile": percentile, "tokens_at_percentile": at_percentile, "chosen": chosen,
            "model_positions": positions}


def decide_splits(opts: PrepOptions, scan_result: ScanResult,
                  label_ids: np.ndarray) -> tuple[list[str], np.ndarray, dict[str, float] | None]:
    """Split names (in output order), the split index of every kept row, and the ratios used (if any)."""
    given_codes = scan_result.given_split
    given_names = [s for s in given_codes.values if s]
    unsplit = np.flatnonzero(given_codes.decoded({s: 0 for s in given_names}) < 0)
    ratios = opts.split_ratios
    if ratios is not None and not len(unsplit):
        raise DataPrepError("--split-ratios: every row already has a split (from --input SPLIT=PATH or "
                            "--split-column); drop --split-ratios or give an input without SPLIT=")
    if len(unsplit) and ratios is None:
        ratios = DEFAULT_RATIOS
    names: list[str] = []
    for s in list(ratios or {}) + given_names:
        if s not in names:
            names.append(s)
    first_seen = list(names)
    names.sort(key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), first_seen.index(s)))
    index = {s: k for k, s in enumerate(names)}
    split_idx = given_codes.decoded(index)  # -1 where no split was given
    if len(unsplit):
        sub_labels = label_ids[unsplit].tolist()
        sub_groups = None
        if opts.group_column:
            group_codes = np.frombuffer(scan_result.groups.codes, dtype=np.int64)[unsplit]
            sub_groups = [scan_result.groups.values[g] for g in group_codes]
        assigned = assign_splits(sub_labels, sub_groups, ratios, opts.seed)
        ratio_index = np.array([index[name] for name in ratios], dtype=np.int64)
        split_idx[unsplit] = ratio_index[assigned]
    counts = np.bincount(split_idx, minlength=len(names))  # every row now has a split
    for name, count in zip(names, counts):
        if count == 0:
            how = (f"the ratios {','.join(f'{k}={v:g}' for k, v in ratios.items())} leave it empty for "
                   f"{len(unsplit)} rows" if ratios and name in ratios else "every row of it was dropped")
            raise DataPrepError(f"split {name!r} would have no documents: {how}")
    return names, split_idx, (ratios if len(unsplit) else None)


# --------------------------------------------------------------------------------------------- encoding
_WORKER: dict = {}


def _init_pool_worker(*init_args) -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent alone stops the run and cleans up, so a
    # worker ignores SIGINT (born with it blocked, see run_jobs, so none slips in before this line).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _init_worker(*init_args)


def _init_worker(tokenizer_json: str, template, settings: ChunkSettings, pairs: bool, schema, threads: bool) -> None:
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    from tokenizers import Tokenizer

    _WORKER.update(tokenizer=Tokenizer.from_str(tokenizer_json), template=template, settings=settings,
                   pairs=pairs, schema=schema)


def _encode(texts: list[str]) -> list[list[int]]:
    tokenizer = _WORKER["tokenizer"]
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def encode_job(job: dict) -> list[tuple[int, object, np.ndarray, dict]]:
    """Tokenize and window one batch of documents; returns (split index, Arrow table, doc ids, stats) per split."""
    settings, template, schema = _WORKER["settings"], _WORKER["template"], _WORKER["schema"]
    out = []
    for s in np.unique(job["split"]):
        rows = np.flatnonzero(job["split"] == s)
        texts = [job["texts"][i] for i in rows]
        if _WORKER["pairs"]:
            enc = encode_pairs(_encode(texts), _encode([job["pairs"][i] for i in rows]), template,
                               settings.max_length)
        else:
            enc = encode_singles(_encode(texts), template, settings)
        per_doc = np.asarray(enc.doc_windows)
        doc_ids = np.repeat(job["doc_id"][rows], per_doc)
        # every window carries its document's label: a class id, a multi-hot row or a target
        labels = np.repeat(job["label"][rows], per_doc, axis=0)
        ids = [job["ids"][i] for i, n in zip(rows, per_doc) for _ in range(n)]
        table = columns_to_table(enc.columns, labels, doc_ids, ids, schema)
        stats = {"documents": len(rows), "windows": int(per_doc.sum()), "tokens": enc.tokens,
                 "truncated": enc.truncated_docs, "truncated_by": enc.truncated,
                 "windows_dropped": enc.windows_dropped,
                 "labels": (np.bincount(job["label"][rows], minlength=job["num_labels"]).tolist()
                            if job["label"].ndim == 1 and job["label"].dtype == np.int64 else None)}
        out.append((int(s), table, doc_ids, stats))
    return out


def iter_jobs(opts: PrepOptions, sources: list[Source], scan_result: ScanResult, row_labels, num_labels: int,
              split_idx: np.ndarray, num_splits: int):
    """Pass 2: re-read the kept rows in the same order and group them into batches of documents.
    ``row_labels(kept_rows)`` gives the labels the scan decided for those kept rows (see ``label_arrays``)."""
    next_doc = np.zeros(num_splits, dtype=np.int64)
    kept = 0
    batch: dict[str, list] = {"texts": [], "pairs": [], "label": [], "split": [], "ids": [], "locs": []}

    def flush():
        split = np.asarray(batch["split"], dtype=np.int64)
        doc_id = np.empty(len(split), dtype=np.int64)
        for i, s in enumerate(split):  # documents are numbered per split, in reading order
            doc_id[i] = next_doc[s]
            next_doc[s] += 1
        job = {"texts": batch["texts"], "pairs": batch["pairs"], "ids": batch["ids"], "split": split,
               "doc_id": doc_id, "label": row_labels(np.asarray(batch["label"], dtype=np.int64)),
               "num_labels": num_labels, "where": _span(batch["locs"][0], batch["locs"][-1])}
        for key in batch:  # fresh lists: the job keeps the old ones
            batch[key] = []
        return job

    for source, keep in zip(sources, scan_result.keep):
        columns = _columns_needed(opts, source)
        text_col = "text" if source.format == "folder" else opts.text_column
        loc = None
        try:
            for ordinal, (loc, record) in enumerate(iter_rows(source, columns, opts.encodings), 1):
                if not keep[ordinal - 1]:
                    continue
                batch["texts"].append(clean_text(_text(record, text_col, loc), opts.clean))
                if opts.text_pair_column is not None:
                    batch["pairs"].append(clean_text(_text(record, opts.text_pair_column, loc), opts.clean))
                batch["label"].append(kept)  # the kept row's index; row_labels turns it into its label
                batch["split"].append(split_idx[kept])
                batch["ids"].append(row_id(source, ordinal, record, opts.id_column))
                batch["locs"].append(loc)
                kept += 1
                if len(batch["texts"]) >= opts.batch_size:
                    yield flush()
        except DataPrepError:
            raise
        except Exception as exc:  # e.g. the file changed since the first pass: one line naming the row
            raise DataPrepError(f"{loc or source.name}: unexpected {one_line(exc)}") from exc
    if batch["texts"]:
        yield flush()


def _span(first: str, last: str) -> str:
    """Where a batch of rows came from: 'a.csv: row 11' and 'a.csv: row 20' -> 'a.csv: row 11 to row 20'."""
    if first == last:
        return first
    head, sep, _ = first.rpartition(": ")
    if sep and last.startswith(head + sep):
        return f"{first} to {last[len(head + sep):]}"
    return f"{first} to {last}"


def run_jobs(jobs, init_args: tuple, num_proc: int):
    """Encode batches in order, in this process or in ``num_proc`` spawned workers with bounded look-ahead
    (so the reader never runs ahead of the workers by more than a few batches)."""
    if num_proc <= 1:
        _init_worker(*init_args, True)
        for job in jobs:
            yield _encoded(job["where"], lambda: encode_job(job))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(num_proc, mp_context=mp.get_context("spawn"), initializer=_init_pool_worker,
                               initargs=(*init_args, False))
    try:
        pending: deque = deque()
        for job in jobs:
            # workers start inside submit and inherit this signal mask: SIGINT stays blocked in them until
            # _init_pool_worker ignores it; here it is only held for the moment of the call
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                pending.append((job["where"], pool.submit(encode_job, job)))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if len(pending) >= 2 * num_proc:
                where, future = pending.popleft()
                yield _encoded(where, future.result)
        while pending:
            where, future = pending.popleft()
            yield _encoded(where, future.result)
    finally:  # also on an error or interrupt: drop the queued batches, wait for the running ones
        pool.shutdown(wait=True, cancel_futures=True)


def _encoded(where: str, encode):
    """``encode()``, with an unforeseen failure reported as one line naming the rows of the batch."""
    try:
        return encode()
    except DataPrepError:
        raise
    except Exception as exc:
        raise DataPrepError(f"{where}: cannot tokenize: {one_line(exc)}") from exc


def _add_counts(into: dict, more: dict) -> None:
    for k, v in more.items():
        if v:
            into[k] = into.get(k, 0) + v


def resolve_chunk_settings(opts: PrepOptions, tok, template, note: str = "") -> ChunkSettings:
    """``note`` is added to an error (e.g. which --max-length auto chose)."""
    max_length = opts.max_length
    if max_length is None:
        model_max = getattr(tok, "model_max_length", None)
        max_length = model_max if isinstance(model_max, int) and 0 < model_max <= 100_000 else 512
    pairs = opts.text_pair_column is not None
    num_special = template.num_pair if pairs else template.num_single
    chunk = opts.chunk_size if opts.chunk_size is not None else max_length - num_special
    settings = ChunkSettings(max_length=max_length, chunk_size=chunk,
                             stride=opts.stride if opts.stride is not None else chunk,
                             min_chunk_tokens=opts.min_chunk_tokens, max_text_tokens=opts.max_text_tokens,
                             max_chunks_per_doc=opts.max_chunks_per_doc)
    try:
        if pairs:
            if settings.max_length <= num_special:
                raise ValueError(f"--max-length {max_length} leaves no room for a pair")
        else:
            settings.check(num_special)
    except ValueError as exc:
        raise DataPrepError(f"{exc}{note}") from None
    return settings


def prepare(opts: PrepOptions) -> dict:
    """Run the whole pipeline; returns the manifest. Raises DataPrepError for bad input or options."""
    output = Path(os.path.abspath(opts.output))  # "." and ".." resolved: the name must be a real folder name
    if not output.name:
        raise DataPrepError(f"--output {opts.output}: give a folder below the file system root")
    if output.exists() and not opts.overwrite:
        raise DataPrepError(f"--output {opts.output}: already exists; pass --overwrite to replace it")
    check_inputs_outside(opts, output)
    for split, path in opts.inputs:
        if split is not None:
            check_split_name(split, f"--input {split}={path}")
    for split in opts.split_ratios or {}:
        check_split_name(split, "--split-ratios")
    if opts.labels is not None and len(set(opts.labels)) != len(opts.labels):
        raise DataPrepError("--labels: a label is listed twice")
    check_task_options(opts)
    tok = load_fast_tokenizer(opts.tokenizer)
    template = special_token_template(tok)
    auto_length = opts.max_length == "auto"
    positions = model_positions(tok, opts.tokenizer) if auto_length else None
    # checks the windowing options before reading any data (with auto: against the longest the model allows)
    settings = resolve_chunk_settings(replace(opts, max_length=positions) if auto_length else opts, tok, template)
    sources = expand_sources(opts.inputs, opts.format)
    check_columns(opts, sources)

    scan_result = scan(opts, sources)
    problem_type = "single_label" if opts.task == "auto" else opts.task
    label_names, row_labels, strata = label_arrays(opts, problem_type, scan_result)
    split_names, split_idx, ratios_used = decide_splits(opts, scan_result, strata)
    max_length_auto = None
    if auto_length:
        max_length_auto = choose_max_length(opts, sources, scan_result, tok, template, positions,
                                            row_labels, len(label_names), split_idx, len(split_names))
        chosen = replace(opts, max_length=max_length_auto["chosen"])
        settings = resolve_chunk_settings(chosen, tok, template, f" (--max-length auto chose {chosen.max_length})")

    pairs = opts.text_pair_column is not None
    features = window_features(pairs, problem_type, len(label_names))
    docs_per_split = np.bincount(split_idx, minlength=len(split_names))
    remove_dead_runs_leftovers(output)
    tmp = output.parent / f".{output.name}.tmp-{run_tag()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        writers = []
        for name, n_docs in zip(split_names, docs_per_split):
            bounds = None
            if opts.num_shards is not None:
                k = min(opts.num_shards, int(n_docs))
                bounds = sorted({round(n_docs * (i + 1) / k) for i in range(k)})
            writers.append(SplitWriter(tmp / name, features, opts.shard_size, bounds))
        stats = [{"documents": 0, "windows": 0, "tokens": 0, "truncated": 0, "truncated_by": {},
                  "windows_dropped": {}, "labels": [0] * len(label_names)} for _ in split_names]
        jobs = iter_jobs(opts, sources, scan_result, row_labels, len(label_names), split_idx, len(split_names))
        # workers get the Arrow schema, not the `datasets` features: they never import `datasets`
        init_args = (backend_json(tok), template, settings, pairs, features.arrow_schema)
        progress = _progress(int(docs_per_split.sum()), opts.progress)
        # closing: on an error or interrupt the workers are shut down before the temporary folder is removed
        with closing(run_jobs(jobs, init_args, opts.num_proc)) as encoded:
            for results in encoded:
                for s, table, doc_ids, st in results:
                    writers[s].write(table, doc_ids)
                    agg = stats[s]
                    for key in ("documents", "windows", "tokens", "truncated"):
                        agg[key] += st[key]
                    _add_counts(agg["truncated_by"], st["truncated_by"])
                    _add_counts(agg["windows_dropped"], st["windows_dropped"])
                    if st["labels"] is not None:
                        agg["labels"] = [a + b for a, b in zip(agg["labels"], st["labels"])]
                    progress.update(st["documents"])
        progress.close()

        splits = {}
        for k, (name, writer, agg) in enumerate(zip(split_names, writers, stats)):
            shards = writer.finish(name)
            dropped = {reason: n for (s, reason), n in sorted(scan_result.dropped.items()) if s == name}
            splits[name] = {
                "documents": agg["documents"], "windows": agg["windows"], "tokens": agg["tokens"],
                "truncated": agg["truncated"], "truncated_by": agg["truncated_by"], "dropped": dropped,
                "windows_dropped": agg["windows_dropped"],
                **split_label_summary(problem_type, label_names, agg["labels"], row_labels,
                                      np.flatnonzero(split_idx == k)),
                "shards": shards, "content_hash": writer.hash.hexdigest(),
            }
        manifest = build_manifest(opts, sources, scan_result, tok, settings, label_names, pairs, splits,
                                  ratios_used, problem_type, row_labels, max_length_auto)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        with signals_held():  # a signal now would stop the swap half-way; the run is complete anyway
            _replace_folder(tmp, output, opts.overwrite)
    except BaseException:
        with signals_held():  # a second Ctrl-C must not stop the cleanup half-way
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# A run's temporary folders beside --output are named after it: host and pid, so a later run can tell which
# belong to a run that died (SIGKILL, power loss) and may be removed, and never touches one of a live run, here
# or on another node sharing the file system.
def run_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_dead_runs_leftovers(output: Path) -> None:
    """Remove ``.NAME.tmp-HOST-PID`` / ``.NAME.old-HOST-PID`` folders of runs on this host that are no longer
    running; a SIGKILLed run cannot remove its own."""
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        for path in output.parent.glob(f".{glob.escape(output.name)}.{kind}-{glob.escape(host)}-*"):
            pid = path.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def check_inputs_outside(opts: PrepOptions, output: Path) -> None:
    """--overwrite deletes the old output: refuse when an input (or the tokenizer folder) lies inside it."""
    out = output.resolve()
    named = [(f"--input {path}", path) for _, path in opts.inputs]
    if opts.tokenizer:  # a folder, or a package/hub name that names no path here
        named.append((f"--tokenizer {opts.tokenizer}", Path(opts.tokenizer).expanduser()))
    for what, path in named:
        if not path.exists():
            continue
        real = path.resolve()
        if real == out or out in real.parents:
            where = "is that same folder" if real == out else "lies inside it"
            raise DataPrepError(f"--output {opts.output}: {what} {where}, and replacing the output would delete "
                                "it; choose another --output")


def build_manifest(opts, sources, scan_result, tok, settings, label_names, pairs, splits, ratios_used,
                   problem_type="single_label", row_labels=None, max_length_auto=None) -> dict:
    dropped_before_split = Counter()
    for (s, reason), n in scan_result.dropped.items():
        if s is None:
            dropped_before_split[reason] += n
    dropped_total = Counter()
    for (_, reason), n in scan_result.dropped.items():
        dropped_total[reason] += n
    source_entries = []
    for source, rows in zip(sources, scan_result.rows_per_source):
        entry = {"path": str(source.path.resolve()), "format": source.format, "split": source.split,
                 "rows": rows, "sha256": source_sha256(source)}
        if source.dataset_key:
            entry["dataset_split"] = source.dataset_key
        if source.format == "folder":
            entry["ignored_files"] = folder_ignored_files(source.path)
        other_encodings = sorted(set(source.encodings.values()) - {opts.encodings[0]})
        entry["encoding"] = opts.encodings[0] if not other_encodings else [opts.encodings[0], *other_encodings]
        if source.encodings and source.format == "folder":
            entry["files_in_other_encodings"] = dict(sorted(source.encodings.items()))
        source_entries.append(entry)
    task_keys = {}
    if problem_type == "regression":
        task_keys["target"] = task_labels.target_stats(row_labels(np.arange(len(scan_result.targets))))
    if problem_type == "multi_label" and opts.labels is not None:
        task_keys["labels_not_in_labels"] = dict(sorted(scan_result.labels_removed.items()))
    if max_length_auto is not None:
        task_keys["max_length_auto"] = max_length_auto
    return {
        "format_version": data_prep.FORMAT_VERSION,
        "bertfit_version": data_prep.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "task": "pair" if pairs else "single",
        "problem_type": problem_type,
        "labels": label_names,
        **task_keys,
        "tokenizer": {"name_or_path": opts.tokenizer, "fingerprint": tokenizer_fingerprint(tok),
                      "class": type(tok).__name__, "vocab_size": len(tok)},
        "chunking": settings.as_dict(),
        "columns": {"text": opts.text_column, "text_pair": opts.text_pair_column, "label": opts.label_column,
                    "id": opts.id_column, "group": opts.group_column, "split": opts.split_column},
        "clean": list(opts.clean),
        "split_ratios": ratios_used,
        "seed": opts.seed,
        "sources": source_entries,
        "dropped": dict(sorted(dropped_total.items())),
        "dropped_before_split": dict(sorted(dropped_before_split.items())),
        "splits": splits,
    }


def _replace_folder(tmp: Path, output: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an old output is moved aside first and removed afterwards.

    Another run on the same --output writes its own temporary folder and may finish first. Renaming a folder
    onto a non-empty one fails, so two runs never mix; the later one reports it (or, with --overwrite, replaces
    the earlier result whole)."""
    appeared = DataPrepError(f"--output {output}: another process created it while this run was writing; left it "
                             "as it is (pass --overwrite to replace it)")
    old = None
    if os.path.lexists(output):
        if not overwrite:
            raise appeared
        old = output.parent / f".{output.name}.old-{run_tag()}"
        try:
            output.rename(old)
        except FileNotFoundError:  # removed meanwhile
            old = None
    try:
        tmp.rename(output)
    except OSError as exc:
        if old is not None:
            try:
                old.rename(output)  # put the old output back, unless something new took its place
            except OSError:
                _remove(old)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise appeared from None
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ signals
# python -m data_prep turns SIGTERM, like SIGINT, into KeyboardInterrupt (carrying the signal number), so one
# path removes the temporary folder (prepare's except) and shuts workers down (run_jobs' finally). While that
# folder is being removed or swapped into place, a signal is ignored instead: stopping there would leave half a
# folder, and both steps end the run anyway.
_held = {"depth": 0}


def _raise_interrupt(signum, frame):
    if not _held["depth"]:
        raise KeyboardInterrupt(signum)


@contextmanager
def signals_held():
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1


@contextmanager
def signals_as_interrupts():
    """SIGINT and SIGTERM raise KeyboardInterrupt(signal number) inside the block (for the command line)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="doc", desc="data_prep", disable=not enabled or not sys.stderr.isatty(),
                file=sys.stderr)


def read_manifest(data_dir: str | Path) -> dict:
    """Load and check a data_prep output's manifest (the contract train relies on)."""
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise DataPrepError(f"{data_dir}: no such folder (expected a data_prep output)")
    if not path.exists():
        raise DataPrepError(f"{data_dir}: no {MANIFEST}; is this a data_prep output?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataPrepError(f"{path}: not valid JSON ({exc.msg})") from None
    version = manifest.get("format_version")
    if version != data_prep.FORMAT_VERSION:
        raise DataPrepError(f"{path}: format_version {version!r}, this bertfit reads "
                            f"{data_prep.FORMAT_VERSION}; re-run data_prep")
    for key in ("labels", "tokenizer", "chunking", "splits"):
        if key not in manifest:
            raise DataPrepError(f"{path}: missing key {key!r}")
    return manifest
