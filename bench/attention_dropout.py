"""Attention with dropout on CPU, one layer, forward + backward: bertfit's kernels against PyTorch's path.

    python -m bench.attention_dropout [--repeats 15] [--train-repeats 2] [--write-docs]

Rows, on the same inputs in one process, interleaved per repeat (fresh random q, k, v once per shape):
  sdpa, dropout 0.1     F.scaled_dot_product_attention(dropout_p=0.1): what HF Trainer and `speedups.cpu_dropout:
                        stock` run on CPU (PyTorch's math path: whole (batch, heads, L, L) tensors, bernoulli_ masks)
  bertfit C++, dropout 0.1  train/cpu_dropout.py's dropout_attention as `cpu_dropout: kernels` sets it up
                        (FusedDropoutAttention: train/csrc/cpu_dropout.cpp, one (sequence, head) per thread,
                        probabilities and drop masks recomputed in backward)
  bertfit Python, dropout 0.1  the same function's Python path, what `cpu_dropout: kernels` runs where the C++
                        kernels cannot be built (BlockedDropoutAttention: blocks of sequences, probabilities
                        recomputed in backward; small layers: plain math)
  sdpa, no dropout      the fused CPU kernel, dropout 0: the floor a dropout-free run gets (for reference)
Time: median ms per forward + backward; 'vs sdpa' = median of the per-repeat ratios. Memory: MiB that autograd
keeps for backward beyond q, k, v and the mask (unique storages seen by saved_tensors_hooks), i.e. what the
attention adds to activation memory per layer. Then the whole-process view: peak RSS of `python -m train` (MiniLM,
BBC 256-token windows, batch 16, 4 steps, fresh process each): the defaults and `speedups: {cpu_dropout:
stock}` (PyTorch's dropout and attention path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench import _common as C
from train.cpu_dropout import KERNELS_FLAG, cpu_kernels, dropout_attention

SHAPES = {  # name: (batch, heads, length, head_dim, padded keys in sequence 1)
    "MiniLM, batch 16 x 256": (16, 12, 256, 32, 56),
    "BERT-base, batch 8 x 512": (8, 12, 512, 64, 112),
    "MiniLM, batch 16 x 64 (short reviews: under 4M scores, Python: plain math path)": (16, 12, 64, 32, 14),
}
ROWS = ("sdpa, dropout 0.1", "bertfit C++, dropout 0.1", "bertfit Python, dropout 0.1", "sdpa, no dropout")
TRAIN_SETTINGS = {"defaults": {},
                  "`speedups: {cpu_dropout: stock}` (PyTorch's attention path)": {"speedups": {"cpu_dropout": "stock"}}}


def inputs(b, h, length, d, padded):
    g = torch.Generator().manual_seed(0)
    # (batch, length, heads, head_dim) seen as (batch, heads, length, head_dim): the layout transformers hands over
    q, k, v = (torch.randn(b, length, h, d, generator=g).transpose(1, 2).requires_grad_(True) for _ in range(3))
    keep = torch.ones(b, 1, length, length, dtype=torch.bool)
    keep[1, ..., length - padded:] = False
    return q, k, v, keep


def attention(row: str, q, k, v, keep):
    if row.startswith("bertfit"):
        module = nn.Module()
        module.is_causal = False
        setattr(module, KERNELS_FLAG, "C++" in row)
        return dropout_attention(module, q, k, v, keep, dropout=0.1, scaling=q.shape[-1] ** -0.5)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.1 if "0.1" in row else 0.0)


def saved_mib(row: str, q, k, v, keep) -> float:
    skip = {t.untyped_storage().data_ptr() for t in (q, k, v, keep)}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attention(row, q, k, v, keep)
    del out
    return sum(seen.values()) / 2**20


def time_once(row: str, q, k, v, keep) -> float:
    t = time.perf_counter()
    attention(row, q, k, v, keep).sum().backward()
    elapsed = time.perf_counter() - t
    q.grad = k.grad = v.grad = None
    return elapsed * 1000


def train_peak_rss_mib(settings: dict, threads: int) -> float:
    """Peak RSS of one fresh `python -m train` process (its own ru_maxrss, read through wait4)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "run.yaml"
        cfg.write_text(C.bertfit_yaml("minilm", C.shards("bbc", "minilm"), Path(tmp) / "out", 4, settings))
        log = Path(tmp) / "train.log"
        with open(log, "w") as err:  # a file, not a pipe: nobody reads a pipe while wait4 waits
            proc = subprocess.Popen([sys.executable, "-m", "train", "--config", str(cfg)], cwd=C.REPO,
                                    env=C.env(threads), stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"bench.attention_dropout: train run failed: {log.read_text()[-2000:]}")
        return usage.ru_maxrss / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per row (after 2 untimed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-repeats", type=int, default=2, help="fresh training processes per setting (0: skip)")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if cpu_kernels() is None:
        raise SystemExit("bench.attention_dropout: the C++ kernel did not build (see the line above)")
    torch.manual_seed(0)
    rows = []
    for shape, dims in SHAPES.items():
        q, k, v, keep = inputs(*dims)
        ms = {r: [] for r in ROWS}
        for i in range(a.repeats + 2):
            for r in ROWS:
                x = time_once(r, q, k, v, keep)
                if i >= 2:
                    ms[r].append(x)
        for r in ROWS:
            ratio = statistics.median(s / t for s, t in zip(ms[ROWS[0]], ms[r]))
            rows.append([shape, r, C.mmm(ms[r], "{:.1f}"), f"{ratio:.2f}x", f"{saved_mib(r, q, k, v, keep):.0f}"])
            C.log(" | ".join(rows[-1]))
    rss = {name: [train_peak_rss_mib(settings, a.threads) for _ in range(a.train_repeats)]
           for name, settings in TRAIN_SETTINGS.items()}
    body = C.header_block(f"python -m bench.attention_dropout --repeats {a.repeats} --train-repeats {a.train_repeats}"
                          + (" --write-docs" * a.write_docs),
                          [f"{a.threads} threads, fp32, one attention layer (q, k, v in transformers' layout, a "
                           "bool padding mask), forward + backward of out.sum(); repeats interleaved across rows"])
    body += "\n\n" + C.table(["shape", "attention", "ms per forward + backward, median (min-max)",
                              "speed vs sdpa with dropout (paired)", "MiB kept for backward"], rows)
    if a.train_repeats:
        body += ("\n\nPeak RSS of `python -m train` (MiniLM, BBC 256-token windows, batch 16, 4 steps, fp32, fresh "
                 f"process each, {a.train_repeats} runs per setting, median (min-max)): "
                 + ", ".join(f"{name} {C.mmm(v)} MiB" for name, v in rss.items()) + ".")
    print(body)
    if a.write_docs:
        C.write_section("attention_dropout", "Attention with dropout on CPU: bertfit's kernels vs PyTorch", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
