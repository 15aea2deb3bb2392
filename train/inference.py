"""Run an exported model on windows: load the export, window new texts exactly as data_prep does, and forward
windows in length-sorted batches across documents (never one forward pass per whole long document)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_prep.chunking import ChunkSettings, encode_pairs, encode_singles
from data_prep.tokenizer import special_token_template, tokenizer_fingerprint
from train.data import collate_windows, model_inputs
from train.document import has_document_head, pool_and_classify
from train.evaluation import check_pooling as evaluation_check_pooling, default_pooling
from train.export import DOCUMENT_HEAD, EXPORT_INFO, HF_PROBLEM_TYPES, read_export_info, read_json_object
from train.speedups import SpeedupsConfig, apply_speedups
from train.versions import version_problem


_PROBLEM_TYPE_OF_HF = {hf: ours for ours, hf in HF_PROBLEM_TYPES.items()}


# The column holding a document's prediction (and the default name of a submission's second column).
TARGET_COLUMN = {"single_label": "label", "multi_label": "labels", "regression": "value"}


class InferenceError(Exception):
    """Bad model folder or input; one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def check_positive(options: dict[str, int | None]) -> None:
    """Refuse a non-positive size option ({'--batch-size': 0}) before anything is loaded: a negative batch size
    makes ``range`` empty and every logit stays 0 (silently wrong), zero is a ValueError deep inside."""
    for option, value in options.items():
        if value is not None and value < 1:
            raise InferenceError(f"{option} {value}: must be >= 1")


def check_threshold(threshold: float | None) -> None:
    if threshold is not None and not 0.0 <= threshold <= 1.0:  # also refuses nan
        raise InferenceError(f"--threshold {threshold}: must be between 0 and 1")


def decision_thresholds(threshold: float | None, info: dict) -> list[float] | None:
    """Per-label thresholds of a multi-label model: --threshold for every label, else the export's."""
    if info["problem_type"] != "multi_label":
        if threshold is not None:
            raise InferenceError(f"--threshold: only for multi-label models; this one is {info['problem_type']}")
        return None
    return [threshold] * len(info["labels"]) if threshold is not None else list(info["thresholds"])


def check_pooling(pooling: str, info: dict, option: str = "--pooling") -> str:
    """The pooling, if the model's problem type (and label count) allows it; one line naming the choices."""
    try:
        return evaluation_check_pooling(info["problem_type"], pooling, len(info["labels"]), option)
    except ValueError as exc:
        raise InferenceError(str(exc)) from None


def prediction(problem_type: str, labels: list[str], thresholds: list[float] | None, output):
    """The document's prediction: a label (single-label), the list of labels at or over their thresholds
    (multi-label) or the value (regression); None for a skipped document."""
    if output is None:
        return None
    if problem_type == "single_label":
        return labels[int(np.argmax(output))]
    if problem_type == "multi_label":
        return [name for name, p, t in zip(labels, output, thresholds) if p >= t]
    return output


def csv_cell(value) -> str:
    """A prediction as a CSV cell: a label, a ';'-joined set, a float at full precision, '' when skipped."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def resolve_device(device: str | None) -> torch.device:
    """The torch device for --device (cuda if available when None); one line for a misspelled or absent one,
    instead of a RuntimeError (or a CUDA init traceback) when the model is moved."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InferenceError(f"--device {device}: unknown device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InferenceError(f"--device {device}: not available (torch sees no CUDA device); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise InferenceError(f"--device {device}: not available (torch sees {count} CUDA device(s): "
                                 f"cuda:0 to cuda:{count - 1})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InferenceError(f"--device {device}: not available (no Apple MPS device); use --device cpu")
        return dev
    raise InferenceError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N or mps")


def _short(fingerprint: str) -> str:
    return fingerprint[:len("sha256:") + 12]


def load_export(model_dir: str | Path, device: str | None = None, speedups: SpeedupsConfig | None = None):
    """(model in eval mode, tokenizer, info) from an exported folder; ``speedups`` (default: all auto) are
    applied through train/speedups.py as in training. info holds labels ([] for regression),
    problem_type, thresholds (multi_label: one per label, 0.5 when the export records none; else None), clean
    (a tuple of data_prep.clean steps), task, chunking, pooling and max_positions (the model's position
    embeddings: the longest window it can take)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if problem := version_problem():
        raise InferenceError(problem)
    torch_device = resolve_device(device)  # before the (slower) load, and names --device rather than the model
    path = Path(model_dir)
    if not path.is_dir():
        raise InferenceError(f"--model {model_dir}: no such folder")
    if not (path / "config.json").exists():
        raise InferenceError(f"--model {model_dir}: no config.json; expected a folder written by bertfit's export "
                             "(output_dir/best) or save_pretrained")
    try:
        config = read_json_object(path / "config.json")
        info = read_export_info(path)
    except ValueError as exc:
        raise InferenceError(f"--model {model_dir}: {exc}") from None
    id2label = config.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise InferenceError(f"--model {model_dir}: config.json: 'id2label' must be an object")
    # bertfit.json names the problem type; a plain save_pretrained folder's config.json may (HF names)
    problem_type = info.get("problem_type") or _PROBLEM_TYPE_OF_HF.get(config.get("problem_type"), "single_label")
    labels = info.get("labels")
    if problem_type == "regression":
        labels = []  # one output, no class names
    elif not labels and id2label and not all(v == f"LABEL_{k}" for k, v in id2label.items()):
        try:
            labels = [str(id2label[str(i)]) for i in range(len(id2label))]
        except KeyError as exc:
            raise InferenceError(f"--model {model_dir}: config.json: 'id2label' has no key {exc}; expected keys "
                                 f"0 to {len(id2label) - 1}") from None
    if not labels and problem_type != "regression":
        raise InferenceError(f"--model {model_dir}: no label maps (no {EXPORT_INFO} and config.json has only "
                             "default LABEL_<n> names); export the model with bertfit's train")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        raise InferenceError(f"--model {model_dir}: cannot load the tokenizer: {first_line(exc)}") from None
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise InferenceError(f"--model {model_dir}: a fast (Rust) tokenizer is required, got "
                             f"{type(tokenizer).__name__}")
    recorded = info.get("tokenizer_fingerprint")
    if recorded:  # exports written before the fingerprint was recorded are taken as they are
        actual = tokenizer_fingerprint(tokenizer)
        if actual != recorded:  # a swapped tokenizer gives other ids: silently different predictions
            raise InferenceError(f"--model {model_dir}: its tokenizer is not the one the model was trained with "
                                 f"(fingerprint {_short(actual)}..., {EXPORT_INFO} records {_short(recorded)}...); "
                                 "restore the export's tokenizer files")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except Exception as exc:
        raise InferenceError(f"--model {model_dir}: cannot load the model: {first_line(exc)}") from None
    if problem_type == "regression" and model.config.num_labels != 1:
        raise InferenceError(f"--model {model_dir}: a regression model needs a classifier with 1 output, this one "
                             f"has {model.config.num_labels}")
    if problem_type != "regression" and len(labels) != model.config.num_labels:
        raise InferenceError(f"--model {model_dir}: {len(labels)} labels in {EXPORT_INFO}, but the classifier has "
                             f"{model.config.num_labels} outputs")
    if info.get("objective") == "document":
        load_document_head(model, path, info, model_dir)
    model.to(torch_device).eval()
    # the same switchboard as training (same logits); padded or packed batches as it says
    speed = apply_speedups(model, speedups or SpeedupsConfig(), model.device, training=False)
    model.bertfit_batch_layout = speed.batch_layout()
    thresholds = info.get("thresholds")
    if problem_type == "multi_label" and thresholds is None:
        thresholds = [0.5] * len(labels)  # the default decision threshold of training's metrics
    info = {**info, "labels": labels, "problem_type": problem_type,
            "pooling": info.get("pooling") or default_pooling(problem_type), "task": info.get("task") or "single",
            "chunking": info.get("chunking"), "thresholds": thresholds, "clean": tuple(info.get("clean") or ()),
            "max_positions": getattr(model.config, "max_position_embeddings", None)}
    return model, tokenizer, info


def load_document_head(model, path: Path, info: dict, model_dir) -> None:
    """A document-objective export: its pooler (document_head.safetensors; safetensors only, nothing unpickled)."""
    from train.document import POOLERS, attach_document_head

    pooler = info.get("doc_pooler")
    if pooler not in POOLERS:
        raise InferenceError(f"--model {model_dir}: {EXPORT_INFO}: doc_pooler {pooler!r} is not one of "
                             f"{', '.join(POOLERS)}")
    try:
        attach_document_head(model, pooler)
    except ValueError as exc:
        raise InferenceError(f"--model {model_dir}: {exc}") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    head = path / DOCUMENT_HEAD
    try:
        weights = load_file(str(head))
        model.bertfit_doc_pooler.load_state_dict(weights, strict=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:  # missing, damaged, or other weights
        raise InferenceError(f"--model {model_dir}: cannot load the document head {head.name}: "
                             f"{first_line(exc)}") from None


@torch.no_grad()
def forward_documents(model, windows: list[list[int]], types: list[list[int]] | None, doc_index: np.ndarray,
                      pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(window logits [windows, labels], document logits [documents, labels] or None). A document-objective
    model encodes the windows batch by batch (across documents: bounded memory for any document length) and
    its document head pools them; any other model gives None, its documents are pooled from window outputs."""
    if not has_document_head(model):
        return forward_windows(model, windows, types, pad_id, batch_size), None
    states = torch.zeros(len(windows), model.config.hidden_size)
    for idx, inputs in window_batches(model, windows, types, pad_id, batch_size):
        states[torch.from_numpy(idx)] = model(**inputs, embeddings_only=True).embeddings.float().cpu()
    ids, inverse = np.unique(np.asarray(doc_index), return_inverse=True)
    window_logits, doc_logits = pool_and_classify(model, states, torch.from_numpy(inverse.reshape(-1)), len(ids))
    return window_logits.float().cpu().numpy(), doc_logits.float().cpu().numpy()


def chunk_settings(tokenizer, info: dict, chunk_size=None, stride=None, max_length=None) -> ChunkSettings:
    """The window settings the model was trained with, with optional overrides."""
    saved = dict(info.get("chunking") or {})
    template = special_token_template(tokenizer)
    positions = info.get("max_positions")
    if max_length is not None:
        if positions is not None and max_length > positions:  # else an index error inside the embeddings
            raise InferenceError(f"--max-length {max_length}: the model has only {positions} positions "
                                 "(max_position_embeddings)")
        saved["max_length"] = max_length
    saved.setdefault("max_length", min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512,
                                       positions or 512))
    if positions is not None and saved["max_length"] > positions:
        raise InferenceError(f"{EXPORT_INFO}: chunking.max_length {saved['max_length']} exceeds the model's "
                             f"{positions} positions (max_position_embeddings); give a smaller --max-length")
    room = saved["max_length"] - template.num_single
    if chunk_size is not None:
        saved["chunk_size"] = chunk_size
        if stride is None and saved.get("stride", chunk_size) > chunk_size:
            saved["stride"] = chunk_size
    saved.setdefault("chunk_size", room)
    if stride is not None:
        saved["stride"] = stride
    saved.setdefault("stride", saved["chunk_size"])
    fields = {k: saved.get(k) for k in ("max_length", "chunk_size", "stride", "min_chunk_tokens",
                                        "max_text_tokens", "max_chunks_per_doc")}
    fields["min_chunk_tokens"] = fields["min_chunk_tokens"] or 1
    settings = ChunkSettings(**fields)
    try:
        settings.check(template.num_single)
    except ValueError as exc:
        raise InferenceError(str(exc)) from None
    return settings


def window_documents(tokenizer, texts: list[str], settings: ChunkSettings, pairs: list[str] | None = None):
    """Windows of a batch of documents: (list of input_ids, list of token_type_ids or None, doc index per
    window). Same tokenizer call and windowing as data_prep, so the windows are identical."""
    template = special_token_template(tokenizer)
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()

    def ids(batch):
        return [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]

    if pairs is None:
        enc = encode_singles(ids(texts), template, settings)
        types = None
    else:
        enc = encode_pairs(ids(texts), ids(pairs), template, settings.max_length)
        t_offsets, t_values = enc.columns["token_type_ids"]
        types = [t_values[t_offsets[i]:t_offsets[i + 1]].tolist() for i in range(len(t_offsets) - 1)]
    offsets, values = enc.columns["input_ids"]
    windows = [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    doc_index = np.repeat(np.arange(len(texts)), enc.doc_windows)
    return windows, types, doc_index


@torch.no_grad()
def forward_windows(model, windows: list[list[int]], types: list[list[int]] | None, pad_id: int,
                    batch_size: int) -> np.ndarray:
    """Logits [windows, labels]."""
    logits = np.zeros((len(windows), model.config.num_labels), dtype=np.float32)
    for idx, inputs in window_batches(model, windows, types, pad_id, batch_size):
        logits[idx] = model(**inputs).logits.float().cpu().numpy()
    return logits


def window_batches(model, windows: list[list[int]], types: list[list[int]] | None, pad_id: int, batch_size: int):
    """(window indices, model inputs) per batch, in the layout the model's speedups expect; windows are sorted by
    length so each batch is padded little."""
    device = next(model.parameters()).device
    order = np.argsort([-len(w) for w in windows], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = {"input_ids": [windows[i] for i in idx], "label": [0] * len(idx), "doc_id": [0] * len(idx),
                "chunk_index": [0] * len(idx)}
        if types is not None:
            rows["token_type_ids"] = [types[i] for i in idx]
        batch = collate_windows(rows, idx, pad_id, **getattr(model, "bertfit_batch_layout", {}))
        yield idx, model_inputs(batch, device)
