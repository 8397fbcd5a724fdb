"""Bring your own generalist: a model trained elsewhere (or only its predictions) as a run's generalist.

The setting ``generalist_from`` names the source, as ``<kind>:<...>``:

* ``torchvision:<arch>:<weights file>`` -- ``torchvision.models.get_model(arch, weights=None,
  num_classes=C)`` with the state dict in the file (``torch.load(..., weights_only=True)``; a plain
  state dict, or one under ``"state_dict"``/``"model"``; a ``module.`` prefix from DDP is dropped). No
  download ever happens. The model is a full :class:`models.TorchvisionClassifier`: specialists are
  initialised from it (head surgery on ``fc``/``classifier[-1]``/``head``), the compute-matched
  generalist and the student fine-tune it.
* ``torchvision:cifar_resnet<20|32|44|56|...>:<file>`` -- the kit's own CIFAR ResNet-(6n+2)
  (:class:`models.CifarResNetNet`, option-A shortcuts) with weights in the common public format (e.g.
  akamaster/pytorch_resnet_cifar10's ``resnet20-12fca82f.th``: ``state_dict``, ``module.`` prefix, final
  layer ``linear``, tensors saved on ``cuda:0``); loaded the same safe way, on the CPU. Those models
  expect ``generalist_normalize="imagenet"`` on 32 px images.
* ``torchscript:<file>`` -- ``torch.jit.load``; ``export:<file.pt2>`` -- ``torch.export.load(...).module()``.
  **Such a file is a program, not weights**: loading and running it runs whatever code it holds, with your
  permissions (as ``torch.load`` without ``weights_only`` would); the kit says so in the log each time it
  loads one. Bring only files you trust; prefer ``torchvision:`` (weights only, ``weights_only=True``).
  The kit runs it for its predictions; it cannot cut its head, so specialists train from scratch
  (the run's ``model``/``width``/``depth``, or ``specialist_*``) and there is no compute-matched
  generalist (the reason is logged and recorded in ``metrics.json``, key ``skipped``).
* ``predictions:<file.npz>`` -- predictions only (:func:`load_predictions`: ``val_probs`` or
  ``val_logits``, ``test_probs`` or ``test_logits``, ``val_labels``, ``test_labels``, optionally
  ``class_names``). Enough for the confusion, clusters, specialists (from scratch), Table 3/4 and the
  ensemble rules; no compute-matched generalist and no distillation (its teacher runs the generalist
  on every training batch).

Input of a model (kinds ``torchvision``, ``torchscript``, ``export``): the dataset's images as float in
[0, 1]; one channel is repeated to three when ``generalist_normalize="imagenet"``; resized to
``generalist_input_size`` when set (bilinear, antialiased); then normalised: ``imagenet`` = mean
(0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), what torchvision's pretrained weights expect;
``none`` = the [0, 1] values as they are (a model that normalises itself).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import models
from .errors import ConfigError

__all__ = [
    "KINDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GeneralistSourceError",
    "Source",
    "parse_source",
    "file_sha256",
    "normalisation",
    "torchvision_config",
    "load_torchvision",
    "ScriptedGeneralist",
    "load_scripted",
    "load_predictions",
    "save_predictions",
    "skip_reason",
    "scratch_reason",
]

KINDS = ("torchvision", "torchscript", "export", "predictions")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTAX = "torchvision:<arch>:<weights.pth> | torchscript:<model.pt> | export:<model.pt2> | predictions:<preds.npz>"


class GeneralistSourceError(ConfigError):
    """The ``generalist_from`` value or the file it names is unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class Source:
    """A parsed ``generalist_from`` value.

    Attributes:
        kind: one of :data:`KINDS`.
        path: the file.
        arch: the torchvision architecture (kind ``torchvision`` only).
    """

    kind: str
    path: Path
    arch: str | None = None

    @property
    def has_head(self) -> bool:
        """True when the kit can cut the model's head (specialists initialised from it, fine-tuning)."""
        return self.kind == "torchvision"

    @property
    def has_model(self) -> bool:
        """Whether the generalist comes as a model (a predictions file has none)."""
        return self.kind != "predictions"


def parse_source(value: str, *, must_exist: bool = True) -> Source:
    """Parse ``generalist_from`` (syntax in the module docstring); a bad value or missing file raises."""
    kind, _, rest = value.partition(":")
    if kind not in KINDS or not rest:
        raise GeneralistSourceError(f"generalist_from={value!r} is not understood; write {SYNTAX}")
    arch = None
    if kind == "torchvision":
        arch, _, rest = rest.partition(":")
        if not arch or not rest:
            raise GeneralistSourceError(
                f"generalist_from={value!r}: write torchvision:<arch>:<weights file>, "
                "e.g. torchvision:resnet50:/models/resnet50.pth"
            )
    path = Path(rest).expanduser()
    if must_exist and not path.is_file():
        raise GeneralistSourceError(
            f"generalist_from={value!r}: the file {path} does not exist; give the path of the {kind} file"
        )
    return Source(kind=kind, path=path, arch=arch)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks), hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def normalisation(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the ``generalist_normalize`` option: ``imagenet`` or ``none`` (0, 1)."""
    if normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if normalize == "none":
        return (0.0,), (1.0,)
    raise GeneralistSourceError(f"generalist_normalize={normalize!r}: choose imagenet or none")


def torchvision_config(
    source: Source, *, num_classes: int, in_channels: int, image_size: int, normalize: str, input_size: int | None
) -> models.ModelConfig:
    """The :class:`models.ModelConfig` of a ``torchvision`` source: 3 input channels with ``imagenet``
    normalisation (one-channel images are repeated), else the dataset's channels."""
    mean, std = normalisation(normalize)
    channels = 3 if len(mean) == 3 else in_channels
    return models.ModelConfig(
        name=f"{models.TORCHVISION_PREFIX}{source.arch}",
        num_classes=num_classes,
        in_channels=channels,
        image_size=image_size,
        mean=mean,
        std=std,
        input_size=input_size,
    )


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise GeneralistSourceError(
            f"weights file {path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{first}); save the model's state dict: torch.save(model.state_dict(), path)"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GeneralistSourceError(
            f"weights file {path} holds no state dict of tensors; save one with torch.save(model.state_dict(), path)"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_torchvision(source: Source, config: models.ModelConfig) -> models.TorchvisionClassifier:
    """Build ``config``'s torchvision model and load ``source.path``'s weights into it (eval mode).

    Raises:
        GeneralistSourceError: the file is unreadable, is for another architecture, or its classifier
            has another number of classes than the dataset (both counts named).
    """
    state = _state_dict(source.path)
    if models.cifar_resnet_depth(source.arch or "") is not None:  # final layer ``linear`` -> ``fc``
        state = models.cifar_resnet_state(state)
    model = models.build_model(config)
    head_w = state.get(f"{model._head_prefix}weight")
    if head_w is not None and head_w.ndim == 2 and head_w.shape[0] != config.num_classes:
        raise GeneralistSourceError(
            f"weights file {source.path} has a {head_w.shape[0]}-class classifier ({model._head_prefix}weight is "
            f"{tuple(head_w.shape)}), the dataset has {config.num_classes} classes: use weights fine-tuned on this dataset's "
            f"classes (same order), or bring the predictions (predictions:<file.npz>)"
        )
    try:
        model.load_torchvision_state(state)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:300]
        raise GeneralistSourceError(
            f"weights file {source.path} does not fit torchvision {source.arch!r} ({first}); name the "
            f"architecture the weights were saved from: torchvision:<arch>:{source.path}"
        ) from err
    return model.eval()


class ScriptedGeneralist(nn.Module):
    """A TorchScript or ``torch.export`` classifier behind the kit's input convention (float [0, 1] images):
    channel repeat, resize and normalisation as in the module docstring, then the network.

    Attributes:
        net: the loaded module. kind: ``torchscript`` or ``export``.
    """

    def __init__(self, net: nn.Module, *, kind: str, normalize: str, input_size: int | None) -> None:
        super().__init__()
        mean, std = normalisation(normalize)
        self.net, self.kind, self.input_size = net, kind, input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` the way the model was trained (grey to RGB, resize, mean/std), then run the model."""
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = torch.nn.functional.interpolate(
                x, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        return self.net(((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)).contiguous())

    def train(self, mode: bool = True) -> "ScriptedGeneralist":
        """Always eval: the kit never trains a scripted generalist; the module is left as loaded (a
        ``torch.export`` program refuses ``train()``, a TorchScript one is saved in its own mode)."""
        self.training = False
        return self


SCRIPTED_WARNING = (
    "warning: {path} is a {kind} program: loading and running it runs the code it holds with your "
    "permissions; bring only files you trust (torchvision:<arch>:<weights> loads weights only)"
)


def load_scripted(
    source: Source,
    *,
    normalize: str,
    input_size: int | None,
    path: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> ScriptedGeneralist:
    """Load a ``torchscript`` or ``export`` source (from ``path`` when given, e.g. the run's copy).

    Args:
        source: the parsed ``generalist_from``.
        normalize: ``imagenet`` or ``none`` (see the module docstring).
        input_size: resize images to this side first, or ``None``.
        path: the file to load instead of ``source.path``.
        log: where the warning that the file runs its own code goes (``None``: :func:`warnings.warn`).

    Returns:
        The model behind the kit's input convention, in eval mode.
    """
    path = path or source.path
    message = "[generalist] " + SCRIPTED_WARNING.format(path=path, kind=source.kind)
    if log is None:
        warnings.warn(message, UserWarning, stacklevel=2)
    else:
        log(message)
    try:
        if source.kind == "torchscript":
            net = torch.jit.load(str(path), map_location="cpu")
        else:
            net = torch.export.load(str(path)).module()
    except Exception as err:  # noqa: BLE001 - any loading failure means an unusable file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        how = (
            "torch.jit.save(torch.jit.script(model), path)"
            if source.kind == "torchscript"
            else "torch.export.save(torch.export.export(model, (x,)), path)"
        )
        raise GeneralistSourceError(
            f"{source.kind} file {path} cannot be loaded ({type(err).__name__}: {first}); write it with {how}"
        ) from err
    return ScriptedGeneralist(net, kind=source.kind, normalize=normalize, input_size=input_size).eval()


def check_outputs(logits: np.ndarray, *, path: Path, split: str, num_classes: int, rows: int) -> None:
    """A model's (N, K) outputs on ``split`` must have one column per dataset class and one row per image."""
    if logits.ndim != 2 or logits.shape[1] != num_classes or logits.shape[0] != rows:
        raise GeneralistSourceError(
            f"{path} gives outputs of shape {tuple(logits.shape)} on the {split} split, expected ({rows}, "
            f"{num_classes}) for the dataset's {num_classes} classes: bring a model over the dataset's classes"
        )
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise GeneralistSourceError(
            f"{path} gives NaN or infinite outputs for {int(bad.sum())} of {rows} images of the {split} split "
            f"(first: row {int(np.flatnonzero(bad)[0])}): nothing was saved; check the model and its input "
            "settings (generalist_normalize, generalist_input_size)"
        )


def load_predictions(
    path: str | Path, *, labels: dict[str, np.ndarray], class_names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Read and check a predictions file; returns split -> (N, C) float32 logits (``log p`` for probabilities).

    The file is an ``.npz`` (``numpy.savez``, no pickles; :func:`save_predictions` writes one) holding, per
    split ``val`` and ``test``: ``<split>_probs`` (rows sum to 1) or ``<split>_logits``, and ``<split>_labels``
    (N,), which must equal the dataset's labels of that split row by row (same images, same order);
    optionally ``class_names`` (C,), which must equal the dataset's.

    Args:
        path: the file.
        labels: split -> the dataset's (N,) labels.
        class_names: the dataset's (C,) class names.

    Raises:
        GeneralistSourceError: naming the file, the key, both counts and the fix.
    """
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise GeneralistSourceError(
            f"predictions file {path} is not a readable .npz ({type(err).__name__}: {err}); "
            "write it with specialkit.byog.save_predictions or numpy.savez"
        ) from err
    c = len(class_names)
    with z:
        if "class_names" in z.files:
            theirs = tuple(str(s) for s in _plain_array(z, "class_names", path, dtype="str"))
            if theirs != tuple(class_names):
                raise GeneralistSourceError(
                    f"predictions file {path}: its class_names ({len(theirs)} classes, {list(theirs[:5])}...) "
                    f"differ from the dataset's ({c} classes, {list(class_names[:5])}...): write the columns "
                    "in the dataset's class order"
                )
        out = {}
        for split, y in labels.items():
            key = next((f"{split}_{kind}" for kind in ("probs", "logits") if f"{split}_{kind}" in z.files), None)
            if key is None or f"{split}_labels" not in z.files:
                raise GeneralistSourceError(
                    f"predictions file {path} lacks {split}_probs (or {split}_logits) and {split}_labels "
                    f"(it holds {', '.join(z.files) or 'nothing'}): save both for the val and test splits"
                )
            p, theirs = (
                _number_array(z, key, path).astype(np.float64),
                _labels(_number_array(z, f"{split}_labels", path), path, split),
            )
            if p.ndim != 2 or p.shape[1] != c:
                raise GeneralistSourceError(
                    f"predictions file {path}: {key} has shape {p.shape}, i.e. {p.shape[-1]} classes, the "
                    f"dataset has {c} classes: give one column per class, in the dataset's class order"
                )
            if len(p) != len(theirs) or len(theirs) != len(y):
                raise GeneralistSourceError(
                    f"predictions file {path}: {key} has {len(p)} rows, {split}_labels {len(theirs)}, the "
                    f"dataset's {split} split {len(y)} images: predict every image of the split, in its order"
                )
            if not np.array_equal(np.asarray(theirs, dtype=np.int64), np.asarray(y, dtype=np.int64)):
                i = int(np.flatnonzero(np.asarray(theirs) != np.asarray(y))[0])
                raise GeneralistSourceError(
                    f"predictions file {path}: {split}_labels differ from the dataset's {split} labels (row {i}: "
                    f"{theirs[i]} there, {int(y[i])} in the dataset): the rows must follow the dataset's "
                    f"{split} images in order with the same class order"
                )
            if not np.isfinite(p).all():
                raise GeneralistSourceError(
                    f"predictions file {path}: {key} holds NaN or infinite values; write finite numbers"
                )
            if key.endswith("_probs"):
                if p.min() < 0 or np.abs(p.sum(axis=1) - 1).max() > 1e-3:
                    raise GeneralistSourceError(
                        f"predictions file {path}: the rows of {key} do not sum to 1 (or hold negatives): "
                        f"save probabilities, or save the raw scores as {split}_logits"
                    )
                p = np.log(np.clip(p, 1e-12, None))
            out[split] = p.astype(np.float32)
    return out


def _plain_array(z: np.lib.npyio.NpzFile, key: str, path: Path, *, dtype: str = "float") -> np.ndarray:
    """``z[key]`` without unpickling; an object array (which would need pickle) is refused naming the key and
    the ``dtype`` to save it as."""
    try:
        return z[key]
    except ValueError as err:  # numpy refuses object arrays when allow_pickle=False
        raise GeneralistSourceError(
            f"predictions file {path}: {key} holds Python objects (an object array), which the kit never "
            f"unpickles: save plain values, e.g. numpy.savez(path, {key}=numpy.asarray(x, dtype={dtype}))"
        ) from err


def _number_array(z: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """``z[key]`` as a plain numeric array; object arrays (pickles) and strings are refused naming the key."""
    a = _plain_array(z, key, path)
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise GeneralistSourceError(f"predictions file {path}: {key} holds {a.dtype} values, not numbers: save numbers")
    return a


def _labels(a: np.ndarray, path: Path, split: str) -> np.ndarray:
    """(N,) class indices: whole numbers only (3.0 is 3; 3.4, NaN and infinities are refused, never truncated
    or cast to a meaningless integer)."""
    if not np.issubdtype(a.dtype, np.integer):
        frac = np.flatnonzero(~np.isfinite(a) | (a != np.round(a))) if a.size else np.array([], dtype=int)
        if len(frac):
            i = int(frac[0])
            raise GeneralistSourceError(
                f"predictions file {path}: {split}_labels holds values that are not whole numbers "
                f"({len(frac)} of them; row {i}: {a.flat[i]!r}): labels are class indices 0..C-1, "
                "save them as integers"
            )
    return a.astype(np.int64)


def save_predictions(
    path: str | Path,
    *,
    probs: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    class_names: tuple[str, ...] | None = None,
    logits: bool = False,
) -> Path:
    """Write a predictions file for ``generalist_from="predictions:<path>"`` (atomically).

    Args:
        path: destination ``.npz``.
        probs: split (``val``, ``test``) -> (N, C) probabilities (or logits with ``logits=True``).
        labels: split -> (N,) labels, the dataset's labels of that split in order.
        class_names: (C,) the dataset's class names (checked on loading).
        logits: store the arrays as ``<split>_logits``.
    """
    import io

    from .runs import atomic_write_bytes

    arrays = {f"{s}_{'logits' if logits else 'probs'}": np.asarray(p) for s, p in probs.items()}
    arrays.update({f"{s}_labels": np.asarray(y, dtype=np.int64) for s, y in labels.items()})
    if class_names is not None:
        arrays["class_names"] = np.asarray(class_names, dtype=str)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


_NOT_TRAINABLE = "generalist_from={value!r} is a {kind} {what}: the kit cannot fine-tune it"


def skip_reason(source: Source | None, stage: str, *, value: str = "") -> str | None:
    """Why ``stage`` (``compute_matched`` or ``distill``) is skipped for ``source``, or ``None`` when it runs.

    Decided: the compute-matched generalist fine-tunes the given model for the specialists' budget when it is
    a ``torchvision`` model (the kit holds its weights); a TorchScript/export model or a predictions file
    cannot be trained, so there is none. Distillation needs the generalist on every training batch (its
    top-n switch specialists on): it runs for models of every kind (a scripted generalist only teaches; the
    student starts from scratch) and is skipped for predictions only.
    """
    if source is None:
        return None
    what = "file of predictions" if source.kind == "predictions" else "model"
    if stage == "compute_matched" and not source.has_head:
        return (
            _NOT_TRAINABLE.format(value=value, kind=source.kind, what=what)
            + ", so there is no compute-matched generalist"
        )
    if stage in ("distill", "hard_label_student") and not source.has_model:
        return (
            f"generalist_from={value!r} holds predictions only: the student's teacher needs the generalist on every "
            "augmented training batch, so there is no distilled student"
        )
    return None


def scratch_reason(source: Source | None, *, value: str = "") -> str | None:
    """Why specialists cannot start from the generalist's weights (``None`` when they can)."""
    if source is None or source.has_head:
        return None
    if source.kind == "predictions":
        return f"generalist_from={value!r} holds predictions only (no weights): specialists train from scratch"
    return f"generalist_from={value!r} is a {source.kind} model whose head the kit cannot cut: specialists train from scratch"
