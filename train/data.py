"""Batches for training and evaluation: read the shards, group windows of similar length, pad per batch.

The training batch order is a pure function of (seed, epoch, rank, world size), so a run resumes mid-epoch by
skipping the optimizer steps it already took: no sampler state to save, nothing replayed, nothing skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.errors import DataPrepError

# Windows per "mega-batch" = MEGA_BATCH_STEPS micro-batches; windows are sorted by length only inside one,
# so batches have similar lengths while the epoch stays well shuffled (as HF's LengthGroupedSampler).
MEGA_BATCH_STEPS = 50


def arrow_table(ds):
    """The pyarrow Table under a ``datasets.Dataset`` (memory-mapped; no copy)."""
    return ds.data.table if hasattr(ds.data, "table") else ds.data


def load_split(data_dir: str | Path, split: str, manifest: dict):
    """The windows of one split as a ``datasets.Dataset`` (memory-mapped Arrow, not loaded into RAM)."""
    import datasets

    if split not in manifest["splits"]:
        raise DataPrepError(f"{data_dir}: no split {split!r} (manifest has {', '.join(manifest['splits'])})")
    path = Path(data_dir) / split
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataPrepError(f"{path}: cannot read shards: {str(exc).splitlines()[0]}") from None
    expected = manifest["splits"][split]["windows"]
    if ds.num_rows != expected:
        raise DataPrepError(f"{path}: {ds.num_rows} windows but the manifest says {expected}; re-run data_prep")
    return ds


VERIFY_HASH_MAX_TOKENS = 100_000_000  # verify_data: null hashes splits up to this size (<= 0.25 s per 10M tokens)


def check_split_contract(data_dir: str | Path, split: str, ds, manifest: dict, vocab_size: int,
                         type_vocab_size: int | None, verify_hash: bool | None) -> None:
    """Refuse shards that would train for a while and then crash or silently mean something else: a label
    outside the manifest's labels, a token id the model has no embedding for, and (when asked) rows that are
    not the ones data_prep wrote. Min/max over the memory-mapped columns: one pass, nothing loaded per row."""
    import pyarrow.compute as pc

    where = Path(data_dir) / split
    if ds.num_rows == 0:
        return
    table = arrow_table(ds)
    check_labels(where, table, manifest)
    values = pc.list_flatten(table.column("input_ids"))
    tokens = pc.min_max(values)
    if tokens["min"].as_py() is not None and (tokens["min"].as_py() < 0 or tokens["max"].as_py() >= vocab_size):
        flat = values.to_numpy()
        bad = _first_row(flat, lambda v: (v < 0) | (v >= vocab_size))
        ends = np.cumsum(pc.list_value_length(table.column("input_ids")).to_numpy())
        row = int(np.searchsorted(ends, bad, side="right"))
        raise DataPrepError(f"{where}: token id {int(flat[bad])} (window {row}) is outside the model's vocabulary "
                            f"of {vocab_size}; the shards were made for another tokenizer/model: re-run data_prep "
                            "with this model's --tokenizer")
    if type_vocab_size is not None and "token_type_ids" in table.column_names:
        types = pc.min_max(pc.list_flatten(table.column("token_type_ids")))
        if types["max"].as_py() is not None and types["max"].as_py() >= type_vocab_size:
            raise DataPrepError(f"{where}: token type id {types['max'].as_py()} but the model has "
                                f"{type_vocab_size} token types; this model cannot take these pairs")
    tokens_total = manifest["splits"][split].get("tokens", 0)
    if verify_hash or (verify_hash is None and tokens_total <= VERIFY_HASH_MAX_TOKENS):
        from data_prep.shards import ContentHash

        recorded = manifest["splits"][split].get("content_hash")
        digest = ContentHash(ds.features.arrow_schema)
        digest.update(table)
        if recorded is not None and digest.hexdigest() != recorded:
            raise DataPrepError(f"{where}: the shards' content hash differs from the manifest's (changed or damaged "
                                "since data_prep); re-run data_prep (or set verify_data: false to train anyway)")


def check_labels(where: Path, table, manifest: dict) -> None:
    """Class ids within the labels, multi-hot rows of 0/1 of the right width, finite regression targets."""
    problem_type = manifest.get("problem_type", "single_label")
    num_labels = len(manifest["labels"])
    values = label_array_of(table.column("label"))
    if problem_type == "single_label":
        bad = (values < 0) | (values >= num_labels)
        expected = f"the manifest's {num_labels} labels (0..{num_labels - 1})"
    elif problem_type == "multi_label":
        if values.ndim != 2 or values.shape[1] != num_labels:
            raise DataPrepError(f"{where}: multi-hot labels of width {values.shape[1:]}, the manifest has "
                                f"{num_labels} labels; re-run data_prep")
        bad, expected = ((values != 0) & (values != 1)).any(axis=1), "0/1 multi-hot values"
    else:
        bad, expected = ~np.isfinite(values), "finite regression targets"
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataPrepError(f"{where}: window {row} (id {table.column('id')[row].as_py()!r}) has label "
                            f"{table.column('label')[row].as_py()}, outside {expected}; re-run data_prep")


def label_array_of(column) -> np.ndarray:
    """A label column as numpy: [N] class ids or targets, or [N, L] multi-hot rows (one copy of the values)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        flat = pc.list_flatten(column).to_numpy()
        return flat.reshape(len(column), -1) if len(column) else flat.reshape(0, 0)
    return column.to_numpy()


def label_array(ds) -> np.ndarray:
    table = arrow_table(ds)
    return label_array_of(table.column("label"))


def _first_row(values: np.ndarray, is_bad) -> int:
    return int(np.flatnonzero(is_bad(values))[0])


@dataclass
class EpochPlan:
    """How an epoch is cut: every rank takes the same number of micro-batches, in whole optimizer steps."""

    micro_batches: list[list[int]]  # this rank's micro-batches (window indices), in order
    steps: int  # optimizer steps in the epoch
    dropped_windows: int  # windows not in any batch this epoch (the ragged end; a different set each epoch)
    # Per micro-batch, what its mean loss is multiplied by so that every loss unit (window, or document under
    # the document objective) weighs the same in its optimizer step: units x world x accumulation / the step's
    # units on all ranks. None = plain means (fixed-size batches: equal already, bar an epoch's short last one).
    loss_scale: list[float] | None = None


def epoch_batches(lengths: np.ndarray, batch_size: int | None, world_size: int, rank: int, seed: int, epoch: int,
                  accumulation: int, length_grouping: bool = True, max_tokens: int | None = None) -> EpochPlan:
    """This rank's micro-batches for one epoch.

    1. shuffle all windows with (seed, epoch);
    2. if length grouping: sort by length inside mega-batches of about MEGA_BATCH_STEPS x world micro-batches;
    3. cut into micro-batches: ``batch_size`` windows each, or (``max_tokens``) as many windows as fit in
       max_tokens padded tokens (windows x longest window); consecutive micro-batches (similar lengths) form one
       optimizer step across all ranks: world_size x accumulation micro-batches; steps are then shuffled;
    4. rank r takes micro-batches r, r + world, ... of each step; an incomplete last step is dropped so every
       rank runs the same number of steps (no rank waits at a collective for a peer that is done).
    Everything is a pure function of the arguments: a resumed run recomputes the same plan.
    """
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    per_batch = batch_size if max_tokens is None else max(1, max_tokens // max(1, int(np.mean(lengths)) if n else 1))
    if length_grouping:
        mega = MEGA_BATCH_STEPS * per_batch * world_size
        parts = []
        for start in range(0, n, mega):
            part = order[start:start + mega]
            parts.append(part[np.argsort(-lengths[part], kind="stable")])
        order = np.concatenate(parts) if parts else order
    if max_tokens is None:
        micro = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        return _deal_steps(micro, n, rng, world_size, rank, accumulation)
    micro = token_budget_cuts(order, lengths, max_tokens)  # micro-batches of varying window counts
    return _deal_steps(micro, n, rng, world_size, rank, accumulation, units=[len(b) for b in micro])


def _deal_steps(micro: list[np.ndarray], n: int, rng, world_size: int, rank: int, accumulation: int,
                units: list[int] | None = None) -> EpochPlan:
    """Consecutive micro-batches form optimizer steps of world x accumulation; steps are shuffled; rank r takes
    micro-batches r, r + world, ... of each; the incomplete last step is dropped (same steps on every rank).
    ``units``: each micro-batch's loss units, when they vary (see EpochPlan.loss_scale)."""
    per_step = world_size * accumulation
    steps = len(micro) // per_step
    step_order = rng.permutation(steps)
    mine, scales = [], []
    for s in step_order:
        group = slice(s * per_step, (s + 1) * per_step)
        mine.extend(micro[group][rank::world_size])
        if units is not None:
            step_units = sum(units[group])
            scales.extend(u * per_step / step_units for u in units[group][rank::world_size])
    used = sum(len(b) for b in micro[:steps * per_step])
    return EpochPlan([b.tolist() for b in mine], steps, n - used, scales if units is not None else None)


def document_windows(doc_ids: np.ndarray, chunk_index: np.ndarray) -> list[np.ndarray]:
    """Each document's window indices in reading order (chunk_index), documents in order of doc id."""
    order = np.lexsort((chunk_index, doc_ids))
    sorted_ids = doc_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if len(order) else np.zeros(0, int)
    return np.split(order, starts[1:]) if len(order) else []


def document_epoch_batches(docs: list[np.ndarray], lengths: np.ndarray, batch_size: int | None, world_size: int,
                           rank: int, seed: int, epoch: int, accumulation: int, length_grouping: bool = True,
                           max_tokens: int | None = None, windows_per_doc: int | None = None) -> EpochPlan:
    """This rank's micro-batches of whole documents for one epoch (the document objective).

    Like ``epoch_batches`` with documents as the units: shuffle the documents with (seed, epoch); a document
    with more than ``windows_per_doc`` windows keeps a sample of that many (drawn anew each epoch, kept in
    reading order); with length grouping, documents of similar size are batched together; micro-batches take
    whole documents while they fit ``batch_size`` windows or ``max_tokens`` padded tokens (a document that
    alone exceeds it is a micro-batch of its own: cap it with windows_per_doc); then steps as in epoch_batches.
    A document's windows are never split across micro-batches or ranks. ``dropped_windows`` counts windows of
    documents not trained this epoch (the ragged end), not the ones left out by the cap."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(docs))
    chosen = []
    for d in range(len(docs)):  # the per-epoch sample, drawn in doc order: a pure function of (seed, epoch)
        windows = docs[d]
        if windows_per_doc is not None and len(windows) > windows_per_doc:
            windows = windows[np.sort(rng.choice(len(windows), windows_per_doc, replace=False))]
        chosen.append(windows)
    cost = np.array([len(w) * (lengths[w].max() if max_tokens is not None else 1) for w in chosen])
    if length_grouping and len(order):
        mega = MEGA_BATCH_STEPS * world_size * max(1, (max_tokens or batch_size) // max(1, int(cost.mean())))
        order = np.concatenate([part[np.argsort(-cost[part], kind="stable")]
                                for part in np.array_split(order, max(1, -(-len(order) // mega)))])
    micro, docs_in, current, longest = [], [], [], 0
    for d in order.tolist():
        windows = chosen[d]
        count = sum(len(w) for w in current) + len(windows)
        if max_tokens is not None:
            longest_with = max(longest, int(lengths[windows].max()))
            fits = count * longest_with <= max_tokens
        else:
            longest_with, fits = 0, count <= batch_size
        if current and not fits:
            micro.append(np.concatenate(current))
            docs_in.append(len(current))
            current, longest_with = [], int(lengths[windows].max()) if max_tokens is not None else 0
        current.append(windows)
        longest = longest_with
    if current:
        micro.append(np.concatenate(current))
        docs_in.append(len(current))
    # one loss per document: a micro-batch of 1 long document must not weigh as much as one of 16 short ones
    return _deal_steps(micro, sum(len(w) for w in chosen), rng, world_size, rank, accumulation, units=docs_in)


def token_budget_cuts(order: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut ``order`` into consecutive micro-batches of at most ``max_tokens`` padded tokens (windows x the
    longest of them); a window is never split (max_tokens >= the longest window is checked at start-up)."""
    cuts, start, longest = [], 0, 0
    for i, window in enumerate(order.tolist()):
        longest_with = max(longest, int(lengths[window]))
        if i > start and (i - start + 1) * longest_with > max_tokens:
            cuts.append(order[start:i])
            start, longest_with = i, int(lengths[window])
        longest = longest_with
    if start < len(order):
        cuts.append(order[start:])
    return cuts


def steps_per_epoch(num_windows: int, batch_size: int, world_size: int, accumulation: int) -> int:
    return (-(-num_windows // batch_size)) // (world_size * accumulation)


class WindowBatches(torch.utils.data.Dataset):
    """Index with a list of window indices, get a padded batch: input_ids, attention_mask, (token_type_ids),
    labels, plus doc_ids/chunk_index/row for evaluation and real/padded token counts for throughput logging.

    Batches are gathered straight from the memory-mapped Arrow buffers (zero-copy numpy views, kept per record
    batch; nothing is loaded into RAM but the small per-window columns); a dataset that is not a plain Arrow
    table (an indices mapping after select/shuffle, nulls, an unusual type) goes through ``datasets`` indexing
    instead. Both paths feed the same ``collate_windows``. (``ds.select_columns(...)[indices]`` per batch took
    2.3 ms per step on the tiny-model benchmark, this path 0.3 ms: docs/benchmarks.md, "Loop fixes".)
    """

    def __init__(self, ds, pad_id: int, pad_to_multiple_of: int | None = None, packed: bool = False,
                 documents: bool = False):
        self.ds = ds
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packed = packed
        self.documents = documents  # batches of whole documents: labels per document, doc_index per window
        self.columns = [c for c in ("input_ids", "token_type_ids", "label", "doc_id", "chunk_index")
                        if c in ds.column_names]
        self._view = None  # the slow path's column view, made once
        self._arrow = _ArrowColumns.build(ds, self.columns)

    def __len__(self):
        return self.ds.num_rows

    def __getitem__(self, indices: list[int]) -> dict:
        if self._arrow is not None:
            rows = self._arrow.rows(indices)
        else:
            if self._view is None:
                self._view = self.ds.select_columns(self.columns)
            rows = self._view[indices]
        batch = collate_windows(rows, indices, self.pad_id, self.pad_to_multiple_of, self.packed)
        return with_documents(batch) if self.documents else batch

    def __getstate__(self):  # DataLoader workers (spawn) get the dataset and rebuild the views over its files
        return {**self.__dict__, "_arrow": None, "_view": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arrow = _ArrowColumns.build(self.ds, self.columns)


class _ArrowColumns:
    """Zero-copy numpy views of the Arrow record batches of a ``datasets.Dataset``: per chunk, the flat token
    values and offsets of the list columns and the per-window scalar columns."""

    def __init__(self, starts: np.ndarray, chunks: list[dict], lists: set[str]):
        self.starts = starts  # first global row of each chunk
        self.chunks = chunks
        self.lists = lists  # list-valued columns: token ids, token types, multi-hot labels

    @classmethod
    def build(cls, ds, columns: list[str]) -> "_ArrowColumns | None":
        import pyarrow as pa

        try:
            if getattr(ds, "_indices", None) is not None or ds.num_rows == 0:
                return None
            table = arrow_table(ds)
            if not isinstance(table, pa.Table):
                return None
            per_column, lists = {}, set()
            for name in columns:
                col = table.column(name)
                if col.null_count:
                    return None
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    lists.add(name)
                arrays = []
                for chunk in col.chunks:
                    if name in lists:
                        if not pa.types.is_integer(chunk.type.value_type) or chunk.values.null_count:
                            return None
                        arrays.append((chunk.offsets.to_numpy(zero_copy_only=True),
                                       chunk.values.to_numpy(zero_copy_only=True)))
                    else:
                        if not (pa.types.is_integer(chunk.type) or pa.types.is_floating(chunk.type)):
                            return None
                        arrays.append(chunk.to_numpy(zero_copy_only=True))
                per_column[name] = arrays
            sizes = [len(a[0]) - 1 if "label" in lists else len(a) for a in per_column["label"]]
            for name, arrays in per_column.items():
                if [len(a[0]) - 1 if name in lists else len(a) for a in arrays] != sizes:
                    return None  # columns chunked differently: not worth handling
            chunks = [{name: per_column[name][i] for name in columns} for i in range(len(sizes))]
            chunks = [c for c, n in zip(chunks, sizes) if n]
            sizes = [n for n in sizes if n]
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            return cls(starts, chunks, lists)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, AttributeError, KeyError, TypeError, ValueError):
            return None

    def rows(self, indices) -> dict:
        """The same dict of columns as ``ds[indices]``, made of numpy views instead of Python lists."""
        idx = np.asarray(indices, dtype=np.int64)
        chunk_of = np.searchsorted(self.starts, idx, side="right") - 1
        local = idx - self.starts[chunk_of]
        rows = {name: [] for name in self.chunks[0]}
        for c, j in zip(chunk_of.tolist(), local.tolist()):
            for name, column in self.chunks[c].items():
                if name in self.lists:
                    offsets, values = column
                    rows[name].append(values[offsets[j]:offsets[j + 1]])
                else:
                    rows[name].append(column[j])
        return rows


def collate_windows(rows: dict, indices, pad_id: int, pad_to_multiple_of: int | None = None,
                    packed: bool = False) -> dict:
    """One batch: padded ([windows, width], attention_mask) or packed (one row, train/packing.py), plus labels,
    the windows' doc ids / chunk index / rows and real/padded token counts."""
    ids = rows["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    if packed:
        from train.packing import pack_rows

        batch = pack_rows(ids, rows.get("token_type_ids"), pad_id, pad_to_multiple_of)
        return _batch_columns(batch, rows, indices, lengths, batch["input_ids"].shape[1])
    width = int(lengths.max())
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if "token_type_ids" in rows:
        types = np.zeros((len(ids), width), dtype=np.int64)
        for i, x in enumerate(rows["token_type_ids"]):
            types[i, :len(x)] = x
        batch["token_type_ids"] = torch.from_numpy(types)
    return _batch_columns(batch, rows, indices, lengths, len(ids) * width)


def _batch_columns(batch: dict, rows: dict, indices, lengths: np.ndarray, padded_tokens: int) -> dict:
    batch["labels"] = label_tensor(rows["label"])
    batch["real_lengths"] = torch.from_numpy(lengths)
    batch["doc_ids"] = torch.as_tensor(rows["doc_id"], dtype=torch.long)
    batch["chunk_index"] = torch.as_tensor(rows["chunk_index"], dtype=torch.long)
    batch["rows"] = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    batch["real_tokens"] = int(lengths.sum())
    batch["padded_tokens"] = padded_tokens
    return batch


def with_documents(batch: dict) -> dict:
    """A batch of whole documents (the document objective): ``doc_index`` (each window's document, 0..D-1 in
    doc-id order), ``num_docs`` and ``labels`` per document (every window carries its document's label)."""
    ids, first, inverse = np.unique(batch["doc_ids"].numpy(), return_index=True, return_inverse=True)
    batch["window_labels"] = batch["labels"]
    batch["labels"] = batch["labels"][torch.from_numpy(first)]
    batch["doc_index"] = torch.from_numpy(inverse.reshape(-1))
    batch["num_docs"] = len(ids)
    return batch


def label_tensor(labels) -> torch.Tensor:
    """Class ids -> LongTensor [B]; multi-hot rows -> FloatTensor [B, L]; regression targets -> FloatTensor [B]."""
    first = labels[0]
    if isinstance(first, (list, tuple, np.ndarray)):
        return torch.as_tensor(np.stack([np.asarray(x) for x in labels]), dtype=torch.float32)
    values = np.asarray(labels)
    if values.dtype.kind == "f":
        return torch.as_tensor(values, dtype=torch.float32)
    return torch.as_tensor(values, dtype=torch.long)


# padded batches: input_ids, attention_mask, token_type_ids; packed ones (train/packing.py) add the rest
# (and batches of whole documents doc_index and num_docs, train/document.py)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "cu_seqlens", "window_starts",
                "max_seqlen", "doc_index", "num_docs")


def model_inputs(batch: dict, device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) if isinstance(batch[k], torch.Tensor) else batch[k]
            for k in MODEL_INPUTS if k in batch}


def make_loader(dataset: WindowBatches, batches: list[list[int]], num_workers: int, pin_memory: bool):
    """A DataLoader over precomputed batches (each item is one whole padded batch).

    It gets its own generator: a DataLoader otherwise draws a worker seed from the global torch RNG each time
    it is iterated, which would shift the dropout stream when a resumed run starts iterating mid-epoch."""
    return torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(0))


def eval_batches(lengths: np.ndarray, batch_size: int, world_size: int, rank: int) -> tuple[list[list[int]], int]:
    """Evaluation: windows sorted by length (least padding), batch k to rank k % world; every window is evaluated
    exactly once (results are gathered, not padded). Returns (this rank's batches, how many of them are real):
    a rank with one batch fewer than the others (or none, when there are fewer batches than ranks) gets filler
    batches of one window at the end, whose outputs are dropped, so every rank runs as many forward passes."""
    order = np.argsort(-lengths, kind="stable")
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    mine = batches[rank::world_size]
    per_rank = -(-len(batches) // world_size)
    return mine + [order[:1].tolist()] * (per_rank - len(mine)), len(mine)
