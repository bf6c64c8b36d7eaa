"""The two pretraining objectives, their losses and their masks (docs/reference.md#objectives-and-recipe).

`ar` — causal attention, cross-entropy on every pixel; `bert` — bidirectional attention, each position masked
independently with probability mask_prob (token embedding zeroed, position embedding kept), the loss of an image
the mean cross-entropy over its masked positions, then the mean over images: OpenAI's `uniform > bert_mask_prob`
keep-mask and its per-image normalisation. `model.bert_mask=exact` masks exactly max(1, round(mask_prob·T))
positions per image instead. Masks are drawn from counter-based generators keyed by (seed, stream, step, image), so
a sample's mask is the same on any rank, batch or resume.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from igpt_ds.config import ModelConfig


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
