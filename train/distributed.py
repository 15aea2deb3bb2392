"""The Accelerator, set up the same way whatever the launcher: CPU processes, GPUs, DDP or DeepSpeed.

Facts this relies on (checked, see docs/distributed.md and tests/test_distributed.py):
- on a CPU-only machine `accelerate launch --multi_gpu` needs cpu=True to form one gloo process group;
- DeepSpeed on CPU needs the gloo backend named explicitly;
- with a custom batch sampler Accelerate cannot infer DeepSpeed's micro-batch size, and its "auto"
  gradient_clipping becomes 1.0 whatever the run says; both are filled here from the run config;
- under DeepSpeed `accelerator.backward` runs the engine's step (clip, optimizer step, zero_grad) at the
  accumulation boundary, with the LR the loop wrote into optimizer.param_groups before the step's micro-batches.
"""

from __future__ import annotations

import atexit
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from train.config import ConfigError, TrainConfig, trackers


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    has_gpu = torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and not has_gpu:
        raise ConfigError("mixed_precision fp16 needs a GPU; use bf16 (or no) on CPU")
    backend = "nccl" if has_gpu else "gloo"
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs"))
    kwargs = {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a backend given to a lone process makes it wait for peers
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=backend,
                                                            timeout=timedelta(seconds=cfg.dist_timeout_s))]
    if cfg.mixed_precision is not None:
        kwargs["mixed_precision"] = cfg.mixed_precision
    accelerator = Accelerator(
        cpu=not has_gpu and not uses_deepspeed(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers(cfg) or None,
        project_config=project,
        **kwargs,
    )
    honour_zero3_init_flag(accelerator)
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def single_process_zero_hint(accelerator) -> str | None:
    """A one-line hint when DeepSpeed runs as one process: ZeRO then shards nothing and saves no memory, and its
    engine costs time (a zero2.yaml copied to a one-GPU box is a common way to get here)."""
    if is_deepspeed(accelerator) and accelerator.num_processes == 1:
        return ("bertfit: DeepSpeed ZeRO with 1 process shards nothing and saves no memory; on one GPU "
                "single_gpu.yaml trained BERT-base 2-7x faster (docs/benchmarks.md, GPU section)")
    return None


def honour_zero3_init_flag(accelerator) -> None:
    """With ``zero3_init_flag: false``, let ``from_pretrained`` load whole weights, as under DDP.

    Accelerate registers its DeepSpeed config with transformers whatever the flag says, so under ZeRO-3
    ``from_pretrained`` would still build the model inside ``deepspeed.zero.Init`` (parameters partitioned at
    load) and record every legacy weight renaming as used, which makes ``save_pretrained`` write
    ``LayerNorm.gamma``/``beta`` instead of ``weight``/``bias``. Without zero.Init each rank holds the full model
    in host memory until ``accelerator.prepare`` partitions it: fine for encoders; set the flag to true for
    models that do not fit in one process's memory."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3 or plugin.zero3_init_flag:
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _fill(ds_config: dict, key: str, value, setting: str) -> None:
    current = ds_config.get(key, "auto")
    if current == "auto":
        ds_config[key] = value
    elif current != value:
        raise ConfigError(f"DeepSpeed config sets {key}={current} but the run config has {setting}={value}; "
                          f"set {key} to \"auto\" in the DeepSpeed JSON (the run config decides)")


def configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """Fill the DeepSpeed config from the run config before ``accelerator.prepare``."""
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.per_device_batch_size, "per_device_batch_size")
    _fill(ds, "gradient_accumulation_steps", cfg.gradient_accumulation_steps, "gradient_accumulation_steps")
    _fill(ds, "gradient_clipping", float(cfg.max_grad_norm or 0.0), "max_grad_norm")
    ds["train_batch_size"] = (cfg.per_device_batch_size * cfg.gradient_accumulation_steps
                              * accelerator.num_processes)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"the DeepSpeed config defines an {section}; bertfit uses torch AdamW and its own "
                              f"LR schedule, remove the \"{section}\" section")
    # Keep torch AdamW under CPU offload unless the config asks for DeepSpeed's own CPU Adam.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") == 3:  # the best-model export gathers full 16-bit weights from every rank
        gather = zero.get("stage3_gather_16bit_weights_on_model_save", "auto")
        if gather is False:
            raise ConfigError("the DeepSpeed config sets zero_optimization.stage3_gather_16bit_weights_on_model_save "
                              "to false; bertfit's best-model export needs it true under ZeRO-3")
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this run, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None and is_deepspeed(accelerator) else None


def exit_without_teardown(code: int):
    """End a trainer process with ``code`` once its run is over: atexit handlers run and output is flushed, then
    the process exits without tearing the interpreter down.

    Why: DDP keeps its process group alive after ``destroy_process_group`` (torch 2.13: the gloo threads are
    still running once the DDP model is freed and collected; a plain process group's are not), so the
    interpreter's teardown races those threads. Once in a while (seen once, in a full CI run) that aborted a
    rank that had finished its run ("terminate called without an active exception", SIGABRT), and torchrun
    and SLURM then count the finished run as failed. Everything the run writes is closed before this point."""
    try:
        atexit._run_exitfuncs()  # what a normal exit runs first: logging.shutdown, weakref finalizers, ...
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):  # a closed pipe or stream: nothing left to save
                pass
        os._exit(code)
