"""Augmented views at training time: which stored view of an image a training sample reads, and whether it is
flipped left to right.

Reference: docs/reference.md#augmentation. The paper pretrains on random resized crops; pre-tokenized shards keep
that by storing K crops of every training image, made once by `igpt-build-shards --views K`
(`data_tools.images.ViewTransform`). Here each sample picks one of them, and with `data.flip` a left-right flip
with probability 1/2: both a function of (train.seed, epoch, image) alone, so a sample reads the same tokens at any
world size, batching, read-ahead or resume. A palette token is one pixel, so the flip of the token grid is exact.
numpy only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from igpt_ds.config import DataConfig
    from igpt_ds.data.shards import ShardSplit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea and Flood, 2014), element-wise on uint64: a counter-based hash, so a
    batch's draws are a few vector operations instead of a generator per sample."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_draws(seed: int, epochs: np.ndarray, images: np.ndarray) -> np.ndarray:
    """One 64-bit draw (B,) uint64 per sample, a function of (seed, epoch, image index) alone."""
    h = _splitmix64(np.asarray([seed], dtype=np.uint64))
    h = _splitmix64(h ^ np.asarray(epochs, dtype=np.uint64))
    return _splitmix64(h ^ np.asarray(images, dtype=np.uint64))


def choose(seed: int, epochs: np.ndarray, images: np.ndarray, n_views: int) -> tuple[np.ndarray, np.ndarray]:
    """(view (B,) int64 in [0, n_views), flip (B,) bool) of each sample (image `images[b]` in epoch `epochs[b]`):
    the view uniform over the stored ones, independently each epoch; the flip a fair coin from the draw's high bits.
    `n_views` 0: no stored views, view -1."""
    draws = keyed_draws(seed, epochs, images)
    flip = (draws >> np.uint64(63)).astype(bool)
    if n_views < 1:
        return np.full(len(draws), -1, np.int64), flip
    return (draws % np.uint64(n_views)).astype(np.int64), flip


def flip_left_right(tokens: np.ndarray, n_px: int, which: np.ndarray) -> np.ndarray:
    """`tokens` (B, n_px²) in raster order with the rows `which` (B,) bool mirrored left to right, in place:
    pixel (y, x) takes pixel (y, n_px - 1 - x)'s token."""
    grid = tokens.reshape(len(tokens), n_px, n_px)
    grid[which] = grid[which][:, :, ::-1]
    return tokens


def read_training(
    split: ShardSplit, indices: np.ndarray, epochs: np.ndarray, seed: int, data: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A training batch as the model sees it: (tokens int64 (B, seq_len), labels int64 (B,)) of the images
    `indices` in epochs `epochs` (B,), each one of its stored views when the split has them and `data.views`,
    mirrored where `choose` says when `data.flip`; the evaluation crops unchanged otherwise."""
    n_views = split.n_views if data.views else 0
    if not n_views and not data.flip:
        return split.batch(indices)
    view, flip = choose(seed, epochs, indices, n_views)
    tokens, labels = split.batch(indices, view if n_views else None)
    if data.flip:
        flip_left_right(tokens, split.n_px, flip)
    return tokens, labels


def describe(split: ShardSplit, data: DataConfig) -> str | None:
    """The run header's line on augmentation; None when training reads the evaluation crop as stored."""
    n_views = split.n_views if data.views else 0
    if not n_views and not data.flip:
        return None
    views = f"views: {n_views} a training image, one per epoch" if n_views else "views: none (the evaluation crop)"
    unused = f" (data.views=false: {split.n_views} stored, unused)" if split.n_views and not n_views else ""
    return f"augmentation: {views}{unused}; flip {'on' if data.flip else 'off'}; keyed by (train.seed, epoch, image)"
