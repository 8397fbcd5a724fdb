"""The feature-extractor question: are a run's networks good frozen features for *other* data?

``specialkit transfer --run R --target DATASET`` fits one linear probe (scikit-learn
``LogisticRegression`` on standardised features) per feature extractor on the target dataset's training
and validation images, and scores it on the target's test images:

* ``generalist`` -- the generalist's penultimate features (``model.features``, (N, D));
* ``student`` -- the distilled student's penultimate features;
* ``specialists`` -- the *active* specialists' features concatenated. Decided: "active" is **every**
  specialist of the run (M x D features): on images of other classes there is no generalist top-n to
  switch specialists on, so gating has nothing to go on; the probe sees all of them, and the report gives
  every extractor's feature size so the M-fold larger input is visible;
* ``pixels`` -- the images themselves, flattened (the floor any learned feature should beat).

Every probe's test accuracy carries a 95% paired-bootstrap interval, and every pair of extractors is
compared on the same test images (difference with its interval, McNemar's p, the verdict), all from
:mod:`specialkit.stats`. Target images are resized to the run's image size and converted to its
channels (grey <-> RGB), so the run's networks see the input they were built for. The numbers go to
``<run>/transfer/<target>.json``. Nothing is trained but the probes; the run's stages must be finished.
"""

from __future__ import annotations

import dataclasses
from itertools import combinations
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import data, runs, stages, stats, training
from .config import ConfigError
from .errors import MissingStageError
from .view import RunView, require, view_of

__all__ = [
    "TransferError",
    "target_dataset",
    "adapt_images",
    "extract_features",
    "extractors",
    "probe",
    "transfer",
    "result_path",
    "check_target",
    "summary",
]


class TransferError(ConfigError):
    """The transfer target or a run's extractor is unusable; the message names the problem and the fix."""


def adapt_images(x: torch.Tensor, *, channels: int, image_size: int) -> torch.Tensor:
    """(N, c, h, w) uint8 -> (N, channels, image_size, image_size) uint8: resized (antialiased), grey repeated
    to RGB or RGB averaged to grey."""
    x = data.resize_images(x, image_size)
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return x.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    raise TransferError(
        f"cannot convert {x.shape[1]}-channel target images to the run's {channels} channels; choose a grey or RGB target"
    )


def check_target(run: RunView, target: str) -> None:
    """A :class:`TransferError` unless ``target`` is a registered dataset other than the run's own."""
    c = run.config
    if target == c.dataset:
        raise TransferError(
            f"--target {target} is the run's own dataset: choose another one (for a glyphs run, glyphs_hard: "
            "the same characters drawn at 16 px with heavy distortion; `specialkit datasets` lists them)"
        )
    if target not in data.available():
        raise TransferError(f"--target {target!r} is not a dataset; choose one of {', '.join(data.available())}")


def target_dataset(run: RunView, target: str, *, root: str | None = None, per_class: int | None = None) -> data.Dataset:
    """The target dataset, its images adapted to the run's channels and size (:func:`adapt_images`).

    Args:
        run: the run whose networks are probed.
        target: a dataset name (``specialkit datasets``); it must not be the run's own dataset.
        root: the target's files (as ``PipelineConfig.root``).
        per_class: training images per target class (default: the run's ``per_class``); the target is
            decoded into memory (a streamed target is not supported: the probe holds all its features).
    """
    check_target(run, target)
    c = run.config
    own = run.dataset()
    ds = data.load(
        target,
        root=root,
        per_class=per_class or c.per_class,
        val_fraction=c.val_fraction,
        seed=c.data_seed,
        in_memory=True,
    )  # the probes hold every feature anyway: choose a per_class that fits
    return dataclasses.replace(
        ds,
        fingerprint="",
        **{
            s: adapt_images(getattr(ds, s), channels=own.channels, image_size=own.image_size)
            for s in ("x_train", "x_val", "x_test")
        },
    )


def extract_features(
    model: torch.nn.Module, x: torch.Tensor, *, batch_size: int = 256, device: str = "auto"
) -> np.ndarray:
    """(N, D) float32 penultimate features ``model.features(x)`` of (N, C, H, W) uint8 images, in eval mode."""
    dev = training.resolve_device(device)
    was_training = model.training
    model.to(dev).eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size].to(dev).float().div_(255.0)
                out.append(model.features(xb).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def _require(run: RunView, *stages: str) -> None:
    """:func:`metrics.require` as a :class:`TransferError` (a bad-input error the command reports in one line)."""
    try:
        require(run, *stages)
    except MissingStageError as err:
        raise TransferError(f"{err}; transfer probes finished networks and trains none") from err


def extractors(run: RunView) -> tuple[dict[str, Callable[[torch.Tensor], np.ndarray]], dict[str, str]]:
    """The run's feature extractors (name -> images -> (N, D) features) and, for each one left out, why.

    Trains nothing: the generalist, specialists and (unless skipped) distill stages must be finished.
    """
    run = view_of(run)
    _require(run, *stages.through("specialists"))
    dev = run.config.device
    out: dict[str, Callable[[torch.Tensor], np.ndarray]] = {"pixels": lambda x: x.flatten(1).float().div(255.0).numpy()}
    missing: dict[str, str] = {}
    gen = run.generalist().model
    if gen is not None and hasattr(gen, "features"):
        out["generalist"] = lambda x: extract_features(gen, x, device=dev)
    else:
        missing["generalist"] = (
            f"generalist_from={run.config.generalist_from!r} gives no penultimate features "
            "(bring torchvision weights to probe them)"
        )
    reason = run.skip_reason("distill")
    if reason:
        missing["student"] = reason
    else:
        _require(run, "distill")
        student = run.distill().model
        out["student"] = lambda x: extract_features(student, x, device=dev)
    models_ = [s.model for s in run.specialists()]
    out["specialists"] = lambda x: np.concatenate([extract_features(m, x, device=dev) for m in models_], axis=1)
    return out, missing


def probe(
    f_train: np.ndarray,
    y_train: np.ndarray,
    f_test: np.ndarray,
    y_test: np.ndarray,
    *,
    seed: int = 0,
    max_iter: int = 1000,
) -> np.ndarray:
    """Fit a linear probe (standardised features, multinomial ``LogisticRegression``, lbfgs) on
    (N, D) training features and return the (N_test,) bool correctness on the test features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    clf.fit(f_train, y_train)
    return clf.predict(f_test) == y_test


def result_path(run: RunView, target: str) -> Path:
    """``<run>/transfer/<target>.json``."""
    return run.folder / "transfer" / f"{target}.json"


def transfer(
    run: RunView,
    target: str,
    *,
    root: str | None = None,
    per_class: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Probe every extractor of ``run`` on ``target`` (module docstring); write and return the numbers.

    Returns:
        ``{"target", "run", "probe", "train", "test", "num_classes", "models": [{"name", "accuracy",
        "accuracy_ci", "feature_dim"}], "comparisons": [{"first", "second", "gain", "gain_ci", "p_value",
        "verdict"}], "not_probed": {name: reason}, "bootstrap": {...}}``; ``gain`` is second minus first.
    """
    run = view_of(run)
    c = run.config
    check_target(run, target)
    found, missing = extractors(run)
    ds = target_dataset(run, target, root=root, per_class=per_class)
    x_fit, y_fit = torch.cat([ds.x_train, ds.x_val]), torch.cat([ds.y_train, ds.y_val]).numpy()
    y_test = ds.y_test.numpy()
    correct, dims = {}, {}
    for name, fn in found.items():
        f_fit, f_test = fn(x_fit), fn(ds.x_test)
        dims[name] = int(f_fit.shape[1])
        correct[name] = probe(f_fit, y_fit, f_test, y_test, seed=c.seed)
        log(f"[transfer] {name}: {dims[name]} features, probe accuracy {correct[name].mean():.2%} on {target}")
    for name, why in missing.items():
        log(f"[transfer] {name}: not probed: {why}")
    boot = stats.paired_bootstrap(correct, resamples=c.bootstrap_resamples, seed=c.seed)
    comparisons = []
    for a, b in combinations(correct, 2):
        ci, p = boot.gain_ci(b, a), stats.mcnemar(correct[a], correct[b]).p_value
        comparisons.append(
            {
                "first": a,
                "second": b,
                "gain": float(correct[b].mean() - correct[a].mean()),
                "gain_ci": list(ci),
                "p_value": p,
                "verdict": stats.verdict(ci, p),
            }
        )
    result = {
        "target": target,
        "run": c.name,
        "probe": "StandardScaler + LogisticRegression (lbfgs, multinomial) on frozen features",
        "train": len(y_fit),
        "test": len(y_test),
        "num_classes": ds.num_classes,
        "models": [
            {
                "name": n,
                "accuracy": float(correct[n].mean()),
                "accuracy_ci": list(boot.top1_ci(n)),
                "feature_dim": dims[n],
            }
            for n in correct
        ],
        "comparisons": comparisons,
        "not_probed": missing,
        "active_specialists": "all (concatenated)",
        "bootstrap": {"resamples": c.bootstrap_resamples, "seed": c.seed, "level": 1 - stats.ALPHA},
    }
    runs.atomic_write_json(result_path(run, target), result)
    return result


def summary(result: dict[str, Any]) -> str:
    """The probe accuracies with their intervals and every paired comparison, as lines of text."""
    lines = [
        f"linear probe on {result['target']} ({result['num_classes']} classes; fit on {result['train']}, "
        f"scored on {result['test']} images), accuracy [95% paired-bootstrap interval]:"
    ]
    for m in result["models"]:
        lo, hi = m["accuracy_ci"]
        lines.append(
            f"  {m['name']:<12} {m['accuracy'] * 100:6.2f}% [{lo * 100:.2f}, {hi * 100:.2f}]  ({m['feature_dim']} features)"
        )
    for r in result["comparisons"]:
        lo, hi = r["gain_ci"]
        lines.append(
            f"  {r['second']} vs {r['first']}: {r['gain'] * 100:+.2f} points [{lo * 100:+.2f}, {hi * 100:+.2f}] "
            f"(McNemar p={r['p_value']:.2g}): {r['verdict']}"
        )
    lines += [f"  {name}: not probed: {why}" for name, why in result["not_probed"].items()]
    return "\n".join(lines)
