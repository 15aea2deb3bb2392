"""The speed switchboard: every optional change to the model or the process for speed is applied here, once.

The loop, ``evaluate``, ``predict``, the Python API and the benches call ``apply_speedups`` and nothing else
names a speed trick. Each switch is in the run config's ``speedups:`` block; ``auto`` resolves per device to what
the measurements in docs/benchmarks.md found fastest, and the run prints one line saying what was applied. Every
switch off = the stock transformers model in a plain loop.

  compile              torch.compile (inductor) of the model's forward (+ backward), train and inference; batch
                       widths padded to a multiple of ``compile_bucket`` so recompiles stay bounded
  packing              padding-free batches (train/packing.py): windows end to end, block-diagonal mask, or torch's
                       varlen FlashAttention on CUDA under bf16/fp16
  cls_only_last_layer  the last encoder layer computed for the first token only (train/last_layer.py)
  cpu_dropout          CPU: stock PyTorch dropout, or bertfit's kernels (train/cpu_dropout.py, train/csrc/)
  keep_freed_memory    CPU + glibc: keep freed memory for reuse instead of page-faulting it back (train/malloc.py)

None of them changes a parameter, a checkpoint or an export: they are instance attributes (a forward, a compiled
call) and process settings, so a model trained with them loads and predicts the same without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

Auto = Literal["auto"]


@dataclass
class SpeedupsConfig:
    compile: Union[bool, Auto] = "auto"
    """torch.compile (inductor) the model for training and inference. auto = on CUDA (not under DeepSpeed
    ZeRO-3), off on CPU (measured there: 0.79x the eager step rate, plus ~8 s of compile with a warm inductor
    cache and ~110 s with a cold one; docs/benchmarks.md)."""
    compile_bucket: int = 64
    """Under compile: pad each batch's width (or a packed batch's total length) up to a multiple of this, so a
    run compiles a bounded number of shapes (the count is printed at the end)."""
    packing: Union[bool, Auto] = "auto"
    """Padding-free batches: a micro-batch's windows end to end, attention kept inside each window (varlen
    FlashAttention on CUDA under bf16/fp16, a block-diagonal mask elsewhere); same logits and losses as padded
    batches. auto = on CUDA, off on CPU (there the block-diagonal mask spans the whole packed row: measured
    0.10x the padded step rate and ~14 GiB at 16 MiniLM windows of 256 tokens; docs/benchmarks.md).
    Models that cannot be packed (e.g. DeBERTa) use padded batches with a notice. Under varlen attention the
    attention-probability dropout is not applied (the kernel has none)."""
    cls_only_last_layer: Union[bool, Auto] = "auto"
    """Run the encoder's last layer for the first token only (the classifier reads nothing else): same logits,
    ~1/7 fewer FLOPs on 6 layers (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA). auto = on with padded batches;
    not combined with packing."""
    cpu_dropout: Literal["auto", "stock", "kernels"] = "auto"
    """Training on CPU: stock = PyTorch's dropout and attention; kernels = dropout masks drawn 4 per random
    number and attention with dropout fused, C++ kernels of train/csrc (built with the machine's compiler on
    first use, ~30 s; where they cannot be built, the same computation in Python). auto = kernels unless
    compile or packing is on (they would break the compiled graph / do not take a block mask)."""
    keep_freed_memory: Union[bool, Auto] = "auto"
    """CPU + glibc: keep freed memory for reuse (no page faults for the same activation buffers every step).
    auto = on when training on CPU (never in evaluate/predict/the Python API: it is a process-wide setting)."""


@dataclass
class Speedups:
    """What ``apply_speedups`` did: the names it applied, notices, and how batches must be laid out for it."""

    applied: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    packing: bool = False
    pad_multiple: Optional[int] = None  # pad batch widths (or packed lengths) up to a multiple of this
    compiled_model: object = None

    def batch_layout(self) -> dict:
        """Keyword arguments for train/data.py's WindowBatches / collate."""
        return {"packed": self.packing, "pad_to_multiple_of": self.pad_multiple}

    def summary(self) -> str:
        return "bertfit: speedups: " + (", ".join(self.applied) or "none")

    def compiled_shapes(self) -> Optional[str]:
        """One line on how many batch shapes the compiled model met and how many graphs dynamo built."""
        if self.compiled_model is None:
            return None
        shapes = getattr(self.compiled_model, "_bertfit_shapes", set())
        try:
            from torch._dynamo.utils import counters

            graphs = counters["stats"]["unique_graphs"]
        except Exception:  # private counters: informative only
            graphs = "?"
        return f"bertfit: compile: {len(shapes)} batch shapes met, {graphs} graphs compiled"


class SpeedupsError(ValueError):
    """A combination of speedups that cannot work; one line naming the settings."""


def _on(value, default: bool) -> bool:
    return default if value == "auto" else bool(value)


def apply_speedups(model, cfg: SpeedupsConfig, device, *, mixed_precision: str = "no", zero_stage: int | None = None,
                   training: bool = True) -> Speedups:
    """Apply the switched-on speedups to ``model`` (in place, before any wrapping by DDP/DeepSpeed) and the
    process; returns what was applied and the batch layout the model now expects."""
    import torch

    cuda, cpu = device.type == "cuda", device.type == "cpu"
    result = Speedups()

    # resolve the switches (auto = what docs/benchmarks.md measured fastest on this device)
    compile_on = _on(cfg.compile, cuda and zero_stage != 3)
    if compile_on and zero_stage == 3:
        raise SpeedupsError("speedups.compile: true is not supported under DeepSpeed ZeRO-3 (its parameter hooks "
                            "break the compiled graph); set speedups.compile: false or use ZeRO-1/2")
    packing_on = _on(cfg.packing, cuda)
    if packing_on:
        from train.packing import packing_problem

        if problem := packing_problem(model):
            if cfg.packing is True:
                result.notices.append(f"bertfit: packing: not for this model ({problem}); padded batches instead")
            packing_on = False
    if cfg.cls_only_last_layer is True and packing_on:
        raise SpeedupsError("speedups.cls_only_last_layer: true cannot be combined with packing (the last layer "
                            "would read one window per row); set one of them to false or auto")
    cls_only_on = _on(cfg.cls_only_last_layer, True) and not packing_on
    if cfg.cpu_dropout == "kernels" and (compile_on or packing_on):
        raise SpeedupsError("speedups.cpu_dropout: kernels cannot be combined with compile or packing (C++ ops "
                            "break the compiled graph and take no block mask); set cpu_dropout: stock or auto")
    kernels_on = cpu and training and (cfg.cpu_dropout == "kernels" or (
        cfg.cpu_dropout == "auto" and not compile_on and not packing_on))
    malloc_on = cpu and training and _on(cfg.keep_freed_memory, True)  # a process setting: not in a host app

    # apply them, model first, then the process
    if kernels_on:
        from train.cpu_dropout import cpu_kernels, use_fast_cpu_dropout

        use_fast_cpu_dropout(model, cpu_kernels_on=True)  # PyTorch's CPU dropout sampler is ~20% of a step
        result.applied.append("cpu_dropout kernels" if cpu_kernels() is not None else "cpu_dropout (Python blocks)")
    if cls_only_on:
        from train.last_layer import cls_only_last_layer

        if cls_only_last_layer(model):
            result.applied.append("cls_only_last_layer")
    if packing_on:
        from train.packing import enable_packed_inputs, torch_varlen_problem, use_varlen_attention

        enable_packed_inputs(model)
        varlen = cuda and mixed_precision in ("bf16", "fp16")
        if varlen and (missing := torch_varlen_problem()):
            result.notices.append(f"bertfit: packing: {missing}; the block-diagonal mask instead")
            varlen = False
        if varlen:
            use_varlen_attention(model)  # FlashAttention kernels take half precision only
            result.applied.append("packing (varlen FlashAttention)")
            dropout = max((getattr(model.config, k, 0.0) or 0.0)
                          for k in ("attention_probs_dropout_prob", "attention_dropout"))
            if training and dropout > 0:
                result.notices.append(f"bertfit: packing: the varlen attention kernel applies no attention "
                                      f"dropout (the model's is {dropout}); other dropout unchanged")
        else:
            result.applied.append("packing (block-diagonal mask)")
        result.packing = True
    if compile_on:
        track_shapes(model)
        # bucketed widths x batch sizes x train/eval: more shapes than dynamo's default limit of 8 recompiles
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.7's name
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
        model.compile()  # in place: state_dict keys, checkpoints and exports stay as they are (no _orig_mod.)
        result.compiled_model = model
        result.pad_multiple = cfg.compile_bucket
        result.applied.append(f"compile (inductor, widths padded to x{cfg.compile_bucket})")
    elif cuda:
        result.pad_multiple = 8  # tensor-core friendly shapes
    if malloc_on:
        from train.malloc import keep_freed_memory

        if keep_freed_memory():  # glibc: no page faults for the same activation buffers every step
            result.applied.append("keep_freed_memory")
    return result


def track_shapes(model) -> None:
    """Record the input shapes the (compiled) model meets, for the compiled-shapes line."""
    import torch

    model._bertfit_shapes = set()

    @torch.compiler.disable  # runs eagerly, before the compiled forward (no graph break inside it)
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            module._bertfit_shapes.add((tuple(ids.shape), module.training))

    model.register_forward_pre_hook(hook, with_kwargs=True)
