"""The fast CPU dropout draws Bernoulli(p) masks with the right rate, scales kept values by the exact inverse
keep probability, and leaves attention math, eval mode and the saved model exactly as the stock code has them."""

import json
import math

import pytest
import torch
from torch import nn

from train import cpu_dropout
from train.cpu_dropout import ATTENTION_NAME, FastCPUDropout, drop_mask, drop_threshold, dropout_attention, \
    use_fast_cpu_dropout


def within_binomial(count: int, n: int, p: float, sigmas: float = 6.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_threshold_and_scale():
    t, scale = drop_threshold(0.1)
    assert t == 6554 and scale == pytest.approx(1 / (1 - 6554 / 65536), rel=1e-12)
    assert drop_threshold(0.0) == (0, 1.0)
    with pytest.raises(ValueError, match="1.0"):
        drop_threshold(1.0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_drop_rate_per_lane(p):
    torch.manual_seed(0)
    n = 1 << 22
    drop, _ = drop_mask((n,), p, "cpu")
    p_eff = drop_threshold(p)[0] / 65536
    assert within_binomial(int(drop.sum()), n, p_eff)
    # each of the four 16-bit lanes of a 64-bit draw (a biased sign bit would skew lane 3)
    for lane in range(4):
        assert within_binomial(int(drop[lane::4].sum()), n // 4, p_eff), lane
    # neighbours are independent: P(both dropped) = p^2
    assert within_binomial(int((drop[:-1] & drop[1:]).sum()), n - 1, p_eff * p_eff)


def test_masks_follow_torch_seed_and_odd_sizes():
    torch.manual_seed(3)
    a, _ = drop_mask((7, 5, 3), 0.2, "cpu")  # 105 elements: not a multiple of 4
    torch.manual_seed(3)
    b, _ = drop_mask((7, 5, 3), 0.2, "cpu")
    c, _ = drop_mask((7, 5, 3), 0.2, "cpu")
    assert a.shape == (7, 5, 3) and torch.equal(a, b) and not torch.equal(b, c)
    assert not drop_mask((1000,), 0.0, "cpu")[0].any()


def test_dropout_module_values_gradient_and_eval():
    layer = FastCPUDropout(0.25)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.25
    x = torch.rand(64, 512) + 0.5
    x.requires_grad_(True)
    torch.manual_seed(1)
    y = layer(x)
    _, scale = drop_threshold(0.25)
    kept = y != 0
    assert torch.allclose(y[kept], x.detach()[kept] * scale)
    assert within_binomial(int((~kept).sum()), kept.numel(), 0.25)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * scale)
    layer.eval()
    assert torch.equal(layer(x), x)
    big = torch.ones(2000, 2000)
    assert FastCPUDropout(0.1).train()(big).mean().item() == pytest.approx(1.0, abs=3e-3)  # unbiased


def drop_nothing(shape, p, device):
    """Stands in for ``drop_mask``: keep everything, scale 1."""
    return torch.zeros(shape, dtype=torch.bool), 1.0


def recording(draw, masks: list):
    """Stands in for ``drop_mask``: calls ``draw`` and appends each mask it returns to ``masks``."""
    def recorded(shape, p, device):
        drop, scale = draw(shape, p, device)
        masks.append(drop)
        return drop, scale
    return recorded


def qkv(seed=0, b=3, h=4, length=9, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_attention_math_equals_sdpa_when_nothing_is_dropped(monkeypatch, mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv()
    mask = None
    if mask_kind != "none":
        keep = torch.ones(3, 1, 9, 9, dtype=torch.bool)
        keep[0, ..., 6:] = False  # padding at the end of the first sequence
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = nn.Module()
    module.is_causal = False
    reference, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    # the dropout path with a mask that drops nothing and scale 1 must be sdpa's math exactly
    monkeypatch.setattr(cpu_dropout, "drop_mask", drop_nothing)
    ours, _ = dropout_attention(module, q, k, v, mask, dropout=0.1, scaling=0.3)
    assert ours.shape == reference.shape == (3, 9, 4, 8)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_attention_drops_probabilities_and_rescales(monkeypatch):
    q, k, v = qkv(1)
    module = nn.Module()
    module.is_causal = False

    def drop_first_key(shape, p, device):  # nobody attends to position 0
        drop = torch.zeros(shape, dtype=torch.bool)
        drop[..., 0] = True
        return drop, 2.0

    monkeypatch.setattr(cpu_dropout, "drop_mask", drop_first_key)
    ours, _ = dropout_attention(module, q, k, v, None, dropout=0.5, scaling=None)
    drop = drop_first_key((3, 4, 9, 9), 0.5, "cpu")[0]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = (probs.masked_fill(drop, 0.0) @ v * 2.0).transpose(1, 2)
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("per_block", [1, 2, 3])
def test_blocked_attention_gradients_match_autograd(monkeypatch, per_block, mask_kind):
    """Backward recomputes the probabilities and re-applies the saved masks: its gradients must be autograd's
    through the plain math with the same masks (float64, transformers' transposed layout, a padding mask)."""
    b, h, length, d = 3, 4, 11, 8
    g = torch.Generator().manual_seed(5)
    # (batch, length, heads, head_dim) viewed as (batch, heads, length, head_dim), as transformers does
    q, k, v = (torch.randn(b, length, h, d, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
               for _ in range(3))
    keep = torch.ones(b, 1, length, length, dtype=torch.bool)
    keep[1, ..., 7:] = False
    masks = []
    monkeypatch.setattr(cpu_dropout, "drop_mask", recording(drop_mask, masks))
    monkeypatch.setattr(cpu_dropout, "SCORES_PER_BLOCK", per_block * h * length * length)
    monkeypatch.setattr(cpu_dropout, "ONE_BLOCK_SCORES", 0)  # this small layer would otherwise take the math path
    module = nn.Module()
    module.is_causal = False
    q32, k32, v32 = (t.float().detach().requires_grad_(True) for t in (q, k, v))
    assert dropout_attention(module, q32, k32, v32, keep, dropout=0.3, scaling=0.4)[0].shape == (b, length, h, d)
    blocks = -(-b // per_block)
    assert len(masks) == blocks  # the fp32 CPU training call took the blocked path
    masks.clear()
    mask = ~keep if mask_kind == "bool" else torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -1e300)
    out = cpu_dropout.BlockedDropoutAttention.apply(q, k, v, mask, 0.3, 0.4)
    assert len(masks) == blocks and sum(len(m) for m in masks) == b and masks[0].shape[1:] == (h, length, length)
    assert any(m.any() for m in masks)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    scale = drop_threshold(0.3)[1]
    scores = (q * 0.4) @ k.transpose(-1, -2)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    expected = probs.masked_fill(torch.cat(masks), 0.0) @ v * scale
    assert torch.allclose(out, expected, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (q, k, v))):
        assert torch.allclose(got, want, atol=1e-10)
    assert grads[1][1, :, 7:].abs().max() == 0 and grads[2][1, :, 7:].abs().max() == 0  # padded keys get nothing


def test_plain_attention_path_gradients_match_autograd(monkeypatch):
    """Small layers keep the plain math path (uint8 keep mask through ``MaskScale``): output and q/k/v gradients
    must be autograd's through ``where`` with the same masks."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 7, 3, 5, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
               for _ in range(3))
    masks = []
    monkeypatch.setattr(cpu_dropout, "drop_mask", recording(drop_mask, masks))
    module = nn.Module()
    module.is_causal = False
    out, _ = dropout_attention(module, q, k, v, None, dropout=0.4, scaling=0.5)
    assert len(masks) == 1 and masks[0].any() and not masks[0].all()
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    probs = torch.softmax((q * 0.5) @ k.transpose(-1, -2), dim=-1)
    expected = (torch.where(masks[0], 0.0, probs) @ v * drop_threshold(0.4)[1]).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (q, k, v))):
        assert torch.allclose(got, want, atol=1e-10)


def test_bf16_autocast_keeps_our_masks_on_the_math_path(monkeypatch):
    """Under CPU bf16 autocast a large layer cannot take the fp32 blocks, but it must still draw its masks with
    ``drop_mask`` (the same random stream as fp32 runs), not fall back to PyTorch's dropout."""
    q, k, v = qkv(2)
    masks = []
    monkeypatch.setattr(cpu_dropout, "ONE_BLOCK_SCORES", 0)  # "large"
    monkeypatch.setattr(cpu_dropout, "drop_mask", recording(drop_nothing, masks))
    module = nn.Module()
    module.is_causal = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = dropout_attention(module, q, k, v, None, dropout=0.1, scaling=0.3)
    assert [m.shape for m in masks] == [(3, 4, 9, 9)] and ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    reference = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v
    assert torch.allclose(ours.float(), reference.transpose(1, 2), atol=0.05)


@pytest.mark.parametrize("path", ["plain", "blocked", "fused"])
def test_model_swap_keeps_eval_outputs_and_saved_config(tiny_model, tmp_path, monkeypatch, path):
    from transformers import AutoModelForSequenceClassification

    if path == "blocked":  # the tiny model's layers are small: force the blocked path too
        monkeypatch.setattr(cpu_dropout, "ONE_BLOCK_SCORES", 0)
        monkeypatch.setattr(cpu_dropout, "SCORES_PER_BLOCK", 2 * 20 * 20)

    stock = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    fast = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    n_dropout = sum(type(m) is nn.Dropout for m in fast.modules())
    assert use_fast_cpu_dropout(fast, cpu_kernels_on=path == "fused") == n_dropout > 0
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert fast.config._attn_implementation == ATTENTION_NAME
    assert all(getattr(m, cpu_dropout.KERNELS_FLAG) == (path == "fused") for m in fast.modules())
    ids = torch.randint(5, 60, (4, 20))
    am = torch.ones_like(ids)
    am[1, 12:] = 0
    stock.eval(), fast.eval()
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=ids, attention_mask=am).logits,
                              fast(input_ids=ids, attention_mask=am).logits, atol=1e-6)
    # training with masks that drop nothing is the stock eval forward, padding mask included
    fast.train()
    masks = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_dropout, "drop_mask", recording(drop_nothing, masks))
        mp.setattr(cpu_dropout, "drop_threshold", lambda p: (0, 1.0))  # the C++ kernels' masks: keep all
        with torch.no_grad():
            assert torch.allclose(stock(input_ids=ids, attention_mask=am).logits,
                                  fast(input_ids=ids, attention_mask=am).logits, atol=1e-6)
    heads = stock.config.num_attention_heads
    attention_masks = [tuple(m.shape) for m in masks if m.shape[-2:] == (20, 20)]
    if path == "fused":  # the kernels draw every mask themselves
        assert not masks
    else:
        expected = (1 if path == "blocked" else 4, heads, 20, 20)  # a mask per block of one sequence, or per batch
        assert attention_masks and all(x == expected for x in attention_masks)
    # training: dropout really applies (outputs vary with the seed), and is reproducible from the seed
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(fast(input_ids=ids, attention_mask=am).logits)
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    fast.save_pretrained(tmp_path / "saved")
    assert ATTENTION_NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"]


def fused_kernel():
    kernel = cpu_dropout.cpu_kernels()
    assert kernel is not None, "train/csrc/cpu_dropout.cpp did not build (needs g++ and ninja on x86-64)"
    return kernel


def next_seed(seed: int) -> int:
    """The 64-bit draw ``FusedDropoutAttention`` makes right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return int(torch.empty((), dtype=torch.int64).random_(-2**63, None))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_kernel_masks_rate_lanes_and_row_offsets(p):
    kernel = fused_kernel()
    t = drop_threshold(p)[0]
    n = 1 << 22
    drop = kernel.keep_mask(1, 1, 1, n, 12345, t).view(-1) == 0
    p_eff = t / 65536
    assert within_binomial(int(drop.sum()), n, p_eff)
    for lane in range(4):
        assert within_binomial(int(drop[lane::4].sum()), n // 4, p_eff), lane
    assert within_binomial(int((drop[:-1] & drop[1:]).sum()), n - 1, p_eff * p_eff)
    # rows of odd length start mid-word: a (2, 3, 7, 13) mask is the same stream as one flat row
    flat = kernel.keep_mask(1, 1, 1, 2 * 3 * 7 * 13, 99, t).view(2, 3, 7, 13)
    assert torch.equal(kernel.keep_mask(2, 3, 7, 13, 99, t), flat)
    assert not torch.equal(kernel.keep_mask(2, 3, 7, 13, 100, t), flat)
    assert kernel.keep_mask(2, 3, 7, 13, 99, 0).all()


@pytest.mark.parametrize("mask_kind", ["none", "float"])
@pytest.mark.parametrize("rows_per_block", [3, 64])
def test_fused_attention_gradients_match_autograd(monkeypatch, mask_kind, rows_per_block):
    """The C++ kernel against autograd through the plain float64 math with the kernel's own masks: output and
    q/k/v gradients, transformers' transposed layout, a padding mask, query rows in several blocks or one."""
    kernel = fused_kernel()
    monkeypatch.setattr(cpu_dropout, "fused_rows_per_block", lambda k_len: rows_per_block)
    b, h, length, d, p, scaling = 3, 4, 11, 8, 0.3, 0.4
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, length, h, d, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
               for _ in range(3))
    keep_key = torch.ones(b, 1, length, length, dtype=torch.bool)
    keep_key[1, ..., 7:] = False
    mask = None if mask_kind == "none" else \
        torch.zeros(keep_key.shape).masked_fill(~keep_key, torch.finfo(torch.float32).min)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    seed = next_seed(7)
    torch.manual_seed(7)
    out = cpu_dropout.FusedDropoutAttention.apply(q32, k32, v32, mask, p, scaling)
    assert out.shape == (b, length, h, d) and out.is_contiguous()
    kept = kernel.keep_mask(b, h, length, length, seed, drop_threshold(p)[0]).bool()
    assert kept.any() and not kept.all()
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), (q32, k32, v32))
    scores = (q * scaling) @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~keep_key, float("-inf"))
    expected = ((torch.softmax(scores, dim=-1) * kept) @ v * drop_threshold(p)[1]).transpose(1, 2)
    assert torch.allclose(out.double(), expected, atol=2e-6)
    for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (q, k, v))):
        assert torch.allclose(got.double(), want, atol=2e-5), (got.double() - want).abs().max()
    if mask is not None:  # padded keys get no gradient
        assert grads[1][1, :, 7:].abs().max() == 0 and grads[2][1, :, 7:].abs().max() == 0


def test_dropout_attention_takes_the_fused_kernel_when_the_model_asks(monkeypatch):
    fused_kernel()
    q, k, v = qkv(3)
    keep = torch.ones(3, 1, 9, 9, dtype=torch.bool)
    keep[2, ..., 5:] = False  # transformers' bool mask, True = attend
    module = nn.Module()
    module.is_causal = False
    setattr(module, cpu_dropout.KERNELS_FLAG, True)
    torch.manual_seed(4)
    ours, _ = dropout_attention(module, q, k, v, keep, dropout=0.2, scaling=0.3)
    torch.manual_seed(4)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert torch.equal(ours, cpu_dropout.FusedDropoutAttention.apply(q, k, v, additive, 0.2, 0.3))
    torch.manual_seed(5)
    assert not torch.equal(ours, dropout_attention(module, q, k, v, keep, dropout=0.2, scaling=0.3)[0])
    setattr(module, cpu_dropout.KERNELS_FLAG, False)  # the model was set up without it: the Python paths
    masks = []
    monkeypatch.setattr(cpu_dropout, "drop_mask", recording(drop_mask, masks))
    dropout_attention(module, q, k, v, keep, dropout=0.2, scaling=0.3)
    assert len(masks) == 1


def test_kernel_dropout_values_rate_gradient_and_seed():
    """``KernelDropout`` (the C++ dropout on all threads): element i keeps or drops as element i of the seed's
    stream, kept values scaled by the exact inverse keep probability, the same mask in backward."""
    kernel = fused_kernel()
    x = (torch.rand(64, 1001) + 0.5).requires_grad_(True)  # not a multiple of the kernel's 1024-element chunks
    seed = next_seed(11)
    torch.manual_seed(11)
    y = cpu_dropout.KernelDropout.apply(x, 0.25)
    t, scale = drop_threshold(0.25)
    keep = kernel.keep_mask(1, 1, 1, x.numel(), seed, t).view(x.shape).bool()
    assert torch.equal(y != 0, keep) and within_binomial(int((~keep).sum()), keep.numel(), t / 65536)
    assert torch.allclose(y[keep], x.detach()[keep] * scale)
    y.backward(torch.full_like(y, 2.0))
    assert torch.allclose(x.grad, keep.float() * 2 * scale)
    layer = FastCPUDropout(0.25)  # the module takes the kernel when the model was set up with it
    setattr(layer, cpu_dropout.KERNELS_FLAG, True)
    torch.manual_seed(11)
    assert torch.equal(layer(x), y)
    torch.manual_seed(12)
    assert not torch.equal(layer(x), y)
    assert torch.equal(layer.eval()(x), x)


def test_bf16_paths_drop_what_the_fp32_kernels_drop():
    """With the C++ kernels on, bf16 tensors (autocast, or a bf16 model under DeepSpeed) cannot take the kernels,
    but must drop the same elements from the same generator state, so bf16 and fp32 runs stay comparable."""
    fused_kernel()
    layer = FastCPUDropout(0.5)
    setattr(layer, cpu_dropout.KERNELS_FLAG, True)
    x = torch.rand(8, 300) + 0.5
    torch.manual_seed(21)
    y32 = layer(x)
    torch.manual_seed(21)
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.equal(y16 != 0, y32 != 0) and (y32 == 0).any()
    q, k, v = qkv(7)
    module = nn.Module()
    module.is_causal = False
    setattr(module, cpu_dropout.KERNELS_FLAG, True)
    torch.manual_seed(22)
    ours32, _ = dropout_attention(module, q, k, v, None, dropout=0.5, scaling=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(22)
        ours16, _ = dropout_attention(module, q, k, v, None, dropout=0.5, scaling=0.3)
        torch.manual_seed(23)
        other16, _ = dropout_attention(module, q, k, v, None, dropout=0.5, scaling=0.3)
    assert ours16.dtype == torch.bfloat16
    assert (ours16.float() - ours32).abs().max() < 0.05 < (other16.float() - ours32).abs().max()
