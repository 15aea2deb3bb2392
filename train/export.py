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


def read_export_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / EXPORT_INFO
    return json.loads(path.read_text()) if path.exists() else {}
