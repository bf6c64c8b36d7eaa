"""Inference precision (feature extraction, sampling): fp32 weights, matrix products in bf16/fp16 on CUDA."""

from __future__ import annotations

import contextlib

import torch

from igpt_ds.config import ConfigError

# Inference precision (feature extraction, sampling): fp32 weights, matmuls in bf16/fp16 on CUDA.
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype matmuls run in: `precision` on CUDA, always fp32 on CPU."""
    if precision not in _DTYPES:
        raise ConfigError(f"precision={precision!r} must be one of {list(_DTYPES)}")
    return _DTYPES[precision] if device.type == "cuda" else torch.float32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on CUDA with fp32 weights kept; a no-op in fp32 and on CPU."""
    dtype = inference_dtype(device, precision)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cuda", dtype=dtype)
