"""Colour palette: fit k-means colour clusters, encode pixels to tokens, decode tokens to pixels.

Reference: docs/reference.md#preprocessing:
k = 512 clusters of (R, G, B) in the space x/127.5 - 1; token = nearest centre by squared Euclidean
distance; decode = rint(127.5·(c + 1)). A palette is a (k, 3) float32 array in [-1, 1], the same
convention as OpenAI's `kmeans_centers.npy` and HF ImageGPT's `clusters`, so a released palette
works as-is and tokens agree with those tools.

Exactness: the token of a colour is defined by `encode_bruteforce`: distances in float64 as
((r - cr)² + (g - cg)²) + (b - cb)², ties to the lowest index. `build_lut` evaluates that same
expression for all 2^24 colours, cube of 8³ colours by cube, skipping only centres whose distance
to every colour of the cube is larger than another centre's. Those bounds are built from the same
float64 operations, and rounding is monotonic, so they hold for the computed distances too (a
1e-6 margin is kept on top): `encode` with the table equals the brute force token for token,
ties included. Building the table for k = 512 takes ~1 CPU-second; lookups are ~300x faster
than the brute force (bench/results/data.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from igpt_ds.atomic import atomic_file

MAX_K = 65535
"""Tokens are stored as uint16."""

N_COLOURS = 1 << 24
LUT_BLOCK = 8
"""The table is built in cubes of 8³ colours; a cube has few candidate centres (~7 of 512)."""


class PaletteError(ValueError):
    """A palette or palette file that cannot be used; the message names it."""


def to_unit(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB values -> float64 in the paper's space x/127.5 - 1."""
    return np.asarray(rgb, dtype=np.float64) / 127.5 - 1.0


def validate_palette(centres: np.ndarray, name: str = "palette") -> np.ndarray:
    """`centres` as a C-ordered (k, 3) float32 array, or PaletteError naming `name`."""
    centres = np.asarray(centres)
    if centres.ndim != 2 or centres.shape[1] != 3 or not 2 <= len(centres) <= MAX_K:
        raise PaletteError(f"{name}: palette must have shape (k, 3) with 2 <= k <= {MAX_K}, got {centres.shape}")
    if not np.issubdtype(centres.dtype, np.floating):
        raise PaletteError(f"{name}: palette must hold floats in [-1, 1] (RGB as x/127.5 - 1), got {centres.dtype}")
    centres = np.ascontiguousarray(centres, dtype=np.float32)
    if not np.isfinite(centres).all() or np.abs(centres).max() > 1.0:
        raise PaletteError(f"{name}: palette values must be finite and in [-1, 1] (RGB as x/127.5 - 1)")
    return centres


def load_palette(path: str | Path) -> np.ndarray:
    """A validated (k, 3) float32 palette from a .npy file (e.g. OpenAI's kmeans_centers.npy)."""
    try:
        centres = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PaletteError(f"{path}: cannot read palette .npy ({e})") from None
    return validate_palette(centres, str(path))


def save_palette(path: str | Path, centres: np.ndarray) -> None:
    """Write a validated palette as .npy, atomically."""
    _save_npy(path, validate_palette(centres))


def palette_key(centres: np.ndarray) -> str:
    """sha256 of the palette's values (float32, C order): the cache key of its lookup table."""
    return hashlib.sha256(validate_palette(centres).tobytes()).hexdigest()


def fit_palette(
    pixels: np.ndarray, k: int = 512, seed: int = 0, max_iter: int = 30, init_samples: int = 100_000
) -> np.ndarray:
    """k-means colour centres (k, 3) float32 in [-1, 1] from uint8 RGB `pixels` (N, 3).

    k-means++ seeds from the first `init_samples` pixels (callers pass pixels in random order),
    then Lloyd iterations run on every distinct colour weighted by its count: the same objective
    as on all pixels, cheaper. If there are at most k distinct colours they are the palette
    (padded with copies of the last one, never chosen since ties go to the lowest index).
    Byte-identical across runs on the same machine and software.
    """
    from sklearn.cluster import KMeans, kmeans_plusplus  # heavy import, needed only here
    from threadpoolctl import threadpool_limits

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 or len(pixels) == 0:
        raise ValueError(f"pixels must be a non-empty (N, 3) uint8 array, got {pixels.dtype} {pixels.shape}")
    if not 2 <= k <= MAX_K:
        raise PaletteError(f"k={k} is out of range; choose 2 <= k <= {MAX_K}")
    packed, counts = np.unique(_pack(pixels), return_counts=True)
    colours = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1).astype(np.uint8)
    if len(colours) <= k:
        padded = np.concatenate([colours, np.repeat(colours[-1:], k - len(colours), axis=0)])
        return to_unit(padded).astype(np.float32)
    # scikit-learn sums per-thread partial centre sums in lock order; with at most two threads that
    # sum is a single commutative addition, so the result does not depend on thread timing.
    with threadpool_limits(limits=2):
        init, _ = kmeans_plusplus(to_unit(pixels[:init_samples]), k, random_state=seed)
        km = KMeans(k, init=init, n_init=1, max_iter=max_iter, random_state=seed)
        km.fit(to_unit(colours), sample_weight=counts.astype(np.float64))
    return np.clip(km.cluster_centers_, -1.0, 1.0).astype(np.float32)


def encode_bruteforce(rgb: np.ndarray, centres: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Tokens (uint16, shape rgb.shape[:-1]) by exhaustive search: the definition `encode` matches."""
    x = to_unit(_check_rgb(rgb).reshape(-1, 3))
    c = validate_palette(centres).astype(np.float64)
    out = np.empty(len(x), dtype=np.uint16)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        d = (xs[:, 0, None] - c[:, 0]) ** 2 + (xs[:, 1, None] - c[:, 1]) ** 2  # (n, k)
        d += (xs[:, 2, None] - c[:, 2]) ** 2
        out[s : s + chunk] = d.argmin(axis=1)  # argmin returns the first minimum: lowest index
    return out.reshape(rgb.shape[:-1])


def build_lut(centres: np.ndarray) -> np.ndarray:
    """The token of every 24-bit colour, uint16 (2^24,) indexed by r << 16 | g << 8 | b."""
    c = validate_palette(centres).astype(np.float64)
    b, n_blk = LUT_BLOCK, 256 // LUT_BLOCK
    levels = to_unit(np.arange(256))
    sq = (levels[:, None, None] - c[None]) ** 2  # (256, k, 3): per-channel squared distances
    lo, hi = levels[::b, None, None], levels[b - 1 :: b, None, None]  # each cube's bounds per axis
    near = np.maximum(np.maximum(lo - c, c - hi), 0.0) ** 2  # (n_blk, k, 3) to the nearest face
    far = np.maximum(sq[::b], sq[b - 1 :: b])  # (n_blk, k, 3) to the farthest corner
    sq_b = sq[:, :, 2].reshape(n_blk, b, -1)  # (n_blk, b, k)
    out = np.empty((n_blk, n_blk, n_blk, b, b, b), dtype=np.uint16)  # (R, G, B cube, r, g, b)
    rows = np.arange(n_blk)[:, None, None]
    for i in range(n_blk):
        for j in range(n_blk):
            # For the 32 cubes with red block i and green block j: a centre whose nearest face is
            # farther than some centre's farthest corner can never win in that cube.
            nearest = (near[i, :, 0] + near[j, :, 1]) + near[:, :, 2]  # (n_blk, k)
            bound = ((far[i, :, 0] + far[j, :, 1]) + far[:, :, 2]).min(axis=1, keepdims=True)
            keep = nearest <= bound * (1 + 1e-6)
            # Candidates first, in index order (stable sort); the extra columns up to the widest
            # cube are pruned centres, strictly farther, so they never change the argmin.
            cand = np.argsort(~keep, axis=1, kind="stable")[:, : keep.sum(axis=1).max()]  # (n_blk, m)
            dr = sq[i * b : (i + 1) * b, :, 0][:, cand].transpose(1, 0, 2)  # (n_blk, b, m)
            dg = sq[j * b : (j + 1) * b, :, 1][:, cand].transpose(1, 0, 2)
            db = sq_b[rows, np.arange(b)[None, :, None], cand[:, None, :]]
            d = (dr[:, :, None, None] + dg[:, None, :, None]) + db[:, None, None]  # (n_blk, b, b, b, m)
            out[i, j] = np.take_along_axis(cand[:, None, None, None], d.argmin(axis=-1)[..., None], -1)[..., 0]
    return out.transpose(0, 3, 1, 4, 2, 5).reshape(N_COLOURS)


def palette_lut(centres: np.ndarray, palette_path: str | Path | None = None) -> np.ndarray:
    """The lookup table of `centres`, cached beside `palette_path` when given.

    The cache file `<stem>.<key[:16]>.lut.npy` is named by `palette_key`, so a changed palette
    never reuses a stale table. A cache that cannot be written (read-only data) is skipped.
    """
    centres = validate_palette(centres)
    if palette_path is None:
        return build_lut(centres)
    path = Path(palette_path)
    cache = path.with_name(f"{path.stem}.{palette_key(centres)[:16]}.lut.npy")
    if cache.is_file():
        try:
            lut = np.load(cache, allow_pickle=False)
            if lut.shape == (N_COLOURS,) and lut.dtype == np.uint16 and lut.max() < len(centres):
                return lut
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild it below
    lut = build_lut(centres)
    try:
        _save_npy(cache, lut)
    except OSError:
        pass
    return lut


def encode(rgb: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> uint16 tokens (...) through a table from `palette_lut`."""
    return lut[_pack(_check_rgb(rgb))]


def decode(tokens: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Tokens (...) -> uint8 RGB (..., 3) as rint(127.5·(c + 1)).

    Computed in float32 like the official code, so decoded colours match it bit for bit.
    """
    centres = validate_palette(centres)
    table = np.clip(np.rint(127.5 * (centres + 1.0)), 0, 255).astype(np.uint8)
    return table[np.asarray(tokens)]


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB of shape (..., 3), got {rgb.dtype} {rgb.shape}")
    return rgb


def _pack(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> int32 r << 16 | g << 8 | b."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.save(f, array)
