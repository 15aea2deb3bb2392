"""Export the model as a normal ``save_pretrained`` folder that ``transformers.pipeline`` loads, plus what
bertfit's predict needs beside it (window settings, pooling, labels) and the metrics it was chosen on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from train.evaluation import PROBLEM_TYPES, allowed_poolings

EXPORT_INFO = "bertfit.json"
DOCUMENT_HEAD = "document_head.safetensors"  # objective: document: the pooler's weights (config in bertfit.json)


# bertfit's problem types and the names transformers uses for them in config.json: ``pipeline`` picks
# softmax / sigmoid / identity from ``config.problem_type``.
HF_PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}
REGRESSION_OUTPUT = "value"  # the single output's name in config.json's id2label


def export_model(accelerator, model, tokenizer, out_dir: str | Path, info: dict,
                 output_scale: tuple[float, float] | None = None) -> Path:
    """Collective: every rank calls it (under ZeRO-3 the full weights are gathered from all ranks; calling
    this on rank 0 only would deadlock). Rank 0 writes to a temporary folder, then swaps it into place.

    output_scale = (mean, std): a regression model trained on standardised targets; the export's final head
    layer is rescaled so the saved model outputs raw values (the live model is left as it is)."""
    out = Path(out_dir)
    state_dict = accelerator.get_state_dict(model)  # full, 16-bit-gathered under ZeRO-3 (None on ranks > 0)
    if accelerator.is_main_process:
        tmp = out.parent / f".{out.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        dtype = export_dtype(unwrapped)
        if output_scale is not None:
            state_dict = fold_output_scale(unwrapped, state_dict, *output_scale)
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        state_dict, pooler = split_document_pooler(state_dict)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if info.get("objective") == "document":  # beside the encoder: pipeline() loads the folder as before
            from safetensors.torch import save_file

            tmp.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in pooler.items()}, str(tmp / DOCUMENT_HEAD),
                      metadata={"doc_pooler": str(info.get("doc_pooler"))})
        _set_config_dtype(unwrapped, tmp, dtype)
        _set_config_task(tmp, info)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(info.get("metrics", {}), indent=2) + "\n")
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(info.get("config", {}), sort_keys=False))
        from train.model_card import write_model_card  # imports this module: a top-level import would be circular

        write_model_card(tmp)  # README.md: the Hub's model card, from the bertfit.json just written
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


def split_document_pooler(state_dict: dict) -> tuple[dict, dict]:
    """(the encoder + head's state, the document pooler's own parameters without their prefix)."""
    from train.document import POOLER_ATTRIBUTE

    prefix = POOLER_ATTRIBUTE + "."
    pooler = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}, pooler


def output_layer_name(model) -> str:
    """The module name of the classification head's final Linear (``classifier`` for BERT/DistilBERT/DeBERTa/
    ModernBERT, ``classifier.out_proj`` for RoBERTa/XLM-R/ELECTRA): the last Linear outside the encoder whose
    out_features is num_labels. Reads module attributes, not weight shapes (ZeRO-3 partitions the weights)."""
    base = getattr(model, "base_model_prefix", "") or ""
    num_labels = model.config.num_labels
    found = None
    for name, module in model.named_modules():
        if (base and (name == base or name.startswith(base + "."))) or name.startswith("bertfit_doc_pooler"):
            continue  # the encoder; the document pooler's scorer (train/document.py) is not the output layer
        if isinstance(module, torch.nn.Linear) and module.out_features == num_labels:
            found = name
    if found is None:
        raise ValueError(f"no Linear layer with {num_labels} output(s) in the classification head of "
                         f"{type(model).__name__}")
    return found


def fold_output_scale(model, state_dict: dict, mean: float, std: float) -> dict:
    """A copy of ``state_dict`` whose final head layer outputs ``mean + std * output``: W*std and b*std + mean.
    The two folded tensors are float64; the tensors of ``state_dict`` (on one process, the live parameters
    themselves) are not modified."""
    if model.config.num_labels != 1:
        raise ValueError(f"output_scale applies to a one-output regression head, the model has "
                         f"{model.config.num_labels} outputs")
    layer = output_layer_name(model)
    weight, bias = f"{layer}.weight", f"{layer}.bias"
    if weight not in state_dict or bias not in state_dict:
        raise ValueError(f"output_scale: the state dict has no {weight} and {bias} (a head without a bias cannot "
                         "add the target mean)")
    folded = dict(state_dict)
    # left in float64: export_model casts them to the export's dtype (a 16-bit round trip here would lose bits)
    folded[weight] = state_dict[weight].double() * float(std)
    folded[bias] = state_dict[bias].double() * float(std) + float(mean)
    return folded


def _set_config_task(folder: Path, info: dict) -> None:
    """config.json's ``problem_type`` and label maps, so ``transformers.pipeline`` applies softmax (one label),
    sigmoid (multi-label) or nothing (regression) and names the outputs as bertfit does."""
    if "labels" not in info:
        return
    problem_type = info.get("problem_type", "single_label")
    names = [REGRESSION_OUTPUT] if problem_type == "regression" else list(info["labels"])
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["problem_type"] = HF_PROBLEM_TYPES[problem_type]
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
    problem_type = info.get("problem_type", "single_label")  # exports without the key are single-label
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"{EXPORT_INFO}: 'problem_type' must be one of {', '.join(PROBLEM_TYPES)}, got "
                         f"{json.dumps(problem_type)[:80]}")
    labels = info["labels"]
    # a regression model has one output and no class names: [] (or one name)
    allowed_counts = "at most one" if problem_type == "regression" else "a non-empty"
    if (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels)
            or (len(labels) > 1 if problem_type == "regression" else not labels)):
        raise ValueError(f"{EXPORT_INFO}: 'labels' must be {allowed_counts} list of distinct strings, got "
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
    choices = {"pooling": allowed_poolings(problem_type), "task": ("single", "pair")}
    for key, allowed in choices.items():
        if info.get(key) is not None and info[key] not in allowed:  # null: the problem type's default
            what = f" for a {problem_type} model" if key == "pooling" and problem_type != "single_label" else ""
            raise ValueError(f"{EXPORT_INFO}: {key!r} must be one of {', '.join(allowed)}{what}, got "
                             f"{json.dumps(info[key])[:80]}")
    thresholds = info.get("thresholds")
    if thresholds is not None:
        if (problem_type != "multi_label" or not isinstance(thresholds, list) or len(thresholds) != len(labels)
                or not all((_is_int(t) or isinstance(t, float)) and 0.0 <= t <= 1.0 for t in thresholds)):
            want = (f"null or a list of {len(labels)} numbers in [0, 1] (one per label)"
                    if problem_type == "multi_label" else f"null for a {problem_type} model")
            raise ValueError(f"{EXPORT_INFO}: 'thresholds' must be {want}, got {json.dumps(thresholds)[:80]}")
    clean = info.get("clean")
    if clean is not None:
        from data_prep.clean import CLEAN_STEPS

        if not isinstance(clean, list) or not all(isinstance(step, str) and step in CLEAN_STEPS for step in clean):
            raise ValueError(f"{EXPORT_INFO}: 'clean' must be a list of cleaning steps ({', '.join(CLEAN_STEPS)}), "
                             f"got {json.dumps(clean)[:80]}")
    target = info.get("target")
    if target is not None and not isinstance(target, dict):
        raise ValueError(f"{EXPORT_INFO}: 'target' must be an object, got {_json_type(target)}")
    fingerprint = info.get("tokenizer_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ValueError(f"{EXPORT_INFO}: 'tokenizer_fingerprint' must be a string, got {_json_type(fingerprint)}")
    return info
