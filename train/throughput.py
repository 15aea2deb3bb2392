"""Model FLOPs per token and MFU (model FLOPs utilisation) for an encoder.

Training one token costs about 6 FLOPs per weight of the matrix multiplies (2 forward, 4 backward) plus the
attention scores and the weighted sum of values: 2 matmuls of seq_len x hidden per layer, x3 for backward
= 12 x layers x hidden x seq_len (PaLM paper, appendix B). Embedding lookups cost no FLOPs.
These are the stock model's FLOPs (MFU's convention: the model's work, not the hardware's): with
``cls_only_last_layer`` (train/last_layer.py) the last layer runs for one token, so on a 6-layer model the hardware
does ~14% fewer FLOPs than counted here (~7% on 12 layers).
"""

from __future__ import annotations


def training_flops_per_token(num_layers: int, hidden: int, intermediate: int, seq_len: float) -> float:
    matmul_weights = num_layers * (4 * hidden * hidden + 2 * hidden * intermediate)  # Q,K,V,O + 2 FFN
    return 6.0 * matmul_weights + 12.0 * num_layers * hidden * seq_len


def model_flops_per_token(model_config, seq_len: float) -> float | None:
    try:
        return training_flops_per_token(model_config.num_hidden_layers, model_config.hidden_size,
                                        model_config.intermediate_size, seq_len)
    except AttributeError:
        return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, num_devices: int) -> float:
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * num_devices)
