"""Export the model as a normal ``save_pretrained`` folder that ``transformers.pipeline`` loads, plus what
bertfit's predict needs beside it (window settings, pooling, labels) and the metrics it was chosen on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

EXPORT_INFO = "bertfit.json"


def export_model(accelerator, model, tokenizer, out_dir: str | Path, info: dict) -> Path:
    """Collective: every rank calls it (under ZeRO-3 the full weights are gathered from all ranks; calling
    this on rank 0 only would deadlock). Rank 0 writes to a temporary folder, then swaps it into place."""
    out = Path(out_dir)
    state_dict = accelerator.get_state_dict(model)  # full, 16-bit-gathered under ZeRO-3 (None on ranks > 0)
    if accelerator.is_main_process:
        tmp = out.parent / f".{out.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        dtype = export_dtype(unwrapped)
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        _set_config_dtype(unwrapped, tmp, dtype)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(info.get("metrics", {}), indent=2) + "\n")
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(info.get("config", {}), sort_keys=False))
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


def export_dtype(model) -> torch.dtype:
    """The dtype the export is written in: the one the model's config names (what ``from_pretrained`` loaded,
    float32 for most encoder checkpoints), float32 if it names none. Under DeepSpeed bf16/fp16 the engine holds
    16-bit weights and the gathered state dict is 16-bit; it is upcast exactly, so the export holds the weights
    that were evaluated, in the dtype the pretrained model came in."""
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _set_config_dtype(model, folder: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` writes the dtype of the live parameters into config.json (bfloat16 under a DeepSpeed
    bf16 engine) and into ``model.config``; make both name the dtype the tensors were written in."""
    name = str(dtype).removeprefix("torch.")
    model.config.dtype = dtype
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("dtype") != name:
        config["dtype"] = name
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Window settings an export must record: without them predict would window differently than training did.
_REQUIRED_CHUNKING = ("max_length", "chunk_size", "stride")
_OPTIONAL_CHUNKING = ("min_chunk_tokens", "max_text_tokens", "max_chunks_per_doc")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; ValueError with a one-line reason (file name, what is wrong)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path.name} is not UTF-8 text (byte offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    if not isinstance(value, dict):
        raise ValueError(f"{path.name}: expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_export_info(model_dir: str | Path) -> dict:
    """The export's bertfit.json ({} if the folder has none), checked field by field so that a damaged file
    is one error naming the key rather than a KeyError/TypeError deep inside predict. Raises ValueError."""
    path = Path(model_dir) / EXPORT_INFO
    if not path.exists():
        return {}
    info = read_json_object(path)
    for key in ("labels", "chunking"):
        if key not in info:
            raise ValueError(f"{EXPORT_INFO}: missing key {key!r}")
    labels = info["labels"]
    if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
            or len(set(labels)) != len(labels)):
        raise ValueError(f"{EXPORT_INFO}: 'labels' must be a non-empty list of distinct strings, got "
                         f"{_json_type(labels) if not isinstance(labels, list) else json.dumps(labels)[:80]}")
    chunking = info["chunking"]
    if not isinstance(chunking, dict):
        raise ValueError(f"{EXPORT_INFO}: 'chunking' must be an object, got {_json_type(chunking)}")
    for key in _REQUIRED_CHUNKING + _OPTIONAL_CHUNKING:
        value = chunking.get(key)
        if value is None and key in _OPTIONAL_CHUNKING:
            continue
        if value is None and key not in chunking:
            raise ValueError(f"{EXPORT_INFO}: missing key 'chunking.{key}'")
        if not _is_int(value) or value < 1:
            raise ValueError(f"{EXPORT_INFO}: 'chunking.{key}' must be a positive integer, got {json.dumps(value)}")
    choices = {"pooling": ("mean", "max"), "task": ("single", "pair")}
    for key, allowed in choices.items():
        if key in info and info[key] not in allowed:
            raise ValueError(f"{EXPORT_INFO}: {key!r} must be one of {', '.join(allowed)}, got {json.dumps(info[key])}")
    fingerprint = info.get("tokenizer_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ValueError(f"{EXPORT_INFO}: 'tokenizer_fingerprint' must be a string, got {_json_type(fingerprint)}")
    return info
