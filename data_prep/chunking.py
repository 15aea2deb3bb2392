"""Split token sequences into overlapping windows and turn a batch of documents into shard columns.

Shared by data_prep (offline shards) and train.predict (new texts), so a document is windowed the same way in
training, evaluation and prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from data_prep.tokenizer import SpecialTokenTemplate


@dataclass(frozen=True)
class ChunkSettings:
    max_length: int  # model input length, special tokens included
    chunk_size: int  # content tokens per window (<= max_length - special tokens)
    stride: int  # step between window starts; overlap = chunk_size - stride
    min_chunk_tokens: int = 1  # a tail window shorter than this is dropped (never the only window)
    max_text_tokens: int | None = None  # truncate the document before windowing
    max_chunks_per_doc: int | None = None  # keep only the first N windows

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self, num_special: int, option_prefix: str = "--") -> None:
        """Raise ValueError naming the option at fault."""
        o = lambda name: option_prefix + name.replace("_", "-") if option_prefix == "--" else option_prefix + name
        if self.max_length <= num_special:
            raise ValueError(f"{o('max_length')} {self.max_length} leaves no room for text "
                             f"({num_special} special tokens)")
        room = self.max_length - num_special
        if self.chunk_size < 1 or self.chunk_size > room:
            raise ValueError(f"{o('chunk_size')} {self.chunk_size} is larger than {o('max_length')} "
                             f"{self.max_length} allows ({room} content tokens + {num_special} special tokens)"
                             if self.chunk_size > room else f"{o('chunk_size')} must be >= 1")
        if self.stride <= 0 or self.stride > self.chunk_size:
            raise ValueError(f"{o('stride')} {self.stride} must be between 1 and {o('chunk_size')} "
                             f"({self.chunk_size}); overlap = chunk size - stride")
        if self.min_chunk_tokens < 1 or self.min_chunk_tokens > self.chunk_size:
            raise ValueError(f"{o('min_chunk_tokens')} {self.min_chunk_tokens} must be between 1 and "
                             f"{o('chunk_size')} ({self.chunk_size})")
        if self.max_text_tokens is not None and self.max_text_tokens < 1:
            raise ValueError(f"{o('max_text_tokens')} must be >= 1")
        if self.max_chunks_per_doc is not None and self.max_chunks_per_doc < 1:
            raise ValueError(f"{o('max_chunks_per_doc')} must be >= 1")


def chunk_windows(num_tokens: int, chunk_size: int, stride: int, min_chunk_tokens: int = 1,
                  max_chunks: int | None = None) -> tuple[list[tuple[int, int]], int, int]:
    """Window [start, end) spans over a sequence of ``num_tokens`` content tokens.

    Windows start at 0, stride, 2*stride, ... and stop at the first window that reaches the end, so every token
    is covered. Returns (spans, dropped_short_tail, dropped_over_cap)."""
    spans = []
    start = 0
    while True:
        end = min(start + chunk_size, num_tokens)
        spans.append((start, end))
        if end >= num_tokens:
            break
        start += stride
    short_tail = 0
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < min_chunk_tokens:
        spans.pop()
        short_tail = 1
    over_cap = 0
    if max_chunks is not None and len(spans) > max_chunks:
        over_cap = len(spans) - max_chunks
        spans = spans[:max_chunks]
    return spans, short_tail, over_cap


def longest_first(ids_a: list[int], ids_b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Truncate a pair to ``budget`` content tokens the way the fast tokenizers' ``longest_first`` does:
    the shorter text keeps min(its length, budget // 2) tokens, the longer one gets the rest; each keeps its start."""
    la, lb = len(ids_a), len(ids_b)
    if la + lb <= budget:
        return ids_a, ids_b
    short, long_ = (lb, la) if la > lb else (la, lb)
    keep_short = min(short, budget // 2)
    keep_long = budget - keep_short
    keep_a, keep_b = (keep_long, keep_short) if la > lb else (keep_short, keep_long)
    return ids_a[:keep_a], ids_b[:keep_b]


@dataclass
class EncodedBatch:
    """Shard columns for a batch of documents (one entry per window) plus counters."""

    columns: dict[str, object]
    doc_windows: list[int]  # windows kept per document, in document order
    truncated: dict[str, int]  # documents truncated, by reason
    truncated_docs: int  # documents truncated for any reason
    windows_dropped: dict[str, int]
    tokens: int  # non-padding tokens stored, special tokens included


def _lists_to_arrays(pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    offsets = np.zeros(len(pieces) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(pieces).astype(np.int32, copy=False) if pieces else np.zeros(0, np.int32)
    return offsets, values


def encode_singles(token_lists: list[list[int]], template: SpecialTokenTemplate,
                   settings: ChunkSettings) -> EncodedBatch:
    """Window each document's content tokens and add the tokenizer's special tokens around each window."""
    prefix = np.asarray(template.prefix, dtype=np.int32)
    suffix = np.asarray(template.suffix, dtype=np.int32)
    pieces, chunk_index, num_chunks, starts, doc_windows = [], [], [], [], []
    truncated = {"max_text_tokens": 0, "max_chunks_per_doc": 0}
    dropped = {"short_tail": 0, "max_chunks_per_doc": 0}
    truncated_docs = 0
    for ids in token_lists:
        arr = np.asarray(ids, dtype=np.int32)
        cut = False
        if settings.max_text_tokens is not None and len(arr) > settings.max_text_tokens:
            arr = arr[: settings.max_text_tokens]
            truncated["max_text_tokens"] += 1
            cut = True
        spans, short_tail, over_cap = chunk_windows(len(arr), settings.chunk_size, settings.stride,
                                                    settings.min_chunk_tokens, settings.max_chunks_per_doc)
        dropped["short_tail"] += short_tail
        if over_cap:
            dropped["max_chunks_per_doc"] += over_cap
            truncated["max_chunks_per_doc"] += 1
            cut = True
        truncated_docs += cut
        n = len(spans)
        for k, (s, e) in enumerate(spans):
            pieces.append(np.concatenate((prefix, arr[s:e], suffix)))
            chunk_index.append(k)
            num_chunks.append(n)
            starts.append(s)
        doc_windows.append(n)
    offsets, values = _lists_to_arrays(pieces)
    lengths = np.diff(offsets).astype(np.int32)
    columns = {
        "input_ids": (offsets, values),
        "chunk_index": np.asarray(chunk_index, dtype=np.int32),
        "num_chunks": np.asarray(num_chunks, dtype=np.int32),
        "token_start": np.asarray(starts, dtype=np.int32),
        "length": lengths,
    }
    return EncodedBatch(columns, doc_windows, truncated, truncated_docs, dropped, int(values.size))


def encode_pairs(lists_a: list[list[int]], lists_b: list[list[int]], template: SpecialTokenTemplate,
                 max_length: int) -> EncodedBatch:
    """One window per pair: truncate longest-first to ``max_length`` and lay out with the pair template."""
    budget = max_length - template.num_pair
    t_pre, t_a, t_mid, t_b, t_suf = template.pair_types
    ids_pieces, type_pieces = [], []
    truncated = 0
    for a, b in zip(lists_a, lists_b):
        if len(a) + len(b) > budget:
            truncated += 1
            a, b = longest_first(a, b, budget)
        ids = template.pair_prefix + tuple(a) + template.pair_middle + tuple(b) + template.pair_suffix
        types = ([t_pre] * len(template.pair_prefix) + [t_a] * len(a) + [t_mid] * len(template.pair_middle)
                 + [t_b] * len(b) + [t_suf] * len(template.pair_suffix))
        ids_pieces.append(np.asarray(ids, dtype=np.int32))
        type_pieces.append(np.asarray(types, dtype=np.int8))
    offsets, values = _lists_to_arrays(ids_pieces)
    type_values = np.concatenate(type_pieces).astype(np.int8) if type_pieces else np.zeros(0, np.int8)
    n = len(ids_pieces)
    columns = {
        "input_ids": (offsets, values),
        "token_type_ids": (offsets, type_values),
        "chunk_index": np.zeros(n, dtype=np.int32),
        "num_chunks": np.ones(n, dtype=np.int32),
        "token_start": np.zeros(n, dtype=np.int32),
        "length": np.diff(offsets).astype(np.int32),
    }
    return EncodedBatch(columns, [1] * n, {"pair_max_length": truncated}, truncated, {}, int(values.size))
