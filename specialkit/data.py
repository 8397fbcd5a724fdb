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

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .dataset import (  # noqa: F401 - the registry's public names, as before the split
    Dataset,
    DatasetError,
    _resized,
    examples_per_class,
    fingerprint_of,
    is_streamed,
    resize_images,
    split_train_val,
    take_per_class,
    to_float,
)

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
    "load_for",
    "load_configured",
    "examples_per_class",
]


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
        options = {
            **options,
            "in_memory": in_memory,
            "memory_budget_gb": memory_budget_gb,
            "stream_workers": stream_workers,
        }
    elif in_memory is False:
        raise DatasetError(
            f"{name} is read into memory whole (in_memory=False streams only the image-folder datasets "
            f"{', '.join(STREAMABLE)}); Fix: set in_memory to null (auto) or true for {name}"
        )
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


def load_for(
    config: Any, *, log: Callable[[str], None] = print, timed: Callable[[str, float], None] | None = None
) -> Dataset:
    """The dataset a run's settings name, checked against them (``k``, ``top_n`` ... fit its classes).

    Args:
        config: a ``PipelineConfig`` (dataset, root, image size, per class, split, streaming settings).
        log: where the one-line summary goes.
        timed: called with ``("data", seconds)`` after loading.

    Returns:
        The dataset.
    """
    t0 = time.perf_counter()
    ds = load_configured(config)
    config.validate(ds.num_classes)
    if timed is not None:
        timed("data", time.perf_counter() - t0)
    log(f"[data] {ds.summary()}")
    return ds


def load_configured(config: Any) -> Dataset:
    """The dataset a run's settings name (dataset, root, image size, per class, split, streaming settings), unchecked.

    Args:
        config: a ``PipelineConfig``.

    Returns:
        The dataset.
    """
    c = config
    return load(
        c.dataset,
        root=c.root,
        download=c.download,
        image_size=c.image_size,
        per_class=c.per_class,
        val_fraction=c.val_fraction,
        seed=c.data_seed,
        in_memory=c.in_memory,
        memory_budget_gb=c.memory_budget_gb,
        stream_workers=c.stream_workers,
    )


STREAMABLE = ("imagefolder", "imagenet", "tiny_imagenet")
"""Datasets whose images are files that the streaming path can read batch by batch."""


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
