"""One image file decoded to a ``uint8`` array: what the in-memory loaders (:mod:`specialkit.loaders`) and the
streaming path (:mod:`specialkit.streaming`) both read images with, so both see the very same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import DatasetError

__all__ = ["IMAGE_SUFFIXES", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
"""Suffixes (lower case) of the image files the image-folder datasets read."""

_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` as 8-bit ``mode`` ("L" or "RGB"), scaling 16/32-bit and float pixels to 0..255 (PIL's own
    convert clips them, so a 16-bit PNG comes out white) and compositing transparency over white."""
    if img.mode in _WIDE_MODES:
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert(mode)


def _center_crop_box(
    width: int, height: int, size: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """For a (width, height) image: the size to resize it to so it covers ``size`` (H, W) keeping its aspect
    ratio, and the centred crop box (left, top, right, bottom) of ``size`` in the resized image."""
    scale = max(size[0] / height, size[1] / width)
    w, h = max(size[1], round(width * scale)), max(size[0], round(height * scale))
    left, top = (w - size[1]) // 2, (h - size[0]) // 2
    return (w, h), (left, top, left + size[1], top + size[0])


def _read_image(path: Path, mode: str, size: tuple[int, int], crop: bool = False) -> np.ndarray:
    """One image file -> (H, W, C) ``uint8`` in PIL ``mode`` ("L" or "RGB"), resized to ``size`` (H, W)
    (``crop``: keeping the aspect ratio, the shorter side to fit and the centre cut out, as ImageNet models expect)."""
    try:
        with Image.open(path) as img:
            img = _to_mode(img, mode)
            if crop and img.size != (size[1], size[0]):
                resized, box = _center_crop_box(img.size[0], img.size[1], size)
                img = img.resize(resized, Image.Resampling.BILINEAR).crop(box)
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"cannot read image {path} ({type(err).__name__}: {err}); expected a readable "
            f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file. Fix: replace the file or delete it"
        ) from err
    return arr.reshape(size[0], size[1], -1)


read_image = _read_image
