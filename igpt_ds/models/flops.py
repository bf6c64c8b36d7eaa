"""Training FLOPs per token and the peak rate of the device: the one definition behind every MFU figure.

Model FLOPs utilisation (MFU) follows PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT: a
training step costs 6·N FLOPs per token for the matrix products (2 forward, 4 backward), where N
counts the parameters that take part in them (everything except the token / position / SOS lookups),
plus 12·L·T·d per token for attention scores and values (QKᵀ and AV, forward and backward, over the
full T×T square — causal masking is not discounted, so figures compare with published ones).
Activation recomputation is not counted: MFU measures useful work, not work done.

For iGPT-S at 32² (N ≈ 76M, L = 24, T = 1024, d = 512) this is 0.61 GFLOP per token, which puts
the H200 anchor of docs/reference.md#measured-anchor (530k tokens/s, torch.compile) at 33% of
989 TFLOP/s, as measured there.
"""

from __future__ import annotations

import torch

from igpt_ds.config import ModelConfig
from igpt_ds.models.igpt import count_parameters

# Dense bf16 tensor-core peak per device (vendor datasheets, without sparsity), matched as a
# substring of torch.cuda.get_device_name(). The H200 shares the H100's compute die.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16 tensor cores: the V100 has no bf16
}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in matrix products: all but the token and position embeddings and SOS."""
    lookups = cfg.n_vocab * cfg.n_embd + cfg.seq_len * cfg.n_embd + cfg.n_embd
    return count_parameters(cfg) - lookups


def train_flops_per_token(cfg: ModelConfig) -> float:
    """Model FLOPs of one training token: 6·N + 12·L·T·d (see module docstring)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.seq_len * cfg.n_embd


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device from PEAK_BF16_FLOPS; None on CPU or an unknown GPU."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    # Longest key first, so "GH200" is not taken for "H200" and "L40S" not for "L4".
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_s: float, cfg: ModelConfig, peak: float | None) -> float | None:
    """Fraction of `peak` FLOP/s achieved at `tokens_per_s`; None when the peak is unknown."""
    return tokens_per_s * train_flops_per_token(cfg) / peak if peak else None
