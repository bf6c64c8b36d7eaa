"""One image -> an n_px × n_px uint8 RGB array: as a viewer shows it (EXIF orientation, ICC colours), mode
conversion, square crop, antialiased resize.

Reference: docs/reference.md#preprocessing: images are downsampled to
n_px² (32, 48 or 64); evaluation uses a centre crop. Used by data_tools.build_shards workers.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("center-crop", "short-side")
"""center-crop: cut the largest centred square, then resize it to n_px (the whole short side kept).
short-side: resize the short side to n_px, then cut the centred n_px square (torchvision's
Resize + CenterCrop, the paper's evaluation transform). They differ only in resampling at the crop
border."""

BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on white, as viewers show them."""

_FILTER = Image.Resampling.BICUBIC  # Pillow widens the kernel when shrinking: antialiased
_REDUCING_GAP = 3.0  # box-reduce big images first; Pillow documents 3.0 as indistinguishable
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SRGB = ImageCms.createProfile("sRGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as RGB.

    Grey and 1-bit: replicated to three channels. Alpha (RGBA, LA, PA, palette transparency):
    composited on `BACKGROUND`. Palette (P): through its palette. CMYK, YCbCr: Pillow's
    conversion. 16-bit ('I;16*', and 'I' as 16-bit PNG/TIFF load): scaled by 255/65535.
    Float ('F'): values taken as 0..255 and clipped, Pillow's own convention.
    """
    if img.mode in _SIXTEEN_BIT:
        grey = np.asarray(img, dtype=np.float64) / 257.0  # 65535 / 257 = 255
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        background = Image.new("RGBA", img.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def square(img: Image.Image, n_px: int, mode: str = "center-crop") -> Image.Image:
    """`img` cropped to its centred square and resized to n_px × n_px (see RESIZE_MODES)."""
    w, h = img.size
    if mode == "center-crop":
        s = min(w, h)
        left, top = (w - s) / 2, (h - s) / 2
        return img.resize((n_px, n_px), _FILTER, box=(left, top, left + s, top + s), reducing_gap=_REDUCING_GAP)
    if mode != "short-side":
        raise ValueError(f"resize mode {mode!r} is unknown; choose one of {RESIZE_MODES}")
    scale = n_px / min(w, h)
    size = (max(n_px, round(w * scale)), max(n_px, round(h * scale)))
    img = img.resize(size, _FILTER, reducing_gap=_REDUCING_GAP)
    left, top = (size[0] - n_px) // 2, (size[1] - n_px) // 2
    return img.crop((left, top, left + n_px, top + n_px))


def load_rgb(item: str | bytes | np.ndarray, n_px: int, mode: str = "center-crop", draft: bool = True) -> np.ndarray:
    """A file path, an encoded image's bytes or a uint8 array (H, W[, C]) -> uint8 (n_px, n_px, 3), rows of (y, x).

    `draft`: a big JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT (libjpeg's scaled decoding, still
    >= 2·n_px on the short side) instead of at full size: several times faster; the pixels differ slightly
    from full decoding + resize (bench/results/README.md measures both). Raises whatever Pillow raises for
    unreadable, truncated or non-image files.
    """
    return np.asarray(square(_open_rgb(item, 2 * n_px if draft else None), n_px, mode), dtype=np.uint8)


def _open_rgb(item: str | bytes | np.ndarray, draft_px: int | None) -> Image.Image:
    """A file path, encoded bytes (a Parquet cell, a tar member) or a uint8 array as an RGB image as displayed; a
    JPEG decoded at the smallest DCT scale that keeps both sides >= draft_px (None: full size)."""
    if isinstance(item, np.ndarray):
        return to_rgb(Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item))
    if isinstance(item, bytes):
        try:
            f = Image.open(io.BytesIO(item))
        except UnidentifiedImageError:  # its message names the buffer's address: not the same on a rerun
            raise UnidentifiedImageError("the bytes are no image format Pillow reads") from None
    else:
        f = Image.open(item)
    with f:
        if f.format == "JPEG" and draft_px is not None:
            # Full-size decoding would dominate the time to shard ImageNet.
            f.draft(None, (draft_px, draft_px))
        f.load()
        return to_rgb(as_displayed(f))


def as_displayed(img: Image.Image) -> Image.Image:
    """`img` as a viewer shows it: the EXIF orientation applied (phone photos are stored sideways with a tag
    that viewers honour) and colours converted from an embedded ICC profile (Adobe RGB, Display P3, CMYK
    print profiles) to sRGB, the space the palette's colours are in."""
    img = ImageOps.exif_transpose(img)
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "RGBA", "CMYK", "L", "LA"):
        transform = _to_srgb(icc, img.mode)
        if transform is not None:
            img = ImageCms.applyTransform(img, transform)
    return img


@functools.lru_cache(maxsize=32)
def _to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from profile `icc` to sRGB, built once per profile (a camera or scanner writes the same one
    into every file); None for a damaged profile, whose values are then shown raw, as most viewers do."""
    try:
        return ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, mode,
                                       "RGBA" if "A" in mode else "RGB")  # fmt: skip
    except (ImageCms.PyCMSError, OSError):
        return None


@dataclass(frozen=True)
class ViewTransform:
    """The paper's pretraining crop ("Dataset and Data Augmentation", after Inception's random resized crop): the
    image resized so its short side is a random size S, uniform in `short_side`, a random `crop` x `crop` square
    cut from it, downsampled to n_px. Only ratios matter, so it is applied without the intermediate resize: the
    square's side is crop / S of the image's short side (224/384 to 224/256, 0.58 to 0.875, by default) at a
    uniform random position, resampled to n_px once (antialiased). The same fractions apply to images smaller than
    `crop` pixels (CIFAR's 32, the digits' 8): a view of a 32 px image at n_px = 32 is an upsampled 19-28 px crop,
    blurrier than the evaluation crop."""

    short_side: tuple[float, float] = (256.0, 384.0)
    crop: float = 224.0

    def __post_init__(self) -> None:
        lo, hi = self.short_side
        if not 0 < self.crop <= lo <= hi:
            raise ValueError(f"need 0 < crop <= short side min <= max, got crop {self.crop}, short side {lo}-{hi}")

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of one random square, in the image's pixels (floats: Pillow resamples
        sub-pixel boxes)."""
        side = min(width, height) * self.crop / rng.uniform(*self.short_side)
        left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
        return left, top, left + side, top + side

    def smallest(self) -> float:
        """The smallest crop, as a fraction of the short side."""
        return self.crop / self.short_side[1]


VIEW_STREAM = 0x56494557  # "VIEW": keeps the views' random numbers apart from any other use of the build's seed


def view_rng(seed: int, image: int, view: int) -> np.random.Generator:
    """The generator of view `view` of the image at position `image` of the training split: a function of these
    three numbers alone, so the views do not depend on worker count or chunking."""
    return np.random.default_rng([seed, VIEW_STREAM, image, view])


def load_views(
    item: str | bytes | np.ndarray,
    n_px: int,
    transform: ViewTransform,
    seed: int,
    image: int,
    k: int,
    draft: bool = True,
) -> np.ndarray:
    """K augmented views (k, n_px, n_px, 3) uint8 of one image (`transform`, each keyed by (seed, image, view)).

    The image is decoded once; a big JPEG in draft mode at a scale that keeps the smallest crop >= 2·n_px a side.
    Raises what `load_rgb` raises."""
    img = _open_rgb(item, math.ceil(2 * n_px / transform.smallest()) if draft else None)
    out = np.empty((k, n_px, n_px, 3), np.uint8)
    for v in range(k):
        box = transform.box(*img.size, view_rng(seed, image, v))
        out[v] = np.asarray(img.resize((n_px, n_px), _FILTER, box=box, reducing_gap=_REDUCING_GAP), dtype=np.uint8)
    return out
