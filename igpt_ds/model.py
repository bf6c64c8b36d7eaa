"""The iGPT Transformer and its two objectives (Chen et al. 2020, "Generative Pretraining from Pixels").

Faithful to OpenAI's released implementation (openai/image-gpt):
- GPT-2 decoder, pre-norm; the norm is gain-only RMS normalisation (no centring, no bias, eps 1e-5);
- quick-GELU x·sigmoid(1.702x), MLP width 4·d, no biases (optional, to load weights that have them);
- learned position embeddings; a learned SOS vector is prepended and the pixels shifted right, so
  every one of the n_px² pixels is predicted (AR objective);
- untied, zero-initialised output head with one row per palette colour (loss at init = ln n_vocab);
- init: token emb std 0.02, position emb 0.01, q/k/v 1/√d, attention output 1/√(d·L), MLP 0.02.

Objectives (docs/reference.md#objectives-and-recipe): `ar` — causal attention, cross-entropy on every pixel;
`bert` — bidirectional attention, each position masked independently with probability mask_prob (token
embedding zeroed, position embedding kept), the loss of an image the mean cross-entropy over its masked
positions, then the mean over images: OpenAI's `uniform > bert_mask_prob` keep-mask and its per-image
normalisation. `model.bert_mask=exact` masks exactly max(1, round(mask_prob·T)) positions per image instead.

Every module initialises its own parameters inside its own __init__: under DeepSpeed's
`zero.Init` a module's parameters are partitioned as soon as its constructor returns, so a parent
must never touch a child's weights. This file imports torch and numpy only.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from igpt_ds.config import ConfigError, ModelConfig


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

    def features(self, tokens: Tensor, layers: list[int], mask: Tensor | None = None) -> dict[int, Tensor]:
        """Mean-pooled normalised block inputs LN(h^l), each (B, C), in one forward pass.

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
                out[l] = block.ln_1(x).mean(dim=1)
            if l >= max(wanted):
                break
            x = block(x)
        if self.cfg.n_layer in wanted:
            out[self.cfg.n_layer] = self.ln_f(x).mean(dim=1)
        return out

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


def objective_loss(logits: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Cross-entropy in nats/pixel, fp32. AR (`mask` None): the mean over every pixel. BERT: `per_image_loss`
    over the masked positions."""
    if mask is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))
    return per_image_loss(logits, tokens, mask)


def per_image_loss(logits: Tensor, targets: Tensor, scored: Tensor) -> Tensor:
    """Mean over images of each image's mean cross-entropy over its `scored` positions (B, T bool); images with
    none scored are left out (0 when no image has any). OpenAI's BERT loss (src/model.py:
    reduce_sum(losses·(1-M), 1) / reduce_sum(1-M, 1), then reduce_mean), which divides by zero for such an image.

    Fixed shapes throughout, no host-device sync: unscored positions are ignored by the cross-entropy rather than
    selected out (boolean indexing and nonzero() wait for the device to count them). The logits go to fp32 whole,
    (B, T, V), as the AR loss's do."""
    n_vocab = logits.shape[-1]
    ignored = targets.masked_fill(~scored, IGNORE_INDEX).reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, n_vocab).float(), ignored, reduction="none", ignore_index=IGNORE_INDEX)
    counts = scored.sum(dim=1)  # (B,)
    per_image = ce.view(scored.shape).sum(dim=1) / counts.clamp_min(1)  # 0 for an image with nothing scored
    return per_image.sum() / (counts > 0).sum().clamp_min(1)


IGNORE_INDEX = -100
"""Label of a position no loss is taken at (torch's cross_entropy default; the pipeline's BERT labels)."""


BERT_MASKS = ("bernoulli", "exact")
"""model.bert_mask: 'bernoulli' — each position masked with probability mask_prob (the paper, OpenAI's code);
'exact' — exactly max(1, round(mask_prob·T)) per image: every image weighs the same number of predictions."""


def mask_from_uniform(u: Tensor, mask_prob: float, kind: str = "bernoulli") -> Tensor:
    """Boolean (B, T) BERT mask from uniform draws `u` (B, T): u < mask_prob ('bernoulli'; OpenAI's keep-mask is
    u > mask_prob) or the max(1, round(mask_prob·T)) lowest draws of each row ('exact')."""
    if kind == "bernoulli":
        return u < mask_prob
    if kind != "exact":
        raise ValueError(f"bert mask kind {kind!r} must be one of {BERT_MASKS}")
    n_masked = max(1, round(mask_prob * u.shape[1]))
    chosen = u.topk(n_masked, dim=1, largest=False).indices
    return torch.zeros(u.shape, dtype=torch.bool, device=u.device).scatter_(1, chosen, True)


def bert_mask(
    shape: tuple[int, int],
    mask_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    kind: str = "bernoulli",
) -> Tensor:
    """Boolean (B, T) BERT mask, True = masked (`mask_from_uniform`)."""
    return mask_from_uniform(torch.rand(shape, generator=generator, device=device), mask_prob, kind)


def keyed_bert_masks(
    seed: int, stream: int, step: int, indices: np.ndarray, seq_len: int, mask_prob: float, kind: str = "bernoulli"
) -> Tensor:
    """`bert_mask` for the samples `indices` (B, seq_len), each drawn from a counter-based generator (Philox)
    keyed by (seed, stream, step, sample index): a sample's mask is the same whichever batch, rank or
    process draws it, and costs one small generator, not a seeded torch.Generator, per sample."""
    u = np.stack(
        [
            np.random.Generator(np.random.Philox(key=[seed, int(i)], counter=[0, 0, step, stream])).random(
                seq_len, dtype=np.float32
            )
            for i in indices
        ]
    ).reshape(len(indices), seq_len)
    return mask_from_uniform(torch.from_numpy(u), mask_prob, kind)


EVAL_MASK_SEED = 0
"""Key of evaluation masks (with the image index and the mask number): fixed, so every evaluation of a run, and
every run, scores the same masked inputs."""


def eval_bert_mask(cfg: ModelConfig, idx: np.ndarray, j: int = 0) -> Tensor:
    """Evaluation mask j (B, T) of the images `idx` of a split, for a BERT model: OpenAI's code masks the input of
    every forward, evaluation and feature extraction included. Keyed by (image index, j): the same at any world
    size and batching; drawn like training's masks (model.mask_prob, model.bert_mask)."""
    return keyed_bert_masks(EVAL_MASK_SEED, 0, j, idx, cfg.seq_len, cfg.mask_prob, cfg.bert_mask)


def eval_bert_masks(cfg: ModelConfig, idx: np.ndarray, n_masks: int) -> list[Tensor]:
    """Evaluation masks 0..n_masks-1 (each (B, T) bool, on the host) of images `idx`, for `eval_features`; none for
    an AR model or with n_masks = 0 (unmasked inputs)."""
    return [eval_bert_mask(cfg, idx, j) for j in range(n_masks)] if cfg.objective == "bert" else []


def eval_features(model: IGPT, tokens: Tensor, layers: list[int], masks: list[Tensor] = ()) -> dict[int, Tensor]:
    """`IGPT.features` of `tokens` (B, T); given BERT evaluation masks (`eval_bert_masks`, on tokens' device), their
    mean over the masks (the paper ensembles BERT masks). No masks: one plain pass (AR, or unmasked)."""
    if not masks:
        return model.features(tokens, layers)
    total: dict[int, Tensor] = {}
    for mask in masks:
        out = model.features(tokens, layers, mask)
        total = {l: total.get(l, 0) + f.float() / len(masks) for l, f in out.items()}
    return total


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in IGPT(cfg).parameters())


# Inference precision (feature extraction, sampling): fp32 weights, matmuls in bf16/fp16 on CUDA.
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype matmuls run in: `precision` on CUDA, always fp32 on CPU."""
    if precision not in _DTYPES:
        raise ConfigError(f"precision={precision!r} must be one of {list(_DTYPES)}")
    return _DTYPES[precision] if device.type == "cuda" else torch.float32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on CUDA with fp32 weights kept; a no-op in fp32 and on CPU."""
    dtype = compute_dtype(device, precision)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cuda", dtype=dtype)
