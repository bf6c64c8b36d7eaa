"""Keys and values of every layer for incremental AR decoding (`IGPT.step`): one token costs one token's forward."""

from __future__ import annotations

import torch
from torch import Tensor

from igpt_ds.config import ModelConfig


class KVCache:
    """Keys and values of every layer for incremental decoding: one token costs one token's forward."""

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layer, batch, cfg.n_head, cfg.seq_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        """Positions already cached (all layers); advanced by the model after each forward."""

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
