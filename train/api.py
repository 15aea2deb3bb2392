"""Python API: classify (or score) texts of any length with an exported model, as ``python -m train.predict`` does.

    from bertfit import DocumentClassifier

    clf = DocumentClassifier.from_pretrained("runs/bbc/best")
    results = clf(["a text to classify", "another, possibly very long, text"])
    results[0].label, results[0].probabilities, results[0].windows

Each text is cleaned and split into windows with the settings recorded in the export (bertfit.json), windows of
many documents share forward passes, and window outputs are pooled per document exactly as in evaluation. Memory
stays bounded however long a document is: only ``batch_size`` windows go through the model at once, and documents
are tokenized ``docs_per_block`` at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from data_prep.clean import clean_text
from data_prep.readers import is_missing
from train.evaluation import pool_documents, window_outputs
from train.inference import (InferenceError, check_pooling, check_positive, check_threshold, chunk_settings,
                             decision_thresholds, forward_documents, load_export, prediction, window_documents)

ON_EMPTY = ("error", "skip", "predict")


@dataclass
class DocumentPrediction:
    """One document's result. Only the field of the model's problem type is set: ``label`` (single-label, the
    most probable label), ``labels`` (multi-label, every label whose probability >= its threshold, in label
    order) or ``value`` (regression). A document skipped by ``on_empty="skip"`` has no prediction and 0 windows."""

    label: str | None = None
    labels: list[str] | None = None
    value: float | None = None
    probabilities: dict[str, float] | None = None  # per label, in the export's label order; None for regression
    windows: int = 0  # windows the document was split into


class DocumentClassifier:
    """An exported model with its window settings, pooling and thresholds; call it with a list of texts.

    Errors (bad export, option or input) are ``train.inference.InferenceError`` with a one-line message that
    names options as the predict CLI spells them (``--pooling``, ``--max-length``, ...)."""

    def __init__(self, model, tokenizer, info: dict, *, batch_size: int = 32, docs_per_block: int = 256,
                 pooling: str | None = None, threshold: float | None = None, on_empty: str = "error",
                 chunk_size: int | None = None, stride: int | None = None, max_length: int | None = None):
        """``model``, ``tokenizer`` and ``info`` as ``train.inference.load_export`` returns them; prefer
        ``from_pretrained``."""
        check_positive({"batch_size": batch_size, "docs_per_block": docs_per_block})
        if on_empty not in ON_EMPTY:
            raise InferenceError(f"on_empty {on_empty!r}: choose from {', '.join(ON_EMPTY)}")
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.batch_size, self.docs_per_block, self.on_empty = batch_size, docs_per_block, on_empty
        self.problem_type: str = info["problem_type"]
        self.labels: list[str] = info["labels"]  # [] for regression
        self.pair_model: bool = info["task"] == "pair"
        self.clean_steps: tuple[str, ...] = info["clean"]
        # same order of checks as predict has always made them (its error tests rely on which comes first)
        self.thresholds = decision_thresholds(threshold, info)
        self.settings = chunk_settings(tokenizer, info, chunk_size, stride, max_length)
        self.pooling = check_pooling(pooling, info) if pooling else check_pooling(
            info["pooling"], info, "bertfit.json pooling")
        # a document-objective model pools in its document head, unless a window pooling is asked for
        self.document_head = info.get("objective") == "document" and not pooling

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | None = None, *, batch_size: int = 32,
                        docs_per_block: int = 256, pooling: str | None = None, threshold: float | None = None,
                        on_empty: str = "error", chunk_size: int | None = None, stride: int | None = None,
                        max_length: int | None = None) -> "DocumentClassifier":
        """Load an export (output_dir/best). device: cpu, cuda, cuda:1, mps; None = cuda if available.
        batch_size: windows per forward pass (memory). docs_per_block: documents tokenized and batched together.
        pooling ("mean", "max", "max_positive"), threshold (multi-label, for every label), chunk_size, stride and
        max_length override the export's settings; None keeps them. on_empty: what to do with a text that is
        empty after cleaning: "error", "skip" (no prediction, 0 windows) or "predict" (run the model on it)."""
        # sizes and the threshold are refused before the (slow) model load
        check_positive({"batch_size": batch_size, "docs_per_block": docs_per_block, "max_length": max_length,
                        "chunk_size": chunk_size, "stride": stride})
        check_threshold(threshold)
        model, tokenizer, info = load_export(model_dir, device)
        return cls(model, tokenizer, info, batch_size=batch_size, docs_per_block=docs_per_block, pooling=pooling,
                   threshold=threshold, on_empty=on_empty, chunk_size=chunk_size, stride=stride,
                   max_length=max_length)

    def __call__(self, texts: Sequence[str] | str, text_pairs: Sequence[str] | str | None = None):
        """One DocumentPrediction per text (a single one for a single string). text_pairs: the second texts of a
        pair model, one per text."""
        if isinstance(texts, str):
            return self([texts], None if text_pairs is None else [text_pairs])[0]
        texts = list(texts)
        if text_pairs is not None:
            if not self.pair_model:
                raise InferenceError("text_pairs: the model was trained on single texts (bertfit.json task "
                                     "'single'); give text_pairs only to a pair model")
            text_pairs = [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
            if len(text_pairs) != len(texts):
                raise InferenceError(f"text_pairs: {len(text_pairs)} pairs for {len(texts)} texts; give one per text")
        elif self.pair_model:
            raise InferenceError("text_pairs: the model was trained on text pairs; give one second text per text")
        documents = []
        for i, text in enumerate(texts):
            text, pair = self.clean(text, text_pairs[i] if text_pairs is not None else None)
            empty = self.empty_part(text, pair)
            if empty is not None and self.on_empty == "error":
                raise InferenceError(f"{empty}[{i}]: empty text{self.after_cleaning()}; on_empty='skip' or "
                                     "'predict' keeps going")
            documents.append(None if empty is not None and self.on_empty == "skip" else (text, pair))
        return list(self.predict_cleaned(documents))

    def clean(self, text, pair=None) -> tuple[str, str | None]:
        """(text, pair) cleaned with the export's steps; a missing text (None, NaN) is empty. pair stays None for a
        single-text model."""
        text = "" if is_missing(text) else clean_text(str(text), self.clean_steps)
        if self.pair_model:
            pair = "" if is_missing(pair) else clean_text(str(pair), self.clean_steps)
        return text, pair if self.pair_model else None

    def empty_part(self, text: str, pair: str | None) -> str | None:
        """'texts' or 'text_pairs' when that part of a cleaned document is empty (blank), else None."""
        if not text.strip():
            return "texts"
        if self.pair_model and not pair.strip():
            return "text_pairs"
        return None

    def after_cleaning(self) -> str:
        return f" after cleaning ({','.join(self.clean_steps)})" if self.clean_steps else ""

    def predict_cleaned(self, documents: Iterable[tuple[str, str | None] | None]) -> Iterator[DocumentPrediction]:
        """Stream of results for already cleaned (text, pair) documents (None: a skipped document), read and
        predicted docs_per_block at a time, so an input of any size streams through bounded memory."""
        block = []
        for document in documents:
            block.append(document)
            if len(block) >= self.docs_per_block:
                yield from self.predict_block(block)
                block = []
        if block:
            yield from self.predict_block(block)

    def predict_block(self, block: list[tuple[str, str | None] | None]) -> list[DocumentPrediction]:
        """Results of one block: the windows of all its documents share forward passes of batch_size windows."""
        kept = [i for i, document in enumerate(block) if document is not None]
        results = [DocumentPrediction() for _ in block]
        if not kept:
            return results
        windows, types, doc_index = window_documents(
            self.tokenizer, [block[i][0] for i in kept], self.settings,
            [block[i][1] for i in kept] if self.pair_model else None)
        logits, doc_logits = forward_documents(self.model, windows, types, doc_index, self.tokenizer.pad_token_id,
                                               self.batch_size)
        window_tokens = np.asarray([len(w) for w in windows])  # weights of regression's mean, as in training
        try:
            if self.document_head:
                pooled = window_outputs(doc_logits, self.problem_type)
            else:
                _, pooled = pool_documents(window_outputs(logits, self.problem_type), doc_index, self.problem_type,
                                           self.pooling, window_tokens)
        except ValueError as exc:
            raise InferenceError(f"--pooling {self.pooling}: {exc}") from None
        counts = np.bincount(doc_index, minlength=len(kept))  # every document has at least one window
        for k, i in enumerate(kept):
            results[i] = self.result(pooled[k], int(counts[k]))
        return results

    def result(self, output, windows: int) -> DocumentPrediction:
        """A document's pooled output (probabilities [labels], or the value) as its DocumentPrediction."""
        if self.problem_type == "regression":
            return DocumentPrediction(value=float(output), windows=windows)
        predicted = prediction(self.problem_type, self.labels, self.thresholds, output)
        probabilities = dict(zip(self.labels, map(float, output)))
        if self.problem_type == "single_label":
            return DocumentPrediction(label=predicted, probabilities=probabilities, windows=windows)
        return DocumentPrediction(labels=predicted, probabilities=probabilities, windows=windows)
