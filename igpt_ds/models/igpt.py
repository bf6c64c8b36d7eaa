"""The iGPT Transformer (Chen et al. 2020, "Generative Pretraining from Pixels").

Faithful to OpenAI's released implementation (openai/image-gpt):
- GPT-2 decoder, pre-norm; the norm is gain-only RMS normalisation (no centring, no bias, eps 1e-5);
- quick-GELU x·sigmoid(1.702x), MLP width 4·d, no biases (optional, to load weights that have them);
- learned position embeddings; a learned SOS vector is prepended and the pixels shifted right, so
  every one of the n_px² pixels is predicted (AR objective);
- untied, zero-initialised output head with one row per palette colour (loss at init = ln n_vocab);
- init: token emb std 0.02, position emb 0.01, q/k/v 1/√d, attention output 1/√(d·L), MLP 0.02.

The objectives (AR, BERT) and their masks are `igpt_ds.models.objectives`; incremental decoding's cache
`igpt_ds.models.kv_cache`. Every module initialises its own parameters inside its own __init__: under DeepSpeed's
`zero.Init` a module's parameters are partitioned as soon as its constructor returns, so a parent must never touch
a child's weights. This file imports torch only (and the model config).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from igpt_ds.config import ModelConfig
from igpt_ds.models.kv_cache import KVCache
from igpt_ds.models.objectives import objective_loss


class Linear(nn.Linear):
    """nn.Linear with the iGPT normal init (std 0 = zeros) and zero bias."""

    def __init__(self, n_in: int, n_out: int, bias: bool, std: float):
        self.init_std = std
        super().__init__(n_in, n_out, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std) if self.init_std else nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    def __init__(self, n: int, dim: int, std: float):
        self.init_std = std
        super().__init__(n, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)


class RMSNorm(nn.Module):
    """iGPT's norm: x / sqrt(mean(x²) + eps) · gain. Not LayerNorm: no mean subtraction, no bias."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.causal = cfg.objective == "ar"
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, cfg.bias, std=1 / math.sqrt(cfg.n_embd))
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, cfg.bias, std=1 / math.sqrt(cfg.n_embd * cfg.n_layer))

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask, is_causal = None, self.causal
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k, v)
            if past and T > 1:  # queries at past..past+T-1 see keys 0..their own position
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            is_causal = self.causal and past == 0 and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, cfg.bias, std=0.02)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, cfg.bias, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(1.702 * h))  # quick-GELU, as the official code


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


def add_input_embeddings(module: nn.Module, cfg: ModelConfig) -> None:
    """Give `module` the input parameters wte, wpe and sos (IGPT and the pipeline's first stage).

    Called from the owner's own __init__, so zero.Init partitions them with their owner."""
    module.wte = Embedding(cfg.n_vocab, cfg.n_embd, std=0.02)
    module.wpe = Embedding(cfg.seq_len, cfg.n_embd, std=0.01)
    module.sos = nn.Parameter(torch.randn(cfg.n_embd) * 0.02)


def seed_layer(seed: int | None, layer_idx: int) -> None:
    """With a seed, reseed torch's RNG for layer `layer_idx` (0: input embeddings, 1..n_layer: blocks,
    n_layer + 1: final norm and head), so that a layer's initial weights depend on (seed, its index) only:
    the same in IGPT and in whichever pipeline stage builds it, and different in every layer. Without one,
    the RNG is left as it is."""
    if seed is not None:
        torch.manual_seed(seed * LAYER_SEED_STRIDE + layer_idx)


LAYER_SEED_STRIDE = 1 << 20
"""More than any model's layer count: (seed, layer) pairs never share a torch seed."""


class IGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        """`seed`: initialise layer by layer from it (`seed_layer`), as the pipeline layout does."""
        super().__init__()
        self.cfg = cfg
        seed_layer(seed, 0)
        add_input_embeddings(self, cfg)
        blocks = []
        for i in range(cfg.n_layer):
            seed_layer(seed, i + 1)
            blocks.append(Block(cfg))
        self.h = nn.ModuleList(blocks)
        seed_layer(seed, cfg.n_layer + 1)
        self.ln_f = RMSNorm(cfg.n_embd)
        self.lm_head = Linear(cfg.n_embd, cfg.n_vocab, bias=False, std=0.0)
        self.activation_checkpointing = False
        """Recompute each block in backward (set by the trainer when memory demands it)."""

    def embed(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Input embeddings (B, T, C). AR: SOS then pixels 0..T-2. BERT: masked pixels' token emb zeroed."""
        if self.cfg.objective == "ar":
            x = self.wte(tokens[:, :-1])
            x = torch.cat([self.sos.to(x.dtype).expand(tokens.shape[0], 1, -1), x], dim=1)
        else:
            x = self.wte(tokens)
            if mask is not None:
                x = x.masked_fill(mask.unsqueeze(-1), 0.0)
        # Looked up through the module, not sliced from its weight: ZeRO-3's module hooks then gather the
        # weight, which direct access from a parent's forward does not get under torch.compile.
        return x + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))

    def blocks(self, x: Tensor) -> Tensor:
        for block in self.h:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, n_vocab) for every pixel of `tokens` (B, T)."""
        return self.lm_head(self.ln_f(self.blocks(self.embed(tokens, mask))))

    def loss(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean cross-entropy in nats per predicted pixel (AR: all pixels; BERT: masked ones)."""
        return objective_loss(self(tokens, mask), tokens, mask)

    def features(
        self, tokens: Tensor, layers: list[int], mask: Tensor | None = None, pool: bool = True
    ) -> dict[int, Tensor]:
        """Mean-pooled normalised block inputs LN(h^l), each (B, C), in one forward pass (`pool` False: every
        position's, (B, T, C), what the attentive probe reads).

        Layer l < n_layer is block l's input through that block's own norm (ln_1); l = n_layer is
        the final norm's output (what fine-tuning pools). The pass stops after the deepest layer.
        `mask` (B, T): a BERT model's masked positions (`eval_bert_mask`).
        """
        if any(not 0 <= l <= self.cfg.n_layer for l in layers):
            raise ValueError(f"layers {layers} out of range 0..{self.cfg.n_layer}")
        wanted, out = set(layers), {}
        x = self.embed(tokens, mask)
        for l, block in enumerate(self.h):
            if l in wanted:
                out[l] = block.ln_1(x)
            if l >= max(wanted):
                break
            x = block(x)
        if self.cfg.n_layer in wanted:
            out[self.cfg.n_layer] = self.ln_f(x)
        return {l: h.mean(dim=1) for l, h in out.items()} if pool else out

    def forward_pooled(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(logits (B, T, V), mean-pooled final-norm output (B, C)) from one pass, for fine-tuning."""
        h = self.ln_f(self.blocks(self.embed(tokens, mask)))
        return self.lm_head(h), h.mean(dim=1)

    @torch.no_grad()
    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Incremental AR decoding: feed the next known pixels (B, t), get logits (B, V) for the next.

        On an empty cache the SOS vector is prepended, so `tokens` is the known prefix (t may be 0).
        """
        assert self.cfg.objective == "ar", "incremental decoding needs the AR objective"
        start = cache.length
        x = self.wte(tokens)
        if start == 0:
            x = torch.cat([self.sos.to(x.dtype).expand(tokens.shape[0], 1, -1), x], dim=1)
        x = x + self.wpe(torch.arange(start, start + x.shape[1], device=x.device))
        for l, block in enumerate(self.h):
            x = block(x, cache, l)
        cache.length += x.shape[1]
        return self.lm_head(self.ln_f(x[:, -1]))


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in IGPT(cfg).parameters())
