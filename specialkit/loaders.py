"""Loaders for the real image datasets in :mod:`specialkit.data`'s registry.

Every ``load_<name>`` has the signature
``load_<name>(*, root, download, per_class, val_fraction, seed, **options) -> Dataset`` and is
normally reached through :func:`specialkit.data.load`. Each returns ``uint8`` images
``(N, C, H, W)``, ``int64`` labels ``(N,)`` and the class names; the official training set is cut
to ``per_class`` images per class (:func:`~specialkit.data.take_per_class`) and then split into
train/val (:func:`~specialkit.data.split_train_val`, stratified); the official test split is the
test split.

===============  ==================================================  ========  =====
name             files under ``root``                                channels  hflip
===============  ==================================================  ========  =====
cifar10          ``cifar-10-batches-py/`` (torchvision)              3 x 32    yes
cifar100         ``cifar-100-python/`` (torchvision) + 20 coarse     3 x 32    yes
mnist            ``MNIST/raw/*-ubyte`` (torchvision)                 1 x 28    no
fashion_mnist    ``FashionMNIST/raw/*-ubyte`` (torchvision)          1 x 28    no
tiny_imagenet    ``tiny-imagenet-200/`` (official zip, no download)  3 x 64    yes
imagefolder      ``root/<class>/*.png|jpg|jpeg|bmp``                 1 or 3    yes
===============  ==================================================  ========  =====

``root=None`` means :func:`default_root` (not for ``imagefolder``). Anything wrong with the files
raises :class:`~specialkit.data.DatasetError` naming the path, what was expected and the fix.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from . import streaming as st
from .dataset import Dataset, DatasetError, split_train_val, take_per_class
from .imagefiles import IMAGE_SUFFIXES, _center_crop_box, _read_image, _to_mode  # noqa: F401 - kept importable from here

__all__ = [
    "IMAGE_SUFFIXES",
    "TINY_IMAGENET_URL",
    "default_root",
    "load_cifar10",
    "load_cifar100",
    "load_mnist",
    "load_fashion_mnist",
    "load_tiny_imagenet",
    "load_imagefolder",
    "load_imagenet",
    "STREAM_OPTIONS",
]

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_SIZE = 64
_TEST_SEED_OFFSET = 104_729  # imagefolder's test split must not reuse the train/val split's stream
_TORCHVISION_CLASSES = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
}
_TORCHVISION_ERRORS = (
    RuntimeError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AssertionError,
    EOFError,
    pickle.UnpicklingError,
)


def default_root() -> Path:
    """Where datasets live when ``root`` is None: ``$SPECIALKIT_DATA``, else
    ``$SPECIALKIT_CACHE/data``, else ``~/.cache/specialkit/data``."""
    if os.environ.get("SPECIALKIT_DATA"):
        return Path(os.environ["SPECIALKIT_DATA"]).expanduser()
    cache = os.environ.get("SPECIALKIT_CACHE") or str(Path.home() / ".cache" / "specialkit")
    return Path(cache).expanduser() / "data"


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _reject_options(name: str, options: Mapping[str, object], allowed: Sequence[str] = ()) -> None:
    """Raise if ``options`` holds a key the loader does not know (no silently ignored typos)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise DatasetError(f"{name}: unknown option(s) {', '.join(unknown)}; options this loader accepts: {accepted}")


def _check_fraction(name: str, what: str, value: float) -> None:
    if not 0.0 < float(value) < 1.0:
        raise DatasetError(f"{name}: {what} must lie in (0, 1), got {value}")


def _train_val_indices(
    y: torch.Tensor, *, per_class: int | None, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into ``y`` (N,) of the train and val parts: ``per_class`` subset, then stratified split."""
    keep = take_per_class(y, per_class, seed=seed)
    train, val = split_train_val(y[keep], val_fraction, seed=seed)
    return keep[train], keep[val]


def _check_labels(name: str, y: torch.Tensor, num_classes: int, where: Path) -> None:
    """Raise unless every label in ``y`` (N,) lies in ``[0, num_classes)``."""
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetError(
            f"{name}: labels in {where} range over [{int(y.min())}, {int(y.max())}] but there are "
            f"{num_classes} class names; the files do not belong together, replace them with the official ones"
        )


def _to_nchw(data: Any) -> torch.Tensor:
    """Torchvision's ``.data``: (N, H, W) tensor or (N, H, W, C) array -> (N, C, H, W) ``uint8`` tensor."""
    if isinstance(data, np.ndarray) and data.ndim == 4:
        return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2), dtype=np.uint8))  # CIFAR: a view
    x = torch.as_tensor(data, dtype=torch.uint8)
    return (x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous()


# --------------------------------------------------------------------------------------------
# torchvision datasets: CIFAR-10/100, MNIST, Fashion-MNIST
# --------------------------------------------------------------------------------------------


def _torchvision_class(name: str) -> type:
    import torchvision.datasets as tvd

    return getattr(tvd, _TORCHVISION_CLASSES[name])


def _torchvision_layout(cls: type, root: Path) -> tuple[Path, list[str]]:
    """The folder torchvision reads under ``root`` and the file names it expects there."""
    if hasattr(cls, "base_folder"):  # CIFAR
        files = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return root / cls.base_folder, files
    files = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]  # MNIST family
    return root / cls.__name__ / "raw", files


def _torchvision_root(cls: type, root: str | Path | None) -> Path:
    """``root`` as torchvision wants it; also accepts the dataset folder itself (``.../cifar-100-python``)."""
    path = default_root() if root is None else Path(root).expanduser()
    own = getattr(cls, "base_folder", cls.__name__)
    if path.name == own:
        return path.parent
    if path.name == "raw" and path.parent.name == own:
        return path.parent.parent
    return path


def _torchvision_open(name: str, cls: type, root: Path, *, train: bool, download: bool) -> Any:
    """Instantiate the torchvision dataset; its errors become a :class:`DatasetError` with the fix."""
    try:
        return cls(str(root), train=train, download=download)
    except _TORCHVISION_ERRORS as err:
        folder, files = _torchvision_layout(cls, root)
        split = "training" if train else "test"
        hint = (
            "the download failed; check the network, or put the files there by hand"
            if download
            else "pass download=True where the network allows, or put the official files there"
        )
        if not download and folder.is_dir() and any(folder.glob("*.gz")):
            hint += " (the .gz files already there are unpacked by download=True without the network)"
        raise DatasetError(
            f"{name}: could not load the {split} split from {folder} ({type(err).__name__}: {err}). "
            f"Expected the official files {', '.join(files)} in {folder}. Fix: {hint} "
            f"(delete a corrupt or partial file first so it is fetched again)."
        ) from err


def _torchvision_splits(
    name: str, root: str | Path | None, download: bool
) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Path]:
    """(class_names, x_train (N, C, H, W), y_train (N,), x_test, y_test, folder) of a torchvision dataset."""
    cls = _torchvision_class(name)
    path = _torchvision_root(cls, root)
    train = _torchvision_open(name, cls, path, train=True, download=download)
    test = _torchvision_open(name, cls, path, train=False, download=False)
    class_names = tuple(str(c) for c in train.classes)
    folder = _torchvision_layout(cls, path)[0]
    arrays = []
    for part in (train, test):
        x = _to_nchw(part.data)
        y = torch.as_tensor(np.asarray(part.targets, dtype=np.int64))
        if len(x) != len(y):
            raise DatasetError(
                f"{name}: {folder} holds {len(x)} images but {len(y)} labels in one split; "
                "replace the files with the official ones"
            )
        _check_labels(name, y, len(class_names), folder)
        arrays += [x, y]
    return (class_names, *arrays, folder)


def _load_torchvision(
    name: str,
    *,
    root: str | Path | None,
    download: bool,
    per_class: int | None,
    val_fraction: float,
    seed: int,
    hflip: bool,
) -> tuple[Dataset, Path]:
    """A :class:`Dataset` from a torchvision dataset, and the folder it was read from."""
    _check_fraction(name, "val_fraction", val_fraction)
    class_names, x_all, y_all, x_test, y_test, folder = _torchvision_splits(name, root, download)
    train, val = _train_val_indices(y_all, per_class=per_class, val_fraction=val_fraction, seed=seed)
    ds = Dataset(
        name=name,
        class_names=class_names,
        x_train=x_all[train],
        y_train=y_all[train],
        x_val=x_all[val],
        y_val=y_all[val],
        x_test=x_test,
        y_test=y_test,
        hflip=hflip,
    )
    return ds, folder


def load_cifar10(
    *,
    root: str | Path | None = None,
    download: bool = False,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    **options: object,
) -> Dataset:
    """CIFAR-10 via ``torchvision.datasets.CIFAR10``: images (N, 3, 32, 32), 10 classes.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (or that folder itself).
        download: let torchvision fetch the archive (about 170 MB).
        per_class: training images per class (``None``: all).
        val_fraction: the share of the training images held out for validation.
        seed: the seed of the train/validation split (see :func:`specialkit.data.load`).
        **options: none are taken (one is an error naming it).
    """
    _reject_options("cifar10", options)
    return _load_torchvision(
        "cifar10", root=root, download=download, per_class=per_class, val_fraction=val_fraction, seed=seed, hflip=True
    )[0]


def load_cifar100(
    *,
    root: str | Path | None = None,
    download: bool = False,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    **options: object,
) -> Dataset:
    """CIFAR-100 via ``torchvision.datasets.CIFAR100``: images (N, 3, 32, 32), 100 classes and the
    20 coarse superclasses (``coarse_names`` (20,), ``coarse_of_class`` (100,) int64).

    Args:
        root: folder holding ``cifar-100-python/`` (or that folder itself).
        download: let torchvision fetch the archive (about 160 MB).
        per_class: training images per class (``None``: all).
        val_fraction: the share of the training images held out for validation.
        seed: the seed of the train/validation split (see :func:`specialkit.data.load`).
        **options: none are taken (one is an error naming it).
    """
    _reject_options("cifar100", options)
    ds, folder = _load_torchvision(
        "cifar100", root=root, download=download, per_class=per_class, val_fraction=val_fraction, seed=seed, hflip=True
    )
    coarse_names, coarse_of_class = _cifar100_coarse(folder, ds.num_classes)
    return replace(ds, coarse_names=coarse_names, coarse_of_class=coarse_of_class)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only (the CIFAR pickles need nothing else)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys (the files were written by Python 2)."""
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise DatasetError(
            f"cannot read {path} ({type(err).__name__}: {err}); expected an official CIFAR pickle. "
            "Fix: delete it and pass download=True, or put the official file there"
        ) from err
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} holds a {type(raw).__name__}, expected a dict; replace it with the official file")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in raw.items()}


def _cifar100_coarse(folder: Path, num_classes: int) -> tuple[tuple[str, ...], np.ndarray]:
    """(coarse_names (K,), coarse_of_class (num_classes,) int64) from ``meta`` and the per-image labels.

    The small ``test`` pickle names every class in the official files; ``train`` is read only when
    it does not.
    """
    meta = _read_pickle(folder / "meta")
    if "coarse_label_names" not in meta:
        raise DatasetError(f"cifar100: {folder / 'meta'} has no 'coarse_label_names'; put the official file there")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta["coarse_label_names"])
    fine, coarse = _fine_coarse(folder / "test")
    if len(np.unique(fine)) < num_classes:
        more = _fine_coarse(folder / "train")
        fine, coarse = np.concatenate([fine, more[0]]), np.concatenate([coarse, more[1]])
    return names, _coarse_of_class(fine, coarse, num_classes, len(names), folder)


def _fine_coarse(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``fine_labels`` and ``coarse_labels`` (N,) int64 of one CIFAR-100 pickle."""
    d = _read_pickle(path)
    for key in ("fine_labels", "coarse_labels"):
        if key not in d:
            raise DatasetError(f"cifar100: {path} has no {key!r} entry; replace it with the official file")
    return np.asarray(d["fine_labels"], dtype=np.int64), np.asarray(d["coarse_labels"], dtype=np.int64)


def _coarse_of_class(
    fine: np.ndarray, coarse: np.ndarray, num_classes: int, num_coarse: int, folder: Path
) -> np.ndarray:
    """(num_classes,) coarse group of every fine class, from per-example labels ``fine``, ``coarse`` (N,)."""
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0) if len(fine) else np.empty((0, 2), np.int64)
    fix = "replace them with the official files"
    if len(np.unique(pairs[:, 0])) != len(pairs):
        raise DatasetError(f"cifar100: the pickles in {folder} put one fine class into several coarse groups; {fix}")
    if len(pairs) and (pairs.min() < 0 or pairs[:, 0].max() >= num_classes or pairs[:, 1].max() >= num_coarse):
        raise DatasetError(f"cifar100: the pickles in {folder} have fine or coarse labels out of range; {fix}")
    out = np.full(num_classes, -1, dtype=np.int64)
    out[pairs[:, 0]] = pairs[:, 1]
    missing = np.flatnonzero(out < 0).tolist()
    if missing:
        raise DatasetError(f"cifar100: the pickles in {folder} have no images of fine classes {missing[:10]}; {fix}")
    return out


def load_mnist(
    *,
    root: str | Path | None = None,
    download: bool = False,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    **options: object,
) -> Dataset:
    """MNIST via ``torchvision.datasets.MNIST``: images (N, 1, 28, 28), 10 digit classes, no flips.

    Args:
        root: folder holding ``MNIST/raw/train-images-idx3-ubyte`` ... (uncompressed; with only
            the ``.gz`` files there, ``download=True`` unpacks them without the network).
        download: let torchvision fetch the files.
        per_class: training images per class (``None``: all).
        val_fraction: the share of the training images held out for validation.
        seed: the seed of the train/validation split (see :func:`specialkit.data.load`).
        **options: none are taken (one is an error naming it).
    """
    _reject_options("mnist", options)
    return _load_torchvision(
        "mnist", root=root, download=download, per_class=per_class, val_fraction=val_fraction, seed=seed, hflip=False
    )[0]


def load_fashion_mnist(
    *,
    root: str | Path | None = None,
    download: bool = False,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    **options: object,
) -> Dataset:
    """Fashion-MNIST via ``torchvision.datasets.FashionMNIST``: images (N, 1, 28, 28), 10 classes.

    Args:
        root: folder holding ``FashionMNIST/raw/train-images-idx3-ubyte`` ... (uncompressed).
        download: let torchvision fetch the files.
        per_class: training images per class (``None``: all).
        val_fraction: the share of the training images held out for validation.
        seed: the seed of the train/validation split (see :func:`specialkit.data.load`).
        **options: none are taken (one is an error naming it).
    """
    _reject_options("fashion_mnist", options)
    return _load_torchvision(
        "fashion_mnist",
        root=root,
        download=download,
        per_class=per_class,
        val_fraction=val_fraction,
        seed=seed,
        hflip=False,
    )[0]


# --------------------------------------------------------------------------------------------
# image files: Tiny-ImageNet and imagefolder
# --------------------------------------------------------------------------------------------


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _image_files(folder: Path) -> list[Path]:
    """Image files (by suffix, case-insensitive) directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _image_size_of(path: Path) -> tuple[int, int]:
    """(H, W) of one image file, read from its header."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"cannot read image {path} ({type(err).__name__}: {err}); expected a readable image. "
            "Fix: replace the file or delete it"
        ) from err
    return height, width


def _read_images(
    paths: Sequence[Path], *, channels: int, size: tuple[int, int], workers: int, crop: bool = False
) -> torch.Tensor:
    """Decode ``paths`` (N,) in parallel threads into a (N, channels, H, W) ``uint8`` tensor."""
    out = np.empty((len(paths), size[0], size[1], channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"

    def fill(i: int) -> None:
        out[i] = _read_image(paths[i], mode, size, crop)

    if len(paths):
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
            list(pool.map(fill, range(len(paths))))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def check_inside_root(name: str, root: Path, splits: Mapping[str, tuple[Sequence[Path], torch.Tensor]]) -> None:
    """Refuse files that lie outside the data root through a symbolic link (a linked file or class folder):
    a dataset is what its folder holds, and a link out of it can read anything the user can. Both the
    in-memory and the streaming paths read these files, so both are covered.

    Args:
        name: the loader, for the message.
        root: the data root the user named.
        splits: split -> (files (N,), labels (N,)), as the loader found them.

    Raises:
        DatasetError: naming the first such link, its target and the fix.
    """
    top = root.expanduser().resolve()
    parents: dict[Path, Path] = {}
    for paths, _ in splits.values():
        for path in paths:
            parent = parents.get(path.parent)
            if parent is None:
                parent = parents[path.parent] = path.parent.resolve()
            target = path.resolve() if path.is_symlink() else parent / path.name
            if not target.is_relative_to(top):
                link = next((q for q in (path, *path.parents) if q.is_symlink()), path)
                raise DatasetError(
                    f"{name}: {link} is a symbolic link to {link.resolve()}, outside the data root {top}; the kit "
                    "reads only files under the root. Fix: copy the files into the root, or pass the folder that "
                    "holds them as the root"
                )


def _pick(paths: Sequence[Path], labels: torch.Tensor, idx: torch.Tensor) -> tuple[list[Path], torch.Tensor]:
    """The files and labels (len(idx),) at indices ``idx`` (sorted, from the split helpers)."""
    return [paths[i] for i in idx.tolist()], labels[idx].clone()


def _files_dataset(
    name: str,
    class_names: tuple[str, ...],
    splits: Mapping[str, tuple[Sequence[Path], torch.Tensor]],
    *,
    channels: int,
    size: tuple[int, int],
    workers: int,
    hflip: bool,
    streaming: Mapping[str, object] | None = None,
    crop: bool = False,
) -> Dataset:
    """The files of every split (``"train"/"val"/"test"`` -> (files (N,), labels (N,))) as a Dataset: decoded
    into memory, or left on disk as :class:`~specialkit.streaming.ImageFiles` when ``streaming`` (the
    :data:`STREAM_OPTIONS` given to the loader) says so or the decoded images would not fit the memory budget."""
    opts = dict(streaming or {})
    n_images = sum(len(paths) for paths, _ in splits.values())
    keep = st.choose_in_memory(
        st.decoded_bytes(n_images, channels, size),
        in_memory=opts.get("in_memory"),  # type: ignore[arg-type]
        memory_budget_gb=opts.get("memory_budget_gb"),
    )  # type: ignore[arg-type]
    arrays: dict[str, Any] = {}
    for split, (paths, labels) in splits.items():
        if keep:
            arrays[f"x_{split}"] = _read_images(paths, channels=channels, size=size, workers=workers, crop=crop)
        else:
            arrays[f"x_{split}"] = st.ImageFiles(
                paths, channels=channels, size=size, crop=crop, workers=int(opts.get("stream_workers", 2))
            )  # type: ignore[call-overload]
        arrays[f"y_{split}"] = labels
    return Dataset(name=name, class_names=class_names, hflip=hflip, **arrays)


STREAM_OPTIONS = ("in_memory", "memory_budget_gb", "stream_workers")
"""Options of the loaders that can stream from disk (:func:`specialkit.data.load` passes them on)."""


def _stream_options(options: Mapping[str, object]) -> dict[str, object]:
    return {k: options[k] for k in STREAM_OPTIONS if k in options}


# ---- Tiny-ImageNet --------------------------------------------------------------------------


def _tiny_imagenet_folder(root: str | Path | None) -> Path:
    """The ``tiny-imagenet-200`` folder: ``root`` itself or ``root/tiny-imagenet-200``."""
    base = default_root() if root is None else Path(root).expanduser()
    for folder in (base, base / "tiny-imagenet-200"):
        if (folder / "wnids.txt").is_file() or (folder / "train").is_dir():
            return folder
    raise DatasetError(
        f"tiny_imagenet: no Tiny-ImageNet at {base}; expected {base / 'tiny-imagenet-200'}/ with wnids.txt, "
        f"words.txt, train/<wnid>/images/*.JPEG and val/val_annotations.txt. Fix: download {TINY_IMAGENET_URL} "
        f"(about 240 MB; not fetched automatically) and unzip it into {base}, or pass root= the folder holding it"
    )


def _required_file(folder: Path, relative: str) -> Path:
    path = folder / relative
    if not path.is_file():
        raise DatasetError(
            f"tiny_imagenet: {path} is missing; expected the official tiny-imagenet-200 layout in {folder}. "
            f"Fix: unzip {TINY_IMAGENET_URL} again into {folder.parent}"
        )
    return path


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"tiny_imagenet: cannot read {path} ({err}); unzip {TINY_IMAGENET_URL} again") from err


def _tiny_imagenet_wnids(folder: Path) -> list[str]:
    """The class ids of ``wnids.txt``, sorted (label order, as torchvision's ImageFolder would give)."""
    path = _required_file(folder, "wnids.txt")
    wnids = [line.strip() for line in _read_lines(path)]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(
            f"tiny_imagenet: {path} must list distinct class ids (one wnid a line); "
            f"found {len(wnids)} lines, {len(set(wnids))} distinct. Fix: unzip {TINY_IMAGENET_URL} again"
        )
    return sorted(wnids)


def _tiny_imagenet_names(folder: Path, wnids: Sequence[str]) -> tuple[str, ...]:
    """Readable class names (C,): the first name ``words.txt`` gives each wnid, made unique by ``(wnid)``."""
    path = _required_file(folder, "words.txt")
    words: dict[str, str] = {}
    for line in _read_lines(path):
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.split(",")[0].strip()
    missing = [w for w in wnids if w not in words]
    if missing:
        raise DatasetError(f"tiny_imagenet: {path} has no entry for {missing[:5]}; unzip {TINY_IMAGENET_URL} again")
    first = [words[w] or w for w in wnids]
    counts = Counter(first)
    return tuple(n if counts[n] == 1 else f"{n} ({w})" for n, w in zip(first, wnids))


def _tiny_imagenet_train(folder: Path, wnids: Sequence[str]) -> tuple[list[Path], torch.Tensor]:
    """Files ``train/<wnid>/images/*`` (N,) and their labels (N,) int64."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        files = _image_files(images) if images.is_dir() else []
        if not files:
            raise DatasetError(
                f"tiny_imagenet: {images} holds no images; expected the training JPEGs of class {wnid}. "
                f"Fix: unzip {TINY_IMAGENET_URL} again into {folder.parent}"
            )
        paths += files
        labels += [label] * len(files)
    return paths, torch.tensor(labels, dtype=torch.int64)


def _tiny_imagenet_val(folder: Path, wnids: Sequence[str]) -> tuple[list[Path], torch.Tensor]:
    """Files ``val/images/*`` (N,) listed in ``val/val_annotations.txt`` and their labels (N,) int64."""
    path = _required_file(folder, "val/val_annotations.txt")
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for n, line in enumerate(_read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise DatasetError(
                f"tiny_imagenet: {path} line {n} is {line[:80]!r}; expected 'file<TAB>wnid<TAB>bbox...' "
                f"with a wnid from wnids.txt. Fix: unzip {TINY_IMAGENET_URL} again"
            )
        image = folder / "val" / "images" / fields[0].strip()
        if not image.is_file():
            raise DatasetError(
                f"tiny_imagenet: {image} is listed in {path} but missing; unzip {TINY_IMAGENET_URL} again"
            )
        paths.append(image)
        labels.append(index[fields[1].strip()])
    if not paths:
        raise DatasetError(f"tiny_imagenet: {path} lists no images; unzip {TINY_IMAGENET_URL} again")
    return paths, torch.tensor(labels, dtype=torch.int64)


def load_tiny_imagenet(
    *,
    root: str | Path | None = None,
    download: bool = False,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    **options: object,
) -> Dataset:
    """Tiny-ImageNet from its official folder: images (N, 3, 64, 64), 200 classes.

    The official training images are subset and split into train/val; the official
    validation images (``val/val_annotations.txt``) are the test split. Labels follow the sorted
    wnids; class names are the first name in ``words.txt`` (``"name (wnid)"`` where names repeat).
    Images of another mode or size are converted to RGB and resized to 64 x 64. Only the images a
    split uses are decoded (``per_class`` makes loading faster).

    Args:
        root: ``tiny-imagenet-200/`` itself or the folder holding it (default :func:`default_root`).
        download: not supported (the error says where to get the zip).
        per_class: training images per class (``None``: all).
        val_fraction: the share of the training images held out for validation.
        seed: the seed of the train/validation split (see :func:`specialkit.data.load`).
        **options: ``workers`` (decoding threads, default ``min(8, cpu_count)``).
    """
    _reject_options("tiny_imagenet", options, ("workers", *STREAM_OPTIONS))
    _check_fraction("tiny_imagenet", "val_fraction", val_fraction)
    folder = _tiny_imagenet_folder(root)
    wnids = _tiny_imagenet_wnids(folder)
    class_names = _tiny_imagenet_names(folder, wnids)
    train_paths, y_all = _tiny_imagenet_train(folder, wnids)
    test_paths, y_test = _tiny_imagenet_val(folder, wnids)
    check_inside_root("tiny_imagenet", folder, {"train": (train_paths, y_all), "test": (test_paths, y_test)})
    train, val = _train_val_indices(y_all, per_class=per_class, val_fraction=val_fraction, seed=seed)
    splits = {
        "train": _pick(train_paths, y_all, train),
        "val": _pick(train_paths, y_all, val),
        "test": (test_paths, y_test),
    }
    return _files_dataset(
        "tiny_imagenet",
        class_names,
        splits,
        channels=3,
        size=(TINY_IMAGENET_SIZE, TINY_IMAGENET_SIZE),
        workers=int(options.get("workers", _default_workers())),  # type: ignore[call-overload]
        hflip=True,
        streaming=_stream_options(options),
    )


# ---- imagefolder ------------------------------------------------------------------------------


def _scan_image_folder(root: Path, *, name: str = "imagefolder") -> tuple[tuple[str, ...], list[Path], torch.Tensor]:
    """(class_names (C,) = sorted sub-folder names, files (N,), labels (N,) int64) of ``root/<class>/*``."""
    expected = f"expected {root}/<class>/*.png|jpg|jpeg|bmp (one sub-folder per class)"
    loader = name
    if not root.is_dir():
        raise DatasetError(f"{loader}: {root} is not a folder; {expected}. Fix: pass root= such a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{loader}: {root} has no class sub-folders; {expected}. Fix: sort the images into them")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = _image_files(root / name)
        if not files:
            raise DatasetError(
                f"{loader}: class folder {root / name} holds no images; {expected}. "
                "Fix: add images to it or remove the folder"
            )
        paths += files
        labels += [label] * len(files)
    return tuple(classes), paths, torch.tensor(labels, dtype=torch.int64)


def _image_folder_size(size: object, first: Path) -> tuple[int, int]:
    """The common (H, W): ``size`` (int or (H, W)) or, when None, a square whose side is the longer side
    of the ``first`` image (images of other sizes or aspect ratios are resized to it)."""
    if size is None:
        side = max(_image_size_of(first))
        return side, side
    hw = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[arg-type]
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise DatasetError(f"imagefolder: size must be a positive int or (height, width), got {size!r}")
    return int(hw[0]), int(hw[1])


def _has_train_test(folder: Path) -> bool:
    """Whether ``folder`` holds ``train/`` and ``test/`` folders of class folders (e.g. CIFAR-10 as JPEGs)."""
    return all(
        (folder / split).is_dir() and any(p.is_dir() for p in (folder / split).iterdir()) for split in ("train", "test")
    )


def load_imagefolder(
    *,
    root: str | Path | None = None,
    download: bool = False,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    **options: object,
) -> Dataset:
    """Images sorted into class folders, ``root/<class>/*.png|jpg|jpeg|bmp``: (N, channels, H, W).

    Class names are the sorted folder names (hidden folders are skipped). A stratified share
    ``test_fraction`` of every class becomes the test split (drawn with a seed of its own, so it
    does not depend on ``per_class`` or ``val_fraction``); the rest is subset and split into
    train/val. When ``root`` holds ``train/<class>/`` and ``test/<class>/`` instead (CIFAR-10 as JPEG
    files, say), ``test/`` is the test split as given and train/val come from ``train/``. Only the
    images a split uses are decoded.

    Args:
        root: the folder holding the class folders (required).
        download: ignored (nothing to download).
        per_class: training images per class (``None``: all).
        val_fraction: the share of the training images held out for validation.
        seed: the seed of the train/validation split (see :func:`specialkit.data.load`).
        **options: ``channels`` (1 = grey or 3 = RGB, default 3; any mode or bit depth is converted:
            16-bit and float images are scaled to 8 bits, transparency is composited over white);
            ``size`` (int or (H, W): every image is resized to it; default a square whose side is the
            longer side of the first image, stated in ``Dataset.summary()``); ``test_fraction``
            (default 0.2; not with train/ and test/ folders); ``workers`` (decoding threads, default ``min(8, cpu_count)``).
    """
    del download
    _reject_options("imagefolder", options, ("channels", "size", "test_fraction", "workers", *STREAM_OPTIONS))
    if root is None:
        raise DatasetError("imagefolder: root is required; pass root= a folder holding <class>/*.png|jpg|jpeg|bmp")
    channels = options.get("channels", 3)
    if channels not in (1, 3):
        raise DatasetError(f"imagefolder: channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    test_fraction = float(options.get("test_fraction", 0.2))  # type: ignore[arg-type]
    _check_fraction("imagefolder", "test_fraction", test_fraction)
    _check_fraction("imagefolder", "val_fraction", val_fraction)
    folder = Path(root).expanduser()
    if _has_train_test(folder):  # root/train/<class>/*, root/test/<class>/*: the test split is the given one
        if "test_fraction" in options:
            raise DatasetError(
                f"imagefolder: {folder} has train/ and test/ folders, so its test split is given; drop test_fraction"
            )
        class_names, paths, labels = _scan_image_folder(folder / "train")
        test_names, test_paths, y_test = _scan_image_folder(folder / "test")
        if test_names != class_names:
            raise DatasetError(
                f"imagefolder: {folder / 'train'} and {folder / 'test'} name different class folders "
                f"({list(class_names)[:5]}... vs {list(test_names)[:5]}...); give both the same class folders"
            )
        check_inside_root("imagefolder", folder, {"train": (paths, labels), "test": (test_paths, y_test)})
        train, val = _train_val_indices(labels, per_class=per_class, val_fraction=val_fraction, seed=seed)
        splits = {"train": _pick(paths, labels, train), "val": _pick(paths, labels, val), "test": (test_paths, y_test)}
    else:
        class_names, paths, labels = _scan_image_folder(folder)
        check_inside_root("imagefolder", folder, {"all": (paths, labels)})
        rest, test = split_train_val(labels, test_fraction, seed=seed + _TEST_SEED_OFFSET)
        train, val = _train_val_indices(labels[rest], per_class=per_class, val_fraction=val_fraction, seed=seed)
        parts = {"train": rest[train], "val": rest[val], "test": test}
        splits = {split: _pick(paths, labels, idx) for split, idx in parts.items()}
    return _files_dataset(
        "imagefolder",
        class_names,
        splits,
        channels=int(channels),  # type: ignore[call-overload]
        size=_image_folder_size(options.get("size"), paths[0]),
        workers=int(options.get("workers", _default_workers())),  # type: ignore[call-overload]
        hflip=True,
        streaming=_stream_options(options),
    )


# ---- ImageNet (ILSVRC CLS-LOC layout) ---------------------------------------------------------

IMAGENET_SIZE = 64
_IMAGENET_LAYOUT = (
    "train/<wnid>/*.JPEG, and the validation images either in val/<wnid>/*.JPEG or in val/*.JPEG "
    "listed in LOC_val_solution.csv (ImageId,PredictionString)"
)


def _imagenet_folder(root: str | Path | None) -> Path:
    """The folder holding ``train/``: ``root`` itself or Kaggle's ``root/ILSVRC/Data/CLS-LOC``."""
    if root is None:
        raise DatasetError(f"imagenet: root is required; pass root= the folder holding {_IMAGENET_LAYOUT}")
    base = Path(root).expanduser()
    for folder in (base, base / "ILSVRC" / "Data" / "CLS-LOC", base / "Data" / "CLS-LOC"):
        if (folder / "train").is_dir():
            return folder
    raise DatasetError(
        f"imagenet: no train/ folder in {base}; expected {_IMAGENET_LAYOUT}. Fix: pass root= the folder "
        "holding train/ (or Kaggle's folder holding ILSVRC/Data/CLS-LOC/train)"
    )


def _imagenet_file(folder: Path, root: Path, name: str) -> Path | None:
    """``name`` in ``folder`` or one of its parents up to ``root`` (Kaggle keeps the CSVs at the top), or None."""
    for parent in (folder, *folder.parents):
        if (parent / name).is_file():
            return parent / name
        if parent == root:
            break
    return None


def _imagenet_names(mapping: Path | None, wnids: Sequence[str]) -> tuple[str, ...]:
    """Class names (C,): the first name ``LOC_synset_mapping.txt`` gives each wnid ("name (wnid)" where names
    repeat); the wnids themselves without that file."""
    if mapping is None:
        return tuple(wnids)
    words: dict[str, str] = {}
    for line in _read_lines(mapping):
        wnid, _, names = line.strip().partition(" ")
        words[wnid] = names.split(",")[0].strip()
    first = [words.get(w) or w for w in wnids]
    counts = Counter(first)
    return tuple(n if counts[n] == 1 else f"{n} ({w})" for n, w in zip(first, wnids))


def _imagenet_val_folders(val: Path, index: Mapping[str, int]) -> tuple[list[Path], torch.Tensor]:
    """Files ``val/<wnid>/*`` (N,) and labels (N,); every sub-folder must be a training class."""
    paths: list[Path] = []
    labels: list[int] = []
    for sub in sorted(p for p in val.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in index:
            raise DatasetError(
                f"imagenet: validation folder {sub} is not a class of train/ ({len(index)} classes); "
                f"Fix: remove it or add train/{sub.name}/ with its training images"
            )
        files = _image_files(sub)
        paths += files
        labels += [index[sub.name]] * len(files)
    if not paths:
        raise DatasetError(
            f"imagenet: {val}/<wnid>/ holds no images; expected {_IMAGENET_LAYOUT}. Fix: put the validation images there"
        )
    return paths, torch.tensor(labels, dtype=torch.int64)


def _imagenet_val_csv(csv_path: Path, val: Path, index: Mapping[str, int]) -> tuple[list[Path], torch.Tensor]:
    """Files ``val/<ImageId>.JPEG`` (N,) listed in ``LOC_val_solution.csv`` and their labels (N,): the first
    token of each PredictionString is the image's wnid."""
    import csv

    fix = "Fix: use the official LOC_val_solution.csv (header ImageId,PredictionString; one image a row)"
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"imagenet: cannot read {csv_path} ({type(err).__name__}: {err}); {fix}") from err
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise DatasetError(f"imagenet: {csv_path} does not start with the header ImageId,PredictionString; {fix}")
    paths: list[Path] = []
    labels: list[int] = []
    seen: set[str] = set()
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        image_id, wnid = (row[0].strip(), (row[1].split() or [""])[0]) if len(row) >= 2 else (row[0].strip(), "")
        if not image_id or wnid not in index:
            raise DatasetError(
                f"imagenet: {csv_path} line {n} is {','.join(row)[:80]!r}; expected "
                f"'ImageId,<wnid> x y x y ...' with a wnid of train/ ({len(index)} classes). {fix}"
            )
        if image_id in seen:
            raise DatasetError(f"imagenet: {csv_path} line {n} lists {image_id} a second time; {fix}")
        seen.add(image_id)
        image = next(
            (p for s in (".JPEG", ".jpeg", ".jpg", ".JPG", ".png") if (p := val / f"{image_id}{s}").is_file()), None
        )
        if image is None:
            raise DatasetError(
                f"imagenet: {csv_path} line {n} lists {image_id} but {val / (image_id + '.JPEG')} is missing; "
                "Fix: put the validation images in that folder, or remove the row"
            )
        paths.append(image)
        labels.append(index[wnid])
    if not paths:
        raise DatasetError(f"imagenet: {csv_path} lists no images; {fix}")
    unlisted = len(_image_files(val)) - len(paths)
    if unlisted > 0:
        raise DatasetError(
            f"imagenet: {val} holds {len(paths) + unlisted} images but {csv_path} lists only {len(paths)} of them, "
            f"so the test split would silently lose {unlisted}; {fix}, or move the unlisted images out of val/"
        )
    return paths, torch.tensor(labels, dtype=torch.int64)


def _imagenet_test(folder: Path, root: Path, index: Mapping[str, int]) -> tuple[list[Path], torch.Tensor]:
    """The official validation images (the test split): ``val/<wnid>/`` when it has class folders, else the CSV."""
    val = folder / "val"
    if val.is_dir() and any(p.is_dir() for p in val.iterdir()):
        return _imagenet_val_folders(val, index)
    csv_path = _imagenet_file(folder, root, "LOC_val_solution.csv")
    if csv_path is None or not val.is_dir():
        raise DatasetError(
            f"imagenet: no validation images in {folder}; expected {_IMAGENET_LAYOUT}. Fix: put them there "
            "(Kaggle's LOC_val_solution.csv may sit in the folder above)"
        )
    return _imagenet_val_csv(csv_path, val, index)


def load_imagenet(
    *,
    root: str | Path | None = None,
    download: bool = False,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    **options: object,
) -> Dataset:
    """ImageNet in its ILSVRC CLS-LOC layout: RGB images (N, 3, size, size), one class per ``train/<wnid>/``.

    The training images are subset and split into train/val; the official validation images are the
    test split, from ``val/<wnid>/*.JPEG`` or from ``val/*.JPEG`` labelled by ``LOC_val_solution.csv``
    (``ImageId,PredictionString``; the first token of the prediction string is the wnid). Labels follow
    the sorted wnids; class names come from ``LOC_synset_mapping.txt`` when present. Every image is
    resized keeping its aspect ratio (shorter side to ``size``) and its centre cut out. Whether the
    images are decoded into memory or streamed from disk follows ``in_memory`` / ``memory_budget_gb``
    (:mod:`specialkit.streaming`); ImageNet itself at 224 px is far over any laptop's budget and streams.

    Args:
        root: the folder holding ``train/`` and ``val/`` (or Kaggle's, holding ``ILSVRC/Data/CLS-LOC/``).
        download: not supported (ImageNet needs a licence; download it yourself).
        per_class: training images per class (``None``: all).
        val_fraction: the share of the training images held out for validation.
        seed: the seed of the train/validation split (see :func:`specialkit.data.load`).
        **options: ``size`` (side in pixels, default 64; ``data.load(image_size=...)`` sets it), ``workers``
            (decoding threads of the in-memory path), ``in_memory``, ``memory_budget_gb``, ``stream_workers``
            (see :mod:`specialkit.streaming`).
    """
    del download
    _reject_options("imagenet", options, ("size", "workers", *STREAM_OPTIONS))
    _check_fraction("imagenet", "val_fraction", val_fraction)
    size = options.get("size", IMAGENET_SIZE)
    if not isinstance(size, int) or size < 1:
        raise DatasetError(f"imagenet: size must be a positive int (side in pixels, e.g. 64 or 224), got {size!r}")
    folder = _imagenet_folder(root)
    wnids, train_paths, y_all = _scan_image_folder(folder / "train", name="imagenet")
    index = {w: i for i, w in enumerate(wnids)}
    test_paths, y_test = _imagenet_test(folder, Path(root).expanduser(), index)  # type: ignore[arg-type]
    check_inside_root("imagenet", folder, {"train": (train_paths, y_all), "test": (test_paths, y_test)})
    class_names = _imagenet_names(_imagenet_file(folder, Path(root).expanduser(), "LOC_synset_mapping.txt"), wnids)  # type: ignore[arg-type]
    train, val = _train_val_indices(y_all, per_class=per_class, val_fraction=val_fraction, seed=seed)
    splits = {
        "train": _pick(train_paths, y_all, train),
        "val": _pick(train_paths, y_all, val),
        "test": (test_paths, y_test),
    }
    return _files_dataset(
        "imagenet",
        class_names,
        splits,
        channels=3,
        size=(size, size),
        crop=True,
        workers=int(options.get("workers", _default_workers())),  # type: ignore[call-overload]
        hflip=True,
        streaming=_stream_options(options),
    )
