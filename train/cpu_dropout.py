"""Dropout that costs less on CPU: the same Bernoulli masks and 1/(1-p) scaling, drawn faster.

Why: PyTorch draws CPU dropout masks one element at a time (``bernoulli_`` is a serial kernel outside Intel's
MKL path), two 32-bit Mersenne-Twister draws per element; on MiniLM that is ~20% of a CPU training step, most of
it in attention dropout over the (batch, heads, length, length) probabilities. Here one 64-bit draw (torch's
own CPU generator, so ``torch.manual_seed`` and checkpoint RNG state cover it) gives four 16-bit lanes, each
compared with round(p * 65536): a keep mask with drop probability round(p * 65536) / 65536 (0.1 -> 0.1000061),
scaled by the exact inverse of its keep probability so activations stay unbiased. Attention with dropout runs
a few sequences at a time (``BlockedDropoutAttention``) because SDPA's fused CPU kernel cannot do dropout, and its
fallback materialises the whole (batch, heads, L, L) probabilities several times over.

Only training on CPU changes: eval mode, GPUs, and attention that is not plain encoder self-attention
(causal, GQA, position bias, caches) go to the stock code. ``fast_cpu_dropout: false`` turns it off.
"""

from __future__ import annotations

import functools
import math
import platform
from pathlib import Path

import torch
from torch import nn

ATTENTION_NAME = "bertfit_cpu_dropout"
_LANES = 65536  # 16-bit lanes
KERNELS_FLAG = "bertfit_cpu_kernels"  # set on a model's modules by use_fast_cpu_dropout(cpu_kernels_on=True)
KERNEL_SOURCE = Path(__file__).parent / "csrc" / "cpu_dropout.cpp"


def drop_threshold(p: float) -> tuple[int, float]:
    """(t, scale): a lane drops when its unsigned value is < t, t = round(p * 65536); scale = 1 / (1 - t/65536)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    t = int(round(p * _LANES))
    return t, _LANES / (_LANES - t)


def drop_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """A bool mask, True where an element is dropped (probability ~p, see ``drop_threshold``), and the scale
    for the kept ones."""
    t, scale = drop_threshold(p)
    n = math.prod(shape)
    # full 64-bit range: every bit uniform (random_() alone leaves the sign bit 0, biasing the top lane)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return lanes < (t - _LANES // 2), scale  # the lowest t of the 65536 values drop


def keep_of(drop: torch.Tensor) -> torch.Tensor:
    """The uint8 keep mask (1 = kept) of a bool drop mask. Why uint8: ``x.mul_(keep)`` is a vectorized kernel,
    while ``masked_fill_``, ``where`` and ``mul`` with a bool mask are not (7-12x slower on CPU)."""
    return drop.view(torch.uint8) ^ 1


class MaskScale(torch.autograd.Function):
    """x * keep * scale, with keep a uint8 mask; autograd keeps that 1-byte mask (as ``where`` kept a bool)."""

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(scale).mul_(keep)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(ctx.scale).mul_(keep), None, None


class KernelDropout(torch.autograd.Function):
    """Dropout of an fp32 tensor in the C++ kernel: masks with ``drop_threshold``'s probability from the
    counter-based stream of one 64-bit seed (drawn from torch's CPU generator), drawn by all threads, and mask,
    scale and multiply in one pass; autograd keeps the 1-byte mask."""

    @staticmethod
    def forward(ctx, x, p: float):
        threshold, scale = drop_threshold(p)
        out, keep = cpu_kernels().dropout(x.contiguous(), draw_seed(), threshold, scale)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return cpu_kernels().dropout_backward(grad.contiguous(), keep, ctx.scale), None


class FastCPUDropout(nn.Dropout):
    """``nn.Dropout`` with masks from ``drop_mask`` (or ``KernelDropout`` where the model was set up with the C++
    kernels) when training on CPU; stock dropout otherwise.
    A subclass, so code that reads ``.p`` or checks ``isinstance(m, nn.Dropout)`` still works."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if x.dtype == torch.float32 and uses_kernels(self):
            return KernelDropout.apply(x, self.p)
        return MaskScale.apply(x, *keep_mask_for(self, x.shape, self.p))


SCORES_PER_BLOCK = 1 << 20  # 4 MB of fp32 scores: stays in cache, large enough that the Python loop costs little
ONE_BLOCK_SCORES = 4 << 20  # up to 16 MB of scores per layer: the plain math path (it fits in cache as it is)


class BlockedDropoutAttention(torch.autograd.Function):
    """softmax(Q K^T * scaling + mask), ``drop_mask`` dropout, @ V, for (batch, heads, length, head_dim) inputs,
    a block of whole sequences (about ``SCORES_PER_BLOCK`` scores) at a time. ``mask``: None, a float mask to
    add, or a bool mask with True = masked out.

    Why blocks: the whole (batch, heads, L, L) probabilities are ~50 MB per layer for MiniLM at 16 x 256 and every
    pass over them (softmax, mask, matmul, and their backward) runs at memory speed; one sequence's 3 MB stays in
    cache. Why recompute: backward rebuilds a block's probabilities from Q and K (one more matmul) and re-applies
    the saved uint8 keep mask, so autograd keeps 1 byte per score between forward and backward instead of the fp32
    probabilities and their dropped copy (8 bytes)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, p: float, scaling: float):
        out = torch.empty_like(query)
        per_block = max(1, SCORES_PER_BLOCK // (query.shape[1] * query.shape[2] * key.shape[2]))
        keeps = []
        for start in range(0, query.shape[0], per_block):
            blk = slice(start, start + per_block)
            probs = attention_probs(query[blk] * scaling, key[blk], mask, blk)
            drop, scale = drop_mask(probs.shape, p, probs.device)  # block by block, in order: seeded runs repeat
            keeps.append(keep_of(drop))
            torch.matmul(probs.mul_(keeps[-1]), value[blk], out=out[blk])
        ctx.save_for_backward(query, key, value, mask, torch.cat(keeps))
        ctx.scaling, ctx.scale, ctx.per_block = scaling, scale, per_block
        return out.mul_(scale)  # the 1/(1-p) scale on the (L x head_dim) output, not the (L x L) probabilities

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, mask, kept = ctx.saved_tensors
        grad_q, grad_k, grad_v = (torch.empty_like(t) for t in (query, key, value))
        for start in range(0, query.shape[0], ctx.per_block):
            blk = slice(start, start + ctx.per_block)
            scaled_q = query[blk] * ctx.scaling
            probs = attention_probs(scaled_q, key[blk], mask, blk)
            g = grad_out[blk] * ctx.scale
            keep = kept[blk].to(probs.dtype)  # converted once for both uses (mul_ by uint8 converts on each call)
            grad_probs = torch.matmul(g, value[blk].transpose(-1, -2)).mul_(keep)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            torch.matmul(probs.mul_(keep).transpose(-1, -2), g, out=grad_v[blk])
            torch.matmul(grad_scores, key[blk], out=grad_q[blk]).mul_(ctx.scaling)
            torch.matmul(grad_scores.transpose(-1, -2), scaled_q, out=grad_k[blk])
        return grad_q, grad_k, grad_v, None, None, None


def uses_kernels(module: nn.Module) -> bool:
    """Whether ``module`` belongs to a model set up with the C++ kernels (and they loaded)."""
    return getattr(module, KERNELS_FLAG, False) and cpu_kernels() is not None


def keep_mask_for(module: nn.Module, shape, p: float) -> tuple[torch.Tensor, float]:
    """(uint8 keep mask, scale) for dropout outside the kernels: from the kernels' stream where the model uses
    them (so bf16 tensors drop exactly what an fp32 run drops), else from ``drop_mask``."""
    if uses_kernels(module):
        return kernel_keep_mask(shape, p)
    drop, scale = drop_mask(shape, p, "cpu")
    return keep_of(drop), scale


def draw_seed() -> int:
    """One 64-bit seed for the C++ kernels' mask stream, from torch's CPU generator (so manual_seed and the
    checkpointed RNG state decide it)."""
    return int(torch.empty((), dtype=torch.int64).random_(-2**63, None))


@functools.cache
def cpu_kernels():
    """The C++ kernels of ``KERNEL_SOURCE``, compiled with the machine's C++ compiler on first use (~30 s, then
    cached under ``TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions); None, after a one-line note, where
    it cannot be built (no compiler or ninja, not x86-64 with AVX2)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp: at::parallel_for is serial without it (the extension then shares torch's own libgomp);
        # -ffast-math: lets the compiler vectorize expf (glibc's libmvec) and the row reductions
        return load(name="bertfit_cpu_dropout", sources=[str(KERNEL_SOURCE)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-ffast-math", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as e:  # any build failure: the Python path below does the same computation
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        print(f"bertfit: the CPU dropout kernels (train/csrc/{KERNEL_SOURCE.name}) could not be built "
              f"({reason[:200]}); dropout and attention run in Python instead", flush=True)
        return None


def kernel_keep_mask(shape, p: float) -> tuple[torch.Tensor, float]:
    """The uint8 keep mask the C++ kernels draw for a tensor of ``shape`` (one seed from torch's generator, element
    i of the flattened tensor = element i of the stream), and its scale. For the paths the kernels do not run
    (bf16): with the same generator state they drop exactly the elements an fp32 run drops."""
    threshold, scale = drop_threshold(p)
    keep = cpu_kernels().keep_mask(1, 1, 1, math.prod(shape), draw_seed(), threshold)
    return keep.view(shape), scale


def fused_rows_per_block(k_len: int) -> int:
    """Query rows per block in the C++ kernel: two fp32 (rows x k_len) buffers of ~0.5 MB each stay in a core's
    L2 cache (measured on MiniLM at 256 and BERT-base at 512: whole rows of 256 were fastest)."""
    return max(32, min(k_len, (1 << 17) // max(1, k_len)))


class FusedDropoutAttention(torch.autograd.Function):
    """softmax(Q K^T * scaling + mask), dropout, @ V in the C++ kernel, one (sequence, head) per thread at a time,
    a block of query rows in cache through all steps. Returns (batch, length, heads, head_dim), the layout
    transformers wants. Autograd keeps Q, K, V, the mask and one float per query row (the log-sum-exp): backward
    recomputes the probabilities and regenerates the drop mask from the call's seed (one 64-bit draw from torch's
    CPU generator, so seeded runs repeat). Masks: ``drop_threshold``'s probability and scale, from a counter-based
    generator (SplitMix64) instead of ``drop_mask``'s stream. ``mask``: None or float (added)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, p: float, scaling: float):
        threshold, scale = drop_threshold(p)
        seed = draw_seed()
        rows = fused_rows_per_block(key.shape[2])
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        if mask is not None:
            mask = mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            mask = mask if mask.stride(-1) == 1 else mask.contiguous()
        out, lse = cpu_kernels().forward(query, key, value, mask, seed, threshold, scale, scaling, rows)
        ctx.save_for_backward(query, key, value, mask, lse)
        ctx.args = (seed, threshold, scale, scaling, rows)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, mask, lse = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        grads = cpu_kernels().backward(grad_out, query, key, value, mask, lse, *ctx.args)
        return (*grads, None, None, None)


def attention_probs(scaled_q, key, mask, blk):
    """softmax(scaled_q @ key^T + mask) for the sequences ``blk`` of a batch; ``mask``: None, float (added) or
    bool (True = masked out)."""
    scores = torch.matmul(scaled_q, key.transpose(-1, -2))
    if mask is not None:
        mask = mask[blk] if mask.shape[0] > 1 else mask
        if mask.dtype == torch.bool:
            scores.masked_fill_(mask, torch.finfo(scores.dtype).min)
        else:
            scores.add_(mask)
    return torch.softmax(scores, dim=-1)


def dropout_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """A transformers attention function (same signature and output layout as ``sdpa_attention_forward``) for
    encoder self-attention training on CPU: fp32 layers go to ``FusedDropoutAttention`` where the model was set up
    with the C++ kernels and they load, else ``BlockedDropoutAttention`` for layers of more than ``ONE_BLOCK_SCORES``
    scores; the plain math otherwise (bf16 autocast, small layers); anything else goes to sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = (dropout > 0.0 and query.device.type == "cpu" and getattr(module, "num_key_value_groups", 1) == 1
             and not (q_len > 1 and attention_mask is None and causal)
             and kwargs.get("position_bias") is None and kwargs.get("cache") is None
             and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)
             and key.shape[2] == q_len and (attention_mask is None or attention_mask.dim() == 4))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        # transformers: True = attend. Made additive once per layer (0 or the dtype's min): per block, add_ of a
        # float mask is a vectorized kernel, masked_fill_ with a bool mask is not (about 6x slower on CPU).
        attention_mask = attention_mask.view(torch.uint8).to(query.dtype).sub_(1).mul_(torch.finfo(query.dtype).max)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    fp32 = query.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    if fp32 and uses_kernels(module):
        return FusedDropoutAttention.apply(query, key, value, attention_mask, dropout, scaling), None
    if fp32 and query.shape[0] * query.shape[1] * q_len * q_len > ONE_BLOCK_SCORES:
        out = BlockedDropoutAttention.apply(query, key, value, attention_mask, dropout, scaling)
    else:  # small enough to stay in cache whole, or bf16 autocast: plain math, autograd keeps the probabilities
        probs = attention_probs(query * scaling, key, attention_mask, slice(None))
        out = torch.matmul(MaskScale.apply(probs, *keep_mask_for(module, probs.shape, dropout)), value)
    return out.transpose(1, 2).contiguous(), None


def use_fast_cpu_dropout(model: nn.Module, cpu_kernels_on: bool = True) -> int:
    """Swap every ``nn.Dropout`` in ``model`` for ``FastCPUDropout`` (same p) and, where the model takes a
    transformers attention function, route its sdpa attention through ``dropout_attention``; both use the C++
    kernels if ``cpu_kernels_on`` and they build (built here, before training starts). Returns how many
    modules changed. No parameters or buffers change, so checkpoints and exports are unaffected (the attention
    setting lives in ``model.config`` only; ``save_pretrained`` does not write it to config.json)."""
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastCPUDropout(child.p))
                changed += 1
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation"):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, dropout_attention)
        # without a mask function of its own a registered name gets NO padding mask from transformers
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        try:
            model.set_attn_implementation(ATTENTION_NAME)
        except (ValueError, TypeError):  # architectures that do not take registered attention functions
            pass
    kernels = cpu_kernels_on and cpu_kernels() is not None
    for module in model.modules():
        setattr(module, KERNELS_FLAG, kernels)
    return changed

