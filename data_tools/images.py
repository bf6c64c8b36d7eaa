"""One image -> an n_px × n_px uint8 RGB array: as a viewer shows it (EXIF orientation, ICC colours), mode
conversion, square crop, antialiased resize.

Reference: docs/reference.md#preprocessing: images are downsampled to
n_px² (32, 48 or 64); evaluation uses a centre crop. Used by data_tools.build_shards workers.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageCms, ImageOps

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


def load_rgb(item: str | np.ndarray, n_px: int, mode: str = "center-crop", draft: bool = True) -> np.ndarray:
    """A file path or a uint8 array (H, W[, C]) -> uint8 (n_px, n_px, 3), rows of (y, x).

    `draft`: a big JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT (libjpeg's scaled decoding, still
    >= 2·n_px on the short side) instead of at full size: several times faster; the pixels differ slightly
    from full decoding + resize (bench/results/README.md measures both). Raises whatever Pillow raises for
    unreadable, truncated or non-image files.
    """
    if isinstance(item, np.ndarray):
        img = to_rgb(Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item))
    else:
        with Image.open(item) as f:
            if f.format == "JPEG" and draft:
                # Full-size decoding would dominate the time to shard ImageNet.
                f.draft(None, (2 * n_px, 2 * n_px))
            f.load()
            img = to_rgb(as_displayed(f))
    return np.asarray(square(img, n_px, mode), dtype=np.uint8)


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
