"""Datasets as in-memory tensors: one call, one :class:`Dataset`.

Every dataset in the registry comes back the same way: ``uint8`` image tensors of shape
``(N, C, H, W)``, ``int64`` labels of shape ``(N,)``, class names, a train/validation/test split
(the validation split is what later stages study confusions on; the test split is only for final
numbers), and optional coarse labels.

>>> from specialkit import data
>>> ds = data.load("glyphs", per_class=40)          # built in, offline, deterministic
>>> ds.num_classes, ds.x_train.shape[1:]
(62, torch.Size([1, 32, 32]))
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Dataset",
    "DatasetError",
    "load",
    "available",
    "register",
    "split_train_val",
    "take_per_class",
    "resize_images",
    "to_float",
    "fingerprint_of",
    "is_streamed",
    "STREAMABLE",
]


class DatasetError(ValueError):
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
                raise DatasetError(f"{self.name}: y_{split} must be int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint_of(self))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
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


Loader = Callable[..., Dataset]
_REGISTRY: dict[str, Callable[[], Loader]] = {}


def register(name: str, factory: Callable[[], Loader]) -> None:
    """Register ``factory`` (returning a loader function) under ``name``; imports stay lazy."""
    _REGISTRY[name] = factory


def available() -> list[str]:
    """Names :func:`load` accepts."""
    return sorted(_REGISTRY)


def load(
    name: str = "glyphs",
    *,
    root: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    in_memory: bool | None = None,
    memory_budget_gb: float | None = None,
    stream_workers: int = 2,
    **options: object,
) -> Dataset:
    """Load a dataset from the registry.

    Args:
        name: one of :func:`available` (``glyphs``, ``cifar100``, ``cifar10``, ``mnist``,
            ``fashion_mnist``, ``tiny_imagenet``, ``imagefolder``).
        root: folder holding the files (torchvision layouts, ``tiny-imagenet-200/``, or
            ``root/<class>/*.png`` for ``imagefolder``); for ``glyphs`` the cache folder.
        download: let torchvision fetch the files when the network allows it.
        image_size: resize every image to ``image_size`` x ``image_size`` (e.g. 32 for CPU runs).
        per_class: keep at most this many training images per class (before the validation split
            for datasets that have no validation split of their own).
        val_fraction: share of the training images held out for validation (stratified) where the
            dataset has no validation split of its own.
        seed: makes the subset and split choice reproducible.
        in_memory: ``None`` = decode into memory when the images fit ``memory_budget_gb``, else stream
            them from disk (:mod:`specialkit.streaming`); ``True``/``False`` forces either. Only the
            image-file datasets (:data:`STREAMABLE`) can stream; the others are always in memory.
        memory_budget_gb: the budget for ``in_memory=None``; ``None`` = a quarter of the machine's RAM.
        stream_workers: worker processes that decode batches on the streaming path.
        **options: loader-specific options (``glyphs``: ``train_per_class``, ``fonts`` ...).
    """
    if name not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(available())}")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if name in STREAMABLE:
        options = {**options, "in_memory": in_memory, "memory_budget_gb": memory_budget_gb, "stream_workers": stream_workers}
    elif in_memory is False:
        raise DatasetError(f"{name} is read into memory whole (in_memory=False streams only the image-folder datasets "
                           f"{', '.join(STREAMABLE)}); Fix: set in_memory to null (auto) or true for {name}")  # fmt: skip
    if name == "imagenet" and image_size is not None:
        options.setdefault("size", image_size)  # decoded and centre-cropped straight to it, not resized twice
    loader = _REGISTRY[name]()
    ds = loader(root=root, download=download, per_class=per_class, val_fraction=val_fraction, seed=seed, **options)
    if image_size is not None and tuple(ds.x_train.shape[-2:]) != (image_size, image_size):
        ds = replace(
            ds,
            x_train=_resized(ds.x_train, image_size),
            x_val=_resized(ds.x_val, image_size),
            x_test=_resized(ds.x_test, image_size),
            fingerprint="",
        )
    return ds


STREAMABLE = ("imagefolder", "imagenet", "tiny_imagenet")
"""Datasets whose images are files that the streaming path can read batch by batch."""


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


def _glyphs() -> Loader:
    from .glyphs import load_glyphs

    return load_glyphs


def _loader(name: str) -> Callable[[], Loader]:
    def factory() -> Loader:
        from . import loaders

        return getattr(loaders, f"load_{name}")

    return factory


register("glyphs", _glyphs)
register("glyphs_hard", lambda: __import__("specialkit.glyphs", fromlist=["load_glyphs_hard"]).load_glyphs_hard)
for _name in ("cifar10", "cifar100", "mnist", "fashion_mnist", "tiny_imagenet", "imagefolder", "imagenet"):
    register(_name, _loader(_name))


def examples_per_class(ds: Dataset, *, per_class: int = 1, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of every class of ``split``: (C·k, channels, H, W) uint8 and (C·k,) labels."""
    x, y = ds.split(split)
    idx = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(ds.num_classes)])
    return x[idx], y[idx]
