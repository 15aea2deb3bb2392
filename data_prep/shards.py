"""Write one split as Arrow shards in the layout ``datasets.load_from_disk`` reads, plus a content hash.

Shards are cut between documents, so all windows of a document live in one shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa


def window_features(pairs: bool, problem_type: str = "single_label", num_labels: int | None = None):
    """The shard columns. ``label`` is an int64 class id (single_label), a multi-hot list of int8 of length
    ``num_labels`` (multi_label; the length is not part of the type) or a float32 target (regression)."""
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence
    cols = {"input_ids": seq(datasets.Value("int32"))}
    if pairs:
        cols["token_type_ids"] = seq(datasets.Value("int8"))
    label = {"single_label": datasets.Value("int64"), "multi_label": seq(datasets.Value("int8")),
             "regression": datasets.Value("float32")}[problem_type]
    cols.update({
        "label": label,
        "doc_id": datasets.Value("int64"),
        "id": datasets.Value("string"),
        "chunk_index": datasets.Value("int32"),
        "num_chunks": datasets.Value("int32"),
        "token_start": datasets.Value("int32"),
        "length": datasets.Value("int32"),
    })
    return datasets.Features(cols)


class ContentHash:
    """sha256 of a split's rows in order, independent of how the rows were batched or sharded."""

    def __init__(self, schema: pa.Schema):
        self._schema = schema
        self._parts: dict[str, hashlib._Hash] = {}

    def _h(self, key: str):
        return self._parts.setdefault(key, hashlib.sha256())

    def update(self, table: pa.Table) -> None:
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            if pa.types.is_list(col.type):
                self._h(name + ".len").update(np.ascontiguousarray(
                    col.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
                self._h(name + ".val").update(np.ascontiguousarray(col.flatten().to_numpy(zero_copy_only=False)).tobytes())
            elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                self._h(name).update("".join(s + "\0" for s in col.to_pylist()).encode("utf-8"))
            else:
                self._h(name).update(np.ascontiguousarray(col.to_numpy(zero_copy_only=False)).tobytes())

    def hexdigest(self) -> str:
        total = hashlib.sha256(str(self._schema).encode())
        for key in sorted(self._parts):
            total.update(key.encode() + b"=" + self._parts[key].digest())
        return "sha256:" + total.hexdigest()


class SplitWriter:
    """Append tables of whole documents; roll to a new shard at a document boundary once the current shard holds
    ``shard_windows`` windows (or, with ``doc_bounds``, at fixed document counts)."""

    def __init__(self, folder: Path, features, shard_windows: int | None, doc_bounds: list[int] | None):
        from datasets.arrow_writer import ArrowWriter

        self._ArrowWriter = ArrowWriter
        self.folder = folder
        self.features = features
        self.schema = features.arrow_schema
        self.shard_windows = shard_windows
        self.doc_bounds = doc_bounds  # cumulative document counts where shards end
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hash = ContentHash(self.schema)
        self.paths: list[Path] = []
        self._writer = None
        self._rows_in_shard = 0
        self._shard_index = -1
        self.rows = 0

    def _open(self):
        path = self.folder / f"shard-{len(self.paths):05d}.arrow"
        self.paths.append(path)
        self._writer = self._ArrowWriter(features=self.features, path=str(path))
        self._rows_in_shard = 0

    def _close(self):
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None

    def write(self, table: pa.Table, doc_ids: np.ndarray) -> None:
        """``table`` holds whole documents with global, increasing ``doc_ids`` (one per row)."""
        self.hash.update(table)
        self.rows += table.num_rows
        n = table.num_rows
        if self.doc_bounds is not None:
            # shard k holds documents [bounds[k-1], bounds[k])
            shard_of_row = np.searchsorted(self.doc_bounds, doc_ids, side="right")
            cuts = np.flatnonzero(np.diff(shard_of_row)) + 1
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
                if self._writer is not None and self._shard_index != shard_of_row[lo]:
                    self._close()
                if self._writer is None:
                    self._open()
                    self._shard_index = shard_of_row[lo]
                self._writer.write_table(table.slice(int(lo), int(hi - lo)))
            return
        doc_starts = np.r_[0, np.flatnonzero(np.diff(doc_ids)) + 1, n]
        pos = 0
        while pos < n:
            if self._writer is None:
                self._open()
            room = self.shard_windows - self._rows_in_shard
            later = doc_starts[doc_starts >= pos + max(room, 1)]
            end = int(later[0]) if len(later) else n
            self._writer.write_table(table.slice(pos, end - pos))
            self._rows_in_shard += end - pos
            pos = end
            if self._rows_in_shard >= self.shard_windows:
                self._close()

    def finish(self, split: str) -> list[str]:
        """Close the last shard, give shards their final names, write the metadata ``load_from_disk`` reads."""
        self._close()
        n = len(self.paths)
        names = []
        for i, path in enumerate(self.paths):
            name = f"data-{i:05d}-of-{n:05d}.arrow"
            path.rename(self.folder / name)
            names.append(name)
        state = {
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": self.hash.hexdigest()[7:23],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": split,
        }
        (self.folder / "state.json").write_text(json.dumps(state, indent=2))
        info = {"citation": "", "description": f"bertfit windows, split {split}",
                "features": self.features.to_dict(), "homepage": "", "license": ""}
        (self.folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
        return names


def columns_to_table(columns: dict, labels: np.ndarray, doc_ids: np.ndarray, ids: list[str],
                     schema: pa.Schema) -> pa.Table:
    """Turn encoded columns (see data_prep.chunking) plus per-window label/doc/id arrays into an Arrow table."""
    arrays = []
    for field in schema:
        name = field.name
        if name == "label" and pa.types.is_list(field.type):  # multi-hot rows [windows, labels]
            rows, width = labels.shape
            offsets = np.arange(0, rows * width + 1, width, dtype=np.int32)
            arr = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                           pa.array(labels.reshape(-1).astype(np.int8), pa.int8()))
            if arr.type != field.type:
                arr = arr.cast(field.type)
        elif name == "label" and pa.types.is_floating(field.type):
            arr = pa.array(np.asarray(labels, dtype=np.float32), type=field.type)
        elif name == "label":
            arr = pa.array(labels, type=field.type)
        elif name == "doc_id":
            arr = pa.array(doc_ids, type=field.type)
        elif name == "id":
            arr = pa.array(ids, type=field.type)
        elif name in ("input_ids", "token_type_ids"):
            offsets, values = columns[name]
            arr = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, field.type.value_type))
            if arr.type != field.type:
                arr = arr.cast(field.type)
        else:
            arr = pa.array(columns[name], type=field.type)
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=schema)
