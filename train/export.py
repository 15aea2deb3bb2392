"""Export the model as a normal ``save_pretrained`` folder that ``transformers.pipeline`` loads, plus what
bertfit's predict needs beside it (window settings, pooling, labels) and the metrics it was chosen on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

EXPORT_INFO = "bertfit.json"


def export_model(accelerator, model, tokenizer, out_dir: str | Path, info: dict) -> Path:
    """Collective: every rank calls it (under ZeRO-3 the full weights are gathered from all ranks; calling
    this on rank 0 only would deadlock). Rank 0 writes to a temporary folder, then swaps it into place."""
    out = Path(out_dir)
    state_dict = accelerator.get_state_dict(model)  # full, 16-bit-gathered under ZeRO-3
    if accelerator.is_main_process:
        tmp = out.parent / f".{out.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
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


def read_export_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / EXPORT_INFO
    return json.loads(path.read_text()) if path.exists() else {}
