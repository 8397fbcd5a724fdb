"""The :class:`Dataset` container and the array helpers every loader shares.

A dataset is ``uint8`` image tensors ``(N, C, H, W)`` (or :class:`specialkit.streaming.ImageFiles`, the same on
disk), ``int64`` labels ``(N,)``, class names and a train/validation/test split. The registry that loads them by
name is :mod:`specialkit.data` (which re-exports everything here); the loaders (:mod:`specialkit.glyphs`,
:mod:`specialkit.loaders`, :mod:`specialkit.streaming`) build datasets with these helpers and import this module,
not the registry, so the registry can name them without an import cycle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SpecialkitError

__all__ = [
    "Dataset",
    "DatasetError",
    "split_train_val",
    "take_per_class",
    "resize_images",
    "to_float",
    "fingerprint_of",
    "is_streamed",
    "examples_per_class",
]


class DatasetError(SpecialkitError, ValueError):
    """A dataset could not be loaded; the message names the path, what was expected and the fix."""


@dataclass(frozen=True)
class Dataset:
    """A labelled image dataset held in memory.

    Attributes:
        name: registry name (``"glyphs"``, ``"cifar100"`` ...).
        class_names: (C,) readable class names, index = label.
        x_train, x_val, x_test: (N, channels, H, W) ``uint8`` images: tensors, or
            :class:`specialkit.streaming.ImageFiles` (same shape; indexing decodes) on the streaming path.
        y_train, y_val, y_test: (N,) ``int64`` labels in ``[0, C)``.
        coarse_names: names of the coarse groups, or ``None``.
        coarse_of_class: (C,) coarse group index of every class, or ``None``.
        hflip: whether a horizontal flip keeps the label (``False`` for glyphs and digits).
        fingerprint: short hash of the class names and the data; checkpoints record it.
    """

    name: str
    class_names: tuple[str, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    coarse_names: tuple[str, ...] | None = None
    coarse_of_class: np.ndarray | None = None
    hflip: bool = False
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise DatasetError(f"{self.name}: x_{split} must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DatasetError(
                    f"{self.name}: y_{split} must be int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
                )
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint_of(self))

    @property
    def num_classes(self) -> int:
        """How many classes the dataset has."""
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """Image channels (1 for grey, 3 for colour)."""
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        """Image side in pixels (images are square)."""
        return int(self.x_train.shape[-1])

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` for ``"train"``, ``"val"`` or ``"test"``."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"unknown split {which!r}; use 'train', 'val' or 'test'")
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    def summary(self) -> str:
        """One line: name, classes, image shape and split sizes."""
        h, w = int(self.x_train.shape[-2]), int(self.x_train.shape[-1])
        where = f", streamed from disk ({self.x_train.workers} decoding workers)" if is_streamed(self.x_train) else ""
        return (
            f"{self.name}: {self.num_classes} classes, {self.channels}x{h}x{w} px, "
            f"train {len(self.y_train)} / val {len(self.y_val)} / test {len(self.y_test)}{where}"
        )


def _resized(x: Any, size: int) -> Any:
    """:func:`resize_images` for a tensor; for streamed files the same resize, done per batch as they are read."""
    return resize_images(x, size) if isinstance(x, torch.Tensor) else x.resized(size)


def is_streamed(x: Any) -> bool:
    """True when ``x`` is images on disk (:class:`specialkit.streaming.ImageFiles`), not an in-memory tensor."""
    return not isinstance(x, torch.Tensor)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) ``uint8`` -> ``float32`` in [0, 1]; models normalise further themselves."""
    return x.float().div_(255.0)


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) ``uint8`` images to (N, C, size, size) with antialiased bilinear filtering."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if size < 1:
        raise DatasetError(f"image_size must be >= 1 (a side in pixels, e.g. 32), got {size}")
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, x.shape[0], 4096):
        chunk = x[start : start + 4096].float()
        y = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + 4096] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def take_per_class(y: torch.Tensor, per_class: int | None, *, seed: int) -> torch.Tensor:
    """Indices (sorted) of at most ``per_class`` examples of every class, chosen with ``seed``."""
    if per_class is None:
        return torch.arange(len(y))
    if per_class < 1:
        raise DatasetError(f"per_class must be at least 1, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.sort(torch.cat(keep)).values


def split_train_val(y: torch.Tensor, val_fraction: float, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: (train indices, val indices), each sorted; every class keeps >= 1 training example."""
    g = torch.Generator().manual_seed(seed + 7919)
    tr, va = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(int(round(len(idx) * val_fraction)), len(idx) - 1)
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return torch.sort(torch.cat(tr)).values, torch.sort(torch.cat(va)).values


def fingerprint_of(ds: Dataset) -> str:
    """A 16-hex-digit hash of the dataset name, class names, shapes and a sample of the pixels."""
    h = hashlib.sha256()
    h.update(ds.name.encode())
    h.update("\x00".join(ds.class_names).encode())
    for split in ("train", "val", "test"):
        x, y = ds.split(split)
        h.update(str(tuple(x.shape)).encode())
        step = max(1, len(y) // 256)
        h.update(x[::step].contiguous().numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def examples_per_class(ds: Dataset, *, per_class: int = 1, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of every class of ``split``: (C·k, channels, H, W) uint8 and (C·k,) labels."""
    x, y = ds.split(split)
    idx = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(ds.num_classes)])
    return x[idx], y[idx]
