"""The one training loop that generalists and specialists share.

:func:`fit` trains any :class:`~specialkit.models.Classifier` on in-memory ``uint8`` images:

* loss ``(1 - w) * CE(hard labels, label smoothing) + w * T**2 * KL(soft_targets || softmax(z / T))``
  (``soft_targets`` are given, already at temperature ``T``; ``w = config.soft_weight``);
* SGD with Nesterov momentum or AdamW; a one-cycle, cosine or constant learning rate set per step;
* augmentation done batched on the device: a random translation of up to ``crop_padding`` pixels
  (pad and random crop) and a horizontal flip only when the dataset allows it (``hflip=True``);
* channels-last memory format (faster on CPU and GPU), mixed precision on CUDA;
* per-epoch validation, early stopping on validation accuracy (best weights restored);
* the whole training state written atomically after every epoch to ``state_path``; an interrupted
  run resumes from it and ends with the same weights (bit-identical on CPU) as an uninterrupted one.

The loop is built in steps, as skorch's is: :func:`fit` -> :func:`run_epoch` -> :func:`train_step`.
A :class:`TrainState` holds what a run needs to go on (model, optimizer, scaler, generator, history,
early-stopping bookkeeping) and saves/loads itself; :class:`Callback` hooks run after every epoch.
Early stopping (:class:`EarlyStopping`) and the state file (:class:`StateCheckpoint`) are callbacks
that :func:`fit` builds from its config and ``state_path``; pass more with ``fit(callbacks=...)``.

All randomness of a run (example order, augmentation, dropout) comes from ``config.seed``: the
example order and augmentation from a ``torch.Generator``, dropout from the global torch RNG forked
for the duration of :func:`fit` (the caller's RNG state is left untouched).

>>> history = fit(model, ds.x_train, ds.y_train, x_val=ds.x_val, y_val=ds.y_val,
...               config=TrainConfig(epochs=10), hflip=ds.hflip)
>>> probs = predict_probs(model, ds.x_val)          # (N, C) numpy
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, runs, streaming
from .errors import SpecialkitError

__all__ = [
    "TrainConfig",
    "TrainingError",
    "EpochRecord",
    "History",
    "seed_everything",
    "softmax",
    "resolve_device",
    "learning_rate_at",
    "make_optimizer",
    "augment_batch",
    "distillation_loss",
    "train_step",
    "evaluate",
    "TrainData",
    "TrainState",
    "Callback",
    "EarlyStopping",
    "StateCheckpoint",
    "run_epoch",
    "fit",
    "predict_logits",
    "predict_probs",
]

SampleIndices = Callable[[int, torch.Generator], torch.Tensor]
Teacher = Callable[[torch.Tensor], torch.Tensor]
"""``teacher(x) -> (B, K)`` soft targets at the loop's temperature for a prepared (augmented) float batch."""
_STATE_FORMAT = "specialkit.train_state"
_STATE_VERSION = 1
# Config fields that may differ between an interrupted run and its resumption.
_RESUME_FREE = frozenset({"progress", "device", "num_threads", "eval_batch_size"})


class TrainingError(SpecialkitError, ValueError):
    """Bad training input or an unusable training-state file; the message names the fix."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train (shared by generalists and specialists).

    Attributes:
        epochs: passes over the data (an epoch is one call of ``sample_indices`` when given).
        batch_size: examples per step.
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
        lr: peak learning rate; ``None`` = 0.05 for SGD, 2e-3 for AdamW.
        momentum: SGD momentum.
        weight_decay: applied to weights only (not to biases or BN); ``None`` = 5e-4 for SGD,
            0.05 for AdamW.
        schedule: ``"onecycle"`` (cosine warm-up to ``lr`` over ``warmup_fraction`` of training,
            then cosine down to ``lr * 1e-4``), ``"cosine"`` (from ``lr`` down to 0) or
            ``"constant"``; the rate is set every step.
        warmup_fraction: share of training spent warming up (``onecycle`` only).
        label_smoothing: label smoothing of the hard-label cross-entropy.
        augment: random translation (pad + crop) and, where the dataset allows, horizontal flip.
        crop_padding: maximum translation in pixels (2-4 for 32 px images).
        pad_mode: ``"zeros"`` (black border) or ``"edge"`` (repeat the border pixels).
        temperature: T of the soft targets; the soft term is scaled by T².
        soft_weight: w, weight of the soft-target term (needs ``soft_targets``); 0 = hard labels only.
        mixup_alpha: mixup of every training batch (:func:`mixup_batch`, ``lam ~ Beta(alpha, alpha)``); a per-batch
            teacher is asked on the mixed images; 0 = off.
        early_stopping_patience: stop after this many epochs without a better validation accuracy
            and restore the best weights; ``None`` = off (needs validation data when on).
        max_grad_norm: clip the gradient norm to this value; ``None`` = off.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:1"`` ...
        amp: mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling);
            ignored on CPU.
        channels_last: channels-last memory format; ``None`` = on (faster on CPU and GPU).
        seed: seeds the example order, augmentation and dropout of this run.
        progress: show tqdm progress bars.
        eval_batch_size: batch size for validation.
        num_threads: ``torch.set_num_threads`` for the duration of :func:`fit`; ``None`` = leave as is.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "onecycle"
    warmup_fraction: float = 0.25
    label_smoothing: float = 0.0
    augment: bool = True
    crop_padding: int = 4
    pad_mode: str = "zeros"
    temperature: float = 4.0
    soft_weight: float = 0.0
    mixup_alpha: float = 0.0
    early_stopping_patience: int | None = None
    max_grad_norm: float | None = None
    device: str = "auto"
    amp: bool = True
    channels_last: bool | None = None
    seed: int = 0
    progress: bool = True
    eval_batch_size: int = 512
    num_threads: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.optimizer in ("sgd", "adamw"), "optimizer must be 'sgd' or 'adamw'"),
            (
                self.schedule in ("onecycle", "cosine", "constant"),
                "schedule must be 'onecycle', 'cosine' or 'constant'",
            ),
            (self.lr is None or self.lr > 0, "lr must be positive (or None for the optimizer's default)"),
            (self.weight_decay is None or self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0.0 < self.warmup_fraction < 1.0, "warmup_fraction must lie in (0, 1)"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must lie in [0, 1)"),
            (self.crop_padding >= 0, "crop_padding must be >= 0"),
            (self.pad_mode in ("zeros", "edge"), "pad_mode must be 'zeros' or 'edge'"),
            (self.temperature > 0, "temperature must be positive"),
            (0.0 <= self.soft_weight <= 1.0, "soft_weight must lie in [0, 1]"),
            (self.mixup_alpha >= 0.0, "mixup_alpha must be >= 0 (0 = no mixup)"),
            (
                self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                "early_stopping_patience must be None or at least 1",
            ),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be None or positive"),
            (self.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
            (self.num_threads is None or self.num_threads >= 1, "num_threads must be None or at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(f"TrainConfig: {message}")

    @property
    def peak_lr(self) -> float:
        """``lr`` or the optimizer's default."""
        if self.lr is not None:
            return self.lr
        return 0.05 if self.optimizer == "sgd" else 2e-3

    @property
    def decay(self) -> float:
        """``weight_decay`` or the optimizer's default."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise TrainingError(f"unknown TrainConfig keys {sorted(unknown)}: upgrade specialkit or remove them")
        return cls(**d)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of training. ``val_*`` are ``None`` without validation data.

    ``train_loss``/``train_acc`` are averages over the epoch's (augmented) training batches;
    ``lr`` is the rate of the epoch's last step; ``examples_seen`` counts all epochs so far.
    """

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float
    seconds: float
    examples_seen: int


@dataclass
class History:
    """Per-epoch records of a :func:`fit` call (epochs numbered from 1)."""

    records: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[EpochRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> EpochRecord:
        return self.records[i]

    def column(self, name: str) -> list[Any]:
        """Values of one field over the epochs, e.g. ``history.column("val_acc")``."""
        return [getattr(r, name) for r in self.records]

    @property
    def best_val_acc(self) -> float | None:
        """Highest validation accuracy, or ``None`` without validation data."""
        accs = [a for a in self.column("val_acc") if a is not None]
        return max(accs) if accs else None

    @property
    def best_epoch(self) -> int | None:
        """Epoch (from 1) of the first highest validation accuracy, or ``None``."""
        best = self.best_val_acc
        if best is None:
            return None
        return next(r.epoch for r in self.records if r.val_acc == best)

    @property
    def examples_seen(self) -> int:
        """Training examples processed in all epochs."""
        return self.records[-1].examples_seen if self.records else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"records": [asdict(r) for r in self.records], "stopped_early": self.stopped_early}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """Inverse of :meth:`to_dict`."""
        return cls(records=[EpochRecord(**r) for r in d["records"]], stopped_early=bool(d.get("stopped_early", False)))

    def to_frame(self) -> Any:
        """The records as a ``pandas.DataFrame`` (one row per epoch)."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.records], columns=[f.name for f in fields(EpochRecord)])


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and every CUDA device).

    Args:
        seed: the seed.
        deterministic: also ask torch for deterministic algorithms (slower on CUDA).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names are checked and returned."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise TrainingError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} asked for but CUDA is not available: use device='auto' or 'cpu'")
    return dev


def learning_rate_at(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` in [0, 1] (fraction of all training steps done)."""
    lr = config.peak_lr
    t = min(max(progress, 0.0), 1.0)
    if config.schedule == "constant":
        return lr
    if config.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    start, end, warm = lr / 25.0, lr * 1e-4, config.warmup_fraction
    if t < warm:
        return start + (lr - start) * 0.5 * (1.0 - math.cos(math.pi * t / warm))
    return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (1.0 - warm)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; weight decay on tensors with >= 2 dimensions only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.peak_lr)


def augment_batch(
    x: torch.Tensor,
    *,
    generator: torch.Generator,
    padding: int = 4,
    hflip: bool = False,
    pad_mode: str = "zeros",
) -> torch.Tensor:
    """Random translation (pad by ``padding`` and crop back) and optional horizontal flip, per image.

    Runs batched on ``x``'s device; the random numbers come from ``generator`` (a CPU generator),
    so the result depends only on its state.

    Args:
        x: (N, C, H, W) images, ``uint8`` or float.
        generator: CPU ``torch.Generator``.
        padding: maximum shift in pixels along each axis.
        hflip: flip each image left-right with probability 1/2 (only for datasets where the
            mirror image keeps its label: never for glyphs or digits).
        pad_mode: ``"zeros"`` fills uncovered pixels with 0, ``"edge"`` repeats the border.

    Returns:
        (N, C, H, W) augmented images, same dtype.
    """
    n, c, h, w = x.shape
    shifts = torch.randint(-padding, padding + 1, (n, 2), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5 if hflip else None
    dev = x.device
    shifts = shifts.to(dev, non_blocking=True)
    rows = torch.arange(h, device=dev) + shifts[:, :1]
    cols = torch.arange(w, device=dev) + shifts[:, 1:]
    if flip is not None:
        cols = torch.where(flip.to(dev, non_blocking=True)[:, None], cols.flip(1), cols)
    index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = x.reshape(n, c, h * w).gather(2, index.reshape(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    if pad_mode == "zeros" and padding > 0:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        out.masked_fill_(~inside[:, None], 0)
    return out


def distillation_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    *,
    soft_targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    soft_weight: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - w) * CE(y) + w * T**2 * KL(soft_targets || softmax(logits / T))``, batch mean.

    Args:
        logits: (N, K) raw outputs z.
        y: (N,) int64 hard labels, or (N, K') float label probabilities (mixup; K' <= K, the missing classes get
            0); label smoothing applies to this term.
        soft_targets: (N, K) teacher probabilities at temperature T; ``None`` = hard term only.
        temperature: T.
        soft_weight: w in [0, 1].
        label_smoothing: smoothing of the hard term.
    """
    logits = logits.float()
    if y.dim() == 2 and y.shape[1] < logits.shape[1]:
        y = F.pad(y, (0, logits.shape[1] - y.shape[1]))
    hard = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if soft_targets is None or soft_weight == 0.0:
        return hard
    p = soft_targets.float()
    log_q = F.log_softmax(logits / temperature, dim=1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=1).mean()
    return (1.0 - soft_weight) * hard + soft_weight * temperature**2 * kl


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    soft_targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    soft_weight: float = 0.0,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a prepared batch (model in training mode).

    Args:
        model: the classifier.
        optimizer: its optimizer.
        x: (B, C, H, W) float in [0, 1], on the model's device (already augmented).
        y: (B,) int64 labels, or (B, K) label probabilities (mixup).
        soft_targets: (B, K) teacher probabilities at ``temperature``, or ``None``.
        temperature: the softmax temperature of the soft term (see :func:`distillation_loss`).
        soft_weight: the soft term's weight in [0, 1] (see :func:`distillation_loss`).
        label_smoothing: of the hard-label term (see :func:`distillation_loss`).
        amp_dtype: autocast dtype (``torch.bfloat16``/``torch.float16``) or ``None``.
        scaler: a ``GradScaler`` for float16.
        max_grad_norm: clip the gradient norm, or ``None``.

    Returns:
        (loss, logits): the batch loss (0-dim) and (B, K) logits, both detached.
    """
    if amp_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype):
            logits = model(x)
    else:
        logits = model(x)
    loss = distillation_loss(
        logits,
        y,
        soft_targets=soft_targets,
        temperature=temperature,
        soft_weight=soft_weight,
        label_smoothing=label_smoothing,
    )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if max_grad_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return loss.detach(), logits.detach()


def _as_images(x: Any, name: str) -> torch.Tensor | streaming.ImageFiles:
    """Images as given: a tensor (numpy converted) or files on disk (:class:`~specialkit.streaming.ImageFiles`)."""
    return x if isinstance(x, streaming.ImageFiles) else _as_tensor(x, name)


def _image_batches(
    x: torch.Tensor | streaming.ImageFiles, chunks: Sequence[torch.Tensor], device: torch.device, *, seed: int = 0
) -> Iterator[torch.Tensor]:
    """The images of ``x`` at each of ``chunks`` ((B,) index tensors), on ``device``, in order: indexed in memory,
    or decoded ahead by the streaming path's worker processes (:func:`specialkit.streaming.batches`)."""
    if not isinstance(x, streaming.ImageFiles):
        for idx in chunks:
            yield x.index_select(0, idx.to(x.device))
        return
    for xb in streaming.batches(x, chunks, seed=seed, pin_memory=device.type == "cuda"):
        yield xb.to(device, non_blocking=True)


def _as_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TrainingError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _prepare_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def _use_channels_last(setting: bool | None, device: torch.device) -> bool:
    return True if setting is None else setting


def _amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _batched_logits(
    model: nn.Module,
    x: torch.Tensor | streaming.ImageFiles,
    *,
    batch_size: int,
    device: torch.device,
    channels_last: bool,
    amp_dtype: torch.dtype | None,
) -> Iterator[tuple[int, torch.Tensor]]:
    starts = range(0, x.shape[0], batch_size)
    if isinstance(x, streaming.ImageFiles):
        raw: Iterator[torch.Tensor] = _image_batches(
            x, [torch.arange(s, min(s + batch_size, len(x))) for s in starts], device
        )
    else:
        raw = (x[s : s + batch_size] for s in starts)
    for start, xb in zip(starts, raw):
        xb = _prepare_input(xb, device, channels_last)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(xb).float()
        yield start, logits


@contextlib.contextmanager
def _eval_mode(model: nn.Module, device: torch.device, channels_last: bool) -> Iterator[None]:
    was_training = model.training
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 512,
    device: str | torch.device = "auto",
    channels_last: bool | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode, no gradients).

    Args:
        model: the classifier (moved to ``device``).
        x: (N, C, H, W) ``uint8`` images (or float in [0, 1]).
        y: (N,) int64 labels.
        batch_size: images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` ...
        channels_last: channels-last memory format; ``None`` = on.
        amp: mixed precision on CUDA.

    Returns:
        ``{"loss": float, "acc": float, "n": int}``.
    """
    x, y = _as_images(x, "x"), _as_tensor(y, "y")
    if len(x) != len(y) or len(y) == 0:
        raise TrainingError(
            f"evaluate needs as many labels as images (and at least one), got {len(x)} images, {len(y)} labels"
        )
    dev = resolve_device(device)
    cl = _use_channels_last(channels_last, dev)
    amp_dtype = _amp_dtype(amp, dev)
    y_dev = y.to(dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    with _eval_mode(model, dev, cl):
        for start, logits in _batched_logits(
            model, x, batch_size=batch_size, device=dev, channels_last=cl, amp_dtype=amp_dtype
        ):
            yb = y_dev[start : start + len(logits)]
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(dim=1) == yb).sum()
    n = len(y)
    return {"loss": float(loss_sum) / n, "acc": int(correct) / n, "n": n}


def predict_logits(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 512,
    device: str | torch.device = "auto",
    channels_last: bool | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Logits of ``model`` for every image, batched, in eval mode without gradients.

    Args:
        model: the classifier (moved to ``device``; its training/eval mode is restored after).
        x: (N, C, H, W) ``uint8`` images (or float in [0, 1]).
        batch_size: images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` ...
        channels_last: channels-last memory format; ``None`` = on.
        amp: mixed precision on CUDA.

    Returns:
        (N, K) float32 CPU tensor.
    """
    x = _as_images(x, "x")
    if x.ndim != 4:
        raise TrainingError(f"predict_logits expects (N, C, H, W) images, got shape {tuple(x.shape)}")
    dev = resolve_device(device)
    cl = _use_channels_last(channels_last, dev)
    amp_dtype = _amp_dtype(amp, dev)
    parts = []
    with _eval_mode(model, dev, cl):
        for _, logits in _batched_logits(
            model, x, batch_size=batch_size, device=dev, channels_last=cl, amp_dtype=amp_dtype
        ):
            parts.append(logits.cpu())
    if not parts:
        k = getattr(getattr(model, "head", None), "out_features", 0)
        return torch.zeros((0, k), dtype=torch.float32)
    return torch.cat(parts)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of (N, K) logits at ``temperature``, in float64.

    Args:
        logits: (N, K) logits.
        temperature: T > 0; the logits are divided by it.

    Returns:
        (N, K) float64 probabilities, rows summing to 1.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_probs(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    temperature: float = 1.0,
    batch_size: int = 512,
    device: str | torch.device = "auto",
    channels_last: bool | None = None,
    amp: bool = False,
) -> np.ndarray:
    """``softmax(logits / temperature)`` as a (N, K) float64 numpy array (rows sum to 1).

    ``temperature > 1`` gives the soft targets of a teacher (see :func:`fit`'s ``soft_targets``).
    Other arguments as :func:`predict_logits`.
    """
    if temperature <= 0:
        raise TrainingError(f"temperature must be positive, got {temperature}")
    logits = predict_logits(model, x, batch_size=batch_size, device=device, channels_last=channels_last, amp=amp)
    return torch.softmax(logits.double() / temperature, dim=1).numpy()


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    cuda_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        if cuda_devices:
            with torch.cuda.device(cuda_devices[0]):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _signature(
    config: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    n_out: int | None,
    soft: bool | str,
    n_val: int,
    sampler: bool,
    hflip: bool,
) -> dict[str, Any]:
    return {
        # mixup_alpha at its default 0 is left out: states written before the setting existed still resume
        "config": {
            k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE and not (k == "mixup_alpha" and v == 0.0)
        },
        "x_train_shape": list(x.shape),
        "hflip": bool(hflip),
        "labels_sha256": hashlib.sha256(y.cpu().numpy().tobytes()).hexdigest(),
        "num_outputs": n_out,
        "soft_targets": soft,
        "n_val": n_val,
        "sample_indices": sampler,
    }


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise TrainingError(
            f"training state {path} is corrupt or truncated ({type(err).__name__}: {str(err).strip()[:200]}): "
            f"delete it to start training over"
        ) from err
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise TrainingError(f"{path} is not a specialkit training state: delete it or pass another state_path")
    if state.get("version", 0) > _STATE_VERSION:
        raise TrainingError(
            f"{path} was written by a newer specialkit (version {state['version']}): upgrade specialkit"
        )
    return state


def _check_resumable(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Raise unless ``saved`` and ``current`` describe the same run; True when the run is extended.

    The one allowed difference: more ``epochs`` with a constant learning rate and no early stopping
    (then the extra epochs continue the same run exactly).
    """
    if saved == current:
        return False
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"config.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    only_epochs = {**saved, "config": {**saved["config"], "epochs": None}} == {
        **current,
        "config": {**current["config"], "epochs": None},
    }
    cfg = current["config"]
    if only_epochs:
        if (
            saved["config"]["epochs"] < cfg["epochs"]
            and cfg["schedule"] == "constant"
            and cfg["early_stopping_patience"] is None
        ):
            return True
        raise TrainingError(
            f"training state {path} was written for epochs={saved['config']['epochs']}, this call asks for "
            f"epochs={cfg['epochs']}: the learning-rate schedule depends on epochs, so a run can only be extended "
            f"with schedule='constant' and no early stopping; to train further, call fit on the trained model "
            f"with another state_path (a new schedule), or delete {path} to start over"
        )
    raise TrainingError(
        f"training state {path} belongs to a different run ({'; '.join(diffs)}): pass the same config and "
        f"data to resume, or delete the file (or use another state_path) to start over"
    )


def _validate_fit_inputs(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    config: TrainConfig,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    soft_targets: torch.Tensor | None,
    has_teacher: bool = False,
) -> int | None:
    if x_train.dtype != torch.uint8 or x_train.ndim != 4:
        raise TrainingError(
            f"x_train must be uint8 (N, C, H, W), got {x_train.dtype} {tuple(x_train.shape)}: pass the dataset's x_train"
        )
    if y_train.dtype != torch.int64 or y_train.shape != (x_train.shape[0],) or len(y_train) == 0:
        raise TrainingError(
            f"y_train must be int64 ({x_train.shape[0]},) with at least one label, got {y_train.dtype} {tuple(y_train.shape)}"
        )
    n_out = getattr(getattr(model, "head", None), "out_features", None)
    if n_out is not None and int(y_train.max()) >= n_out:
        raise TrainingError(
            f"labels go up to {int(y_train.max())} but the model has {n_out} outputs: build the model with "
            f"num_classes={int(y_train.max()) + 1} or remap the labels"
        )
    if (x_val is None) != (y_val is None):
        raise TrainingError("pass both x_val and y_val, or neither")
    if x_val is not None and (x_val.ndim != 4 or len(x_val) != len(y_val) or len(y_val) == 0):
        raise TrainingError(
            f"x_val/y_val must be (N, C, H, W) and (N,) with N >= 1, got {tuple(x_val.shape)} and {tuple(y_val.shape)}"
        )
    if config.early_stopping_patience is not None and x_val is None:
        raise TrainingError(
            "early stopping needs validation data: pass x_val and y_val, or set early_stopping_patience=None"
        )
    if soft_targets is not None:
        if config.soft_weight == 0.0:
            raise TrainingError(
                "soft_targets given but config.soft_weight is 0: set soft_weight > 0 or drop soft_targets"
            )
        if config.mixup_alpha > 0:
            raise TrainingError(
                "mixup_alpha > 0 mixes the images, which soft_targets computed beforehand do not follow: pass a "
                "per-batch teacher= instead (it is asked on the mixed images), or set mixup_alpha=0"
            )
        expected = (len(y_train), n_out if n_out is not None else soft_targets.shape[-1])
        if soft_targets.shape != expected:
            raise TrainingError(
                f"soft_targets must be (N, K) = {expected} (aligned with x_train, one column per model output), "
                f"got {tuple(soft_targets.shape)}"
            )
        sums = soft_targets.double().sum(dim=1)
        if bool((soft_targets < 0).any()) or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise TrainingError(
                "soft_targets rows must be probabilities (>= 0, summing to 1): pass softmax(z / T) of the teacher"
            )
    elif has_teacher:
        if config.soft_weight == 0.0:
            raise TrainingError("teacher given but config.soft_weight is 0: set soft_weight > 0 or drop teacher")
    elif config.soft_weight > 0.0:
        raise TrainingError(
            f"config.soft_weight={config.soft_weight} but no soft_targets: pass soft_targets (or teacher) or set soft_weight=0"
        )
    return n_out


def _epoch_order(sample_indices: SampleIndices | None, epoch: int, generator: torch.Generator, n: int) -> torch.Tensor:
    if sample_indices is None:
        return torch.randperm(n, generator=generator)
    order = torch.as_tensor(sample_indices(epoch, generator))
    if order.ndim != 1 or order.dtype not in (torch.int64, torch.int32) or len(order) == 0:
        raise TrainingError(
            f"sample_indices(epoch, generator) must return a non-empty 1-D integer tensor, got {order.dtype} {tuple(order.shape)}"
        )
    if int(order.min()) < 0 or int(order.max()) >= n:
        raise TrainingError(f"sample_indices returned indices outside [0, {n}): index into x_train")
    return order.long().cpu()


@dataclass(frozen=True)
class TrainData:
    """The tensors of one :func:`fit` call, already on the device, and how to draw from them.

    Attributes:
        x: (N, C, H, W) ``uint8`` training images, or files read batch by batch (:mod:`specialkit.streaming`).
        y: (N,) int64 labels.
        soft: (N, K) float32 soft targets aligned with ``x``, or ``None``.
        teacher: per-batch soft targets (see :func:`fit`), or ``None``.
        hflip: augmentation may flip images left-right.
        sample_indices: the example order of an epoch (see :func:`fit`); ``None`` = a permutation.
        x_val: (M, C, H, W) validation images, or ``None``.
        y_val: (M,) validation labels, or ``None``.
        n_classes: the width of mixed labels (the model's outputs, else the largest label + 1); 0 = unknown.
    """

    x: torch.Tensor | streaming.ImageFiles
    y: torch.Tensor
    soft: torch.Tensor | None = None
    teacher: Teacher | None = None
    hflip: bool = False
    sample_indices: SampleIndices | None = None
    x_val: torch.Tensor | streaming.ImageFiles | None = None
    y_val: torch.Tensor | None = None
    n_classes: int = 0


@dataclass
class TrainState:
    """Everything a run needs to go on: what :meth:`save` writes and :meth:`load` restores.

    The model, optimizer, scaler and generator are updated in place by :func:`run_epoch`;
    callbacks read ``history`` and set ``finished`` (with :meth:`stop`). ``best_acc``,
    ``best_weights`` and ``bad_epochs`` belong to :class:`EarlyStopping` (kept here so that a
    resumed run stops where an uninterrupted one would).

    Attributes:
        model: the classifier, on ``device``.
        optimizer: its optimizer.
        scaler: a ``GradScaler`` (float16 mixed precision) or ``None``.
        generator: CPU generator of the example order and augmentation.
        config: the run's :class:`TrainConfig`.
        device: where the model and data live.
        signature: what identifies the run (config, data); :meth:`load` refuses a file of another run.
        history: the epochs so far.
        best_acc: best validation accuracy so far (-1 before the first).
        best_weights: the model's ``state_dict`` at ``best_acc``, or ``None``.
        bad_epochs: epochs since ``best_acc`` improved.
        finished: training is over (all epochs done or a callback stopped it).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator
    config: TrainConfig
    device: torch.device
    signature: dict[str, Any] | None = None
    history: History = field(default_factory=History)
    best_acc: float = -1.0
    best_weights: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    finished: bool = False
    step_model: nn.Module | None = None

    @property
    def epoch(self) -> int:
        """Epochs done so far."""
        return len(self.history)

    def stop(self) -> None:
        """End training after this epoch; the history records that it stopped early."""
        self.finished = True
        self.history.stopped_early = True

    def save(self, path: str | Path) -> None:
        """Write the state to ``path`` atomically (a crash leaves the previous file intact)."""
        with runs.atomic_open(path, "wb") as f:
            torch.save(
                {
                    "format": _STATE_FORMAT,
                    "version": _STATE_VERSION,
                    "signature": self.signature,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "rng": _rng_state(self.generator, self.device),
                    "history": self.history.to_dict(),
                    "best_acc": self.best_acc,
                    "bad_epochs": self.bad_epochs,
                    "finished": self.finished,
                    "best_model": self.best_weights,
                },
                f,
            )

    def load(self, path: str | Path) -> None:
        """Restore the state saved at ``path`` into this one (model, optimizer, RNGs, history ...).

        Also sets the global torch RNG (dropout) to its saved state. Raises :class:`TrainingError`
        when the file is not a training state, is corrupt, or belongs to another run (another
        signature); a finished run whose ``epochs`` grew (see :func:`fit`) is continued.
        """
        path = Path(path)
        saved = _load_state(path)
        extended = _check_resumable(path, saved["signature"], self.signature)
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as err:
            raise TrainingError(
                f"training state {path} holds weights of another model ({str(err).strip()[:300]}): pass the "
                f"same model architecture, or delete the file to start over"
            ) from err
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"], self.generator, self.device)
        self.history = History.from_dict(saved["history"])
        self.best_acc, self.bad_epochs = saved["best_acc"], saved["bad_epochs"]
        self.finished = saved["finished"] and not extended
        best = saved["best_model"]
        self.best_weights = None if best is None else {k: v.to(self.device) for k, v in best.items()}


class Callback:
    """Hooks :func:`fit` calls; subclass and override the ones you need (all do nothing here).

    A callback may stop training (``state.stop()``) or read and change the state; it must not draw
    random numbers from ``state.generator`` or torch's global RNG, or a resumed run would differ.
    """

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first epoch (inside the run's RNG fork); resuming callbacks load here."""

    def on_epoch_end(self, state: TrainState, record: EpochRecord) -> None:
        """After each epoch; ``record`` is already the last entry of ``state.history``."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last epoch (also when a finished state was loaded and no epoch ran)."""


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without a better validation accuracy; restore the best weights.

    Needs validation data. The best accuracy, its weights and the count of bad epochs live in the
    :class:`TrainState`, so they are saved and resumed with it.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise TrainingError(f"EarlyStopping: patience must be at least 1, got {patience}")
        self.patience = patience

    def on_epoch_end(self, state: TrainState, record: EpochRecord) -> None:
        """Count epochs without a better validation accuracy; stop training after ``patience`` of them."""
        if record.val_acc is None:
            raise TrainingError("early stopping needs validation data: pass x_val and y_val, or drop EarlyStopping")
        if record.val_acc > state.best_acc:
            state.best_acc, state.bad_epochs = record.val_acc, 0
            state.best_weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        else:
            state.bad_epochs += 1
        if state.bad_epochs >= self.patience and not state.finished:
            state.stop()
        if state.finished and state.best_weights is not None:
            state.model.load_state_dict(state.best_weights)


class StateCheckpoint(Callback):
    """Resume from ``path`` when it exists; write the state there after every epoch.

    Put it last, so that the file holds what the other callbacks decided (a stop, restored weights).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, state: TrainState) -> None:
        """Resume from the state file when one exists."""
        if self.path.exists():
            state.load(self.path)

    def on_epoch_end(self, state: TrainState, record: EpochRecord) -> None:
        """Save the training state (weights, optimizer, epoch, random state) after each epoch, atomically."""
        if distributed.is_main():
            state.save(self.path)


def fit(
    model: nn.Module,
    x_train: torch.Tensor | np.ndarray,
    y_train: torch.Tensor | np.ndarray,
    *,
    config: TrainConfig | None = None,
    x_val: torch.Tensor | np.ndarray | None = None,
    y_val: torch.Tensor | np.ndarray | None = None,
    hflip: bool = False,
    soft_targets: torch.Tensor | np.ndarray | None = None,
    teacher: Teacher | None = None,
    sample_indices: SampleIndices | None = None,
    state_path: str | Path | None = None,
    desc: str = "train",
    callbacks: Sequence[Callback] = (),
) -> History:
    """Train ``model`` in place; returns its :class:`History`. The model ends in eval mode on the device.

    The loop is ``fit`` -> :func:`run_epoch` -> :func:`train_step`, with :class:`Callback` hooks
    after each epoch: ``callbacks`` first, then :class:`EarlyStopping` (when
    ``config.early_stopping_patience`` is set), then :class:`StateCheckpoint` (when ``state_path``
    is given).

    Args:
        model: a :class:`~specialkit.models.Classifier` (any module mapping (N, C, H, W) floats in
            [0, 1] to (N, K) logits).
        x_train: (N, C, H, W) ``uint8`` images, kept in memory (moved once to the device), or
            :class:`~specialkit.streaming.ImageFiles` decoded batch by batch by worker processes (the
            streaming path: the same batches, augmentation and numbers as the images in memory).
        y_train: (N,) int64 labels in [0, K).
        config: a :class:`TrainConfig` (default ``TrainConfig()``).
        x_val: validation images, evaluated after every epoch.
        y_val: their labels.
        hflip: whether a horizontal flip keeps the label (``Dataset.hflip``); used when
            ``config.augment``.
        soft_targets: (N, K) teacher probabilities at ``config.temperature``, aligned with
            ``x_train`` (fixed per image, so they describe the un-augmented image); needs
            ``config.soft_weight > 0``.
        teacher: instead of ``soft_targets``, a function from the prepared training batch (the
            *augmented* (B, C, H, W) floats the model sees) to (B, K) teacher probabilities at
            ``config.temperature``, evaluated every step under ``torch.no_grad`` -- so the student
            matches the teacher on the very view it trains on. Needs ``config.soft_weight > 0``.
        sample_indices: ``sample_indices(epoch, generator) -> LongTensor`` of indices into
            ``x_train``: the example order of one epoch (e.g. a specialist's enriched sampling);
            default a random permutation. Draw randomness only from ``generator``.
        state_path: training-state file written atomically after every epoch; when it exists at
            the start, training resumes from it (the config and data must match) and ends with the
            same weights as an uninterrupted run; a finished state returns at once. With
            ``schedule="constant"`` and no early stopping, a larger ``epochs`` extends the run.
        desc: label of the progress bar.
        callbacks: extra :class:`Callback` objects (e.g. a new stopping rule), run in order
            before the built-in ones.
    """
    config = config or TrainConfig()
    x_train, y_train = _as_images(x_train, "x_train"), _as_tensor(y_train, "y_train")
    x_val = None if x_val is None else _as_images(x_val, "x_val")
    y_val = None if y_val is None else _as_tensor(y_val, "y_val")
    soft = None if soft_targets is None else _as_tensor(soft_targets, "soft_targets")
    if soft is not None and teacher is not None:
        raise TrainingError("pass soft_targets (fixed per image) or teacher (per augmented batch), not both")
    n_out = _validate_fit_inputs(model, x_train, y_train, config, x_val, y_val, soft, teacher is not None)
    hooks = _fit_callbacks(callbacks, config, state_path)

    device = resolve_device(config.device)
    model.to(device)
    if _use_channels_last(config.channels_last, device):
        model.to(memory_format=torch.channels_last)
    data = TrainData(
        x=_to_device(x_train, device),
        y=y_train.to(device),
        soft=None if soft is None else soft.to(device, torch.float32),
        teacher=teacher,
        hflip=hflip,
        sample_indices=sample_indices,
        x_val=None if x_val is None else _to_device(x_val, device),
        y_val=y_val,
        n_classes=n_out if n_out is not None else int(y_train.max()) + 1,
    )
    amp_dtype = _amp_dtype(config.amp, device)
    state = TrainState(
        model=model,
        optimizer=make_optimizer(model, config),
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        generator=torch.Generator().manual_seed(config.seed),
        config=config,
        device=device,
        signature=_signature(
            config,
            x_train,
            y_train,
            n_out,
            "teacher" if teacher is not None else soft is not None,
            0 if y_val is None else len(y_val),
            sample_indices is not None,
            hflip,
        ),
        step_model=distributed.wrap(model, device),
    )
    with _forked_rng(device, config.seed), _threads(config.num_threads):
        _fit_loop(state, data, hooks, desc)
    model.eval()
    return state.history


def _to_device(x: torch.Tensor | streaming.ImageFiles, device: torch.device) -> torch.Tensor | streaming.ImageFiles:
    """In-memory images move to the device once; files stay on disk (batches move as they are decoded)."""
    return x if isinstance(x, streaming.ImageFiles) else x.to(device)


def _fit_callbacks(callbacks: Sequence[Callback], config: TrainConfig, state_path: str | Path | None) -> list[Callback]:
    hooks = ("on_train_begin", "on_epoch_end", "on_train_end")
    for cb in callbacks:
        if not any(callable(getattr(cb, h, None)) for h in hooks):
            raise TrainingError(
                f"callback {cb!r} has none of {', '.join(hooks)}: subclass specialkit.training.Callback"
            )
    out = list(callbacks)
    if config.early_stopping_patience is not None:
        out.append(EarlyStopping(config.early_stopping_patience))
    if state_path is not None:
        out.append(StateCheckpoint(state_path))
    return out


def _notify(callbacks: Sequence[Callback], hook: str, *args: Any) -> None:
    for cb in callbacks:
        method = getattr(cb, hook, None)
        if method is not None:
            method(*args)


def _fit_loop(state: TrainState, data: TrainData, callbacks: Sequence[Callback], desc: str) -> None:
    """Epochs until ``state.finished``: :func:`run_epoch`, then every callback's ``on_epoch_end``."""
    from tqdm.auto import tqdm

    _notify(callbacks, "on_train_begin", state)
    config = state.config
    epochs_bar = tqdm(
        total=config.epochs,
        initial=state.epoch,
        desc=desc,
        unit="epoch",
        disable=not config.progress or state.finished,
        dynamic_ncols=True,
    )
    try:
        while not state.finished:
            record = run_epoch(state, data, desc=desc)
            state.history.records.append(record)
            state.finished = state.epoch >= config.epochs
            _notify(callbacks, "on_epoch_end", state, record)
            epochs_bar.update(1)
            epochs_bar.set_postfix(_postfix(record), refresh=False)
    finally:
        epochs_bar.close()
    _notify(callbacks, "on_train_end", state)


def _postfix(record: EpochRecord) -> dict[str, str]:
    out = {"loss": f"{record.train_loss:.3f}", "acc": f"{record.train_acc:.3f}"}
    if record.val_acc is not None:
        out["val_acc"] = f"{record.val_acc:.3f}"
    return out


def run_epoch(state: TrainState, data: TrainData, *, desc: str = "train") -> EpochRecord:
    """One epoch: a :func:`train_step` per batch of the epoch's example order, then validation.

    Updates the model, optimizer and generator in ``state`` (not its history: the caller appends
    the returned record).

    Returns:
        the epoch's :class:`EpochRecord` (numbered ``state.epoch + 1``).
    """
    started = time.perf_counter()
    record = _train_batches(state, data, desc)
    if data.x_val is not None:
        config, device = state.config, state.device
        ev = evaluate(
            state.model,
            data.x_val,
            data.y_val,
            batch_size=config.eval_batch_size,
            device=device,
            channels_last=_use_channels_last(config.channels_last, device),
            amp=_amp_dtype(config.amp, device) is not None,
        )
        record = replace(record, val_loss=ev["loss"], val_acc=ev["acc"])
    return replace(record, seconds=time.perf_counter() - started)


def _train_batches(state: TrainState, data: TrainData, desc: str) -> EpochRecord:
    from tqdm.auto import tqdm

    config, device, epoch = state.config, state.device, state.epoch
    order = distributed.shard(_epoch_order(data.sample_indices, epoch, state.generator, len(data.y))).to(device)
    bs = config.batch_size
    n_steps = math.ceil(len(order) / bs)
    chunks = [order[step * bs : (step + 1) * bs] for step in range(n_steps)]
    amp_dtype = _amp_dtype(config.amp, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    state.model.train()
    lr = config.peak_lr
    with tqdm(
        total=n_steps, desc=f"{desc} epoch {epoch + 1}", leave=False, disable=not config.progress, dynamic_ncols=True
    ) as bar:
        for step, (idx, x_raw) in enumerate(
            zip(chunks, _image_batches(data.x, chunks, device, seed=config.seed + epoch))
        ):
            lr = learning_rate_at(config, (epoch + step / n_steps) / config.epochs)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            xb, yb, soft_b = _batch(state, data, idx, x_raw)
            loss, logits = train_step(
                state.step_model or state.model,
                state.optimizer,
                xb,
                yb,
                soft_targets=soft_b,
                temperature=config.temperature,
                soft_weight=config.soft_weight,
                label_smoothing=config.label_smoothing,
                amp_dtype=amp_dtype,
                scaler=state.scaler,
                max_grad_norm=config.max_grad_norm,
            )
            loss_sum += loss.double() * len(idx)
            correct += (logits.argmax(dim=1) == (yb if yb.dim() == 1 else yb.argmax(dim=1))).sum()
            bar.update(1)
            if config.progress and (step % 10 == 9 or step == n_steps - 1):
                seen = min((step + 1) * bs, len(order))
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{int(correct) / seen:.3f}", refresh=False)
    loss_sum, correct = distributed.all_reduce_sum(loss_sum), distributed.all_reduce_sum(correct)
    n = len(order) * distributed.rank_and_world()[1]
    return EpochRecord(
        epoch=epoch + 1,
        train_loss=float(loss_sum) / n,
        train_acc=int(correct) / n,
        val_loss=None,
        val_acc=None,
        lr=lr,
        seconds=0.0,
        examples_seen=state.history.examples_seen + n,
    )


def _batch(
    state: TrainState, data: TrainData, idx: torch.Tensor, xb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The prepared (augmented, float, channels-last) images, labels and soft targets of one step: ``xb`` (B, C, H, W)
    ``uint8`` are the images at ``idx`` (B,), from memory or from disk; augmentation draws from the run's generator."""
    config, device = state.config, state.device
    if config.augment and (config.crop_padding > 0 or data.hflip):
        xb = augment_batch(
            xb, generator=state.generator, padding=config.crop_padding, hflip=data.hflip, pad_mode=config.pad_mode
        )
    xb = _prepare_input(xb, device, _use_channels_last(config.channels_last, device))
    yb = data.y.index_select(0, idx)
    if config.mixup_alpha > 0:
        xb, yb = mixup_batch(
            xb,
            yb,
            n_classes=data.n_classes or int(data.y.max()) + 1,
            alpha=config.mixup_alpha,
            generator=state.generator,
        )
    if data.teacher is not None:
        with torch.no_grad():
            return xb, yb, data.teacher(xb).to(device, torch.float32)
    return xb, yb, None if data.soft is None else data.soft.index_select(0, idx)


def mixup_batch(
    x: torch.Tensor, y: torch.Tensor, *, n_classes: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup of a prepared batch (Zhang et al. 2018): ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha,
    alpha)``, the labels mixed alike. A per-batch teacher then sees the very mixed images the student trains on (the
    "consistent" of Beyer et al. 2022's patient and consistent distillation).

    Args:
        x: (B, C, H, W) float images.
        y: (B,) int64 labels.
        n_classes: K, the width of the mixed labels.
        alpha: the Beta distribution's parameter (> 0).
        generator: the run's CPU generator; ``lam`` and ``perm`` draw only from it, so a resumed run mixes alike.

    Returns:
        ``(x_mixed, y_mixed)``: (B, C, H, W) floats like ``x`` and (B, K) float32 label probabilities.
    """
    if not alpha > 0:
        raise TrainingError(f"mixup_batch: alpha={alpha} must be > 0 (0 means no mixup: do not call it)")
    lam = mixup_lambda(alpha, generator)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    one_hot = F.one_hot(y, n_classes).to(torch.float32)
    mixed_y = lam * one_hot + (1.0 - lam) * one_hot.index_select(0, perm)
    return lam * x + (1.0 - lam) * x.index_select(0, perm), mixed_y


def mixup_lambda(alpha: float, generator: torch.Generator) -> float:
    """One ``lam ~ Beta(alpha, alpha)``, drawn by a numpy generator seeded from one draw of ``generator``.

    Args:
        alpha: the Beta distribution's parameter (> 0).
        generator: a CPU ``torch.Generator`` (advanced by one draw).

    Returns:
        ``lam`` in [0, 1].
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
