"""Self-describing checkpoints: weights plus everything needed to rebuild and trust them.

A checkpoint holds the weights (state dict), the model config, the dataset's class names and
fingerprint, the training history and an ``extra`` JSON-able dict (a specialist stores its class
subset and dustbin correction there), plus a format version. It is written atomically and read with
``torch.load(..., weights_only=True)`` only, so loading one never runs code.

>>> save_checkpoint("runs/r1/generalist.pt", model, model_config=model.config,
...                 class_names=ds.class_names, dataset_fingerprint=ds.fingerprint, history=history)
>>> model, info = load_checkpoint("runs/r1/generalist.pt", class_names=ds.class_names,
...                               dataset_fingerprint=ds.fingerprint)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import runs, stages
from .errors import SpecialkitError
from .models import Classifier, ModelConfig, ModelError, build_model
from .training import History, resolve_device

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "FORMAT",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "read_info",
]

FORMAT = "specialkit.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(SpecialkitError, ValueError):
    """A checkpoint is missing, corrupt or belongs to other data; the message names the path and the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself.

    Attributes:
        path: the file.
        model_config: the model's :class:`~specialkit.models.ModelConfig`.
        class_names: (C,) class names of the dataset it was trained on.
        dataset_fingerprint: that dataset's fingerprint.
        history: the training history, or ``None``.
        extra: free JSON-able metadata (e.g. a specialist's classes and dustbin correction).
        format_version: checkpoint format version.
        torch_version: torch version that wrote it.
    """

    path: Path
    model_config: ModelConfig
    class_names: tuple[str, ...]
    dataset_fingerprint: str
    history: History | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    torch_version: str = ""

    @property
    def num_classes(self) -> int:
        """C, the number of dataset classes (a specialist's head may have fewer outputs)."""
        return len(self.class_names)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    model_config: ModelConfig | dict[str, Any] | None = None,
    class_names: tuple[str, ...] | list[str],
    dataset_fingerprint: str,
    history: History | dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically; returns the path.

    Args:
        path: destination file (``.pt``); parent folders are created.
        model: the trained model.
        model_config: the config it was built from; default ``model.config``.
        class_names: (C,) class names of the dataset it was trained on.
        dataset_fingerprint: ``Dataset.fingerprint`` of that dataset.
        history: a :class:`~specialkit.training.History` (or its ``to_dict()``), or ``None``.
        extra: JSON-able metadata.
    """
    path = Path(path)
    if model_config is None:
        model_config = getattr(model, "config", None)
        if not isinstance(model_config, ModelConfig):
            raise CheckpointError(f"cannot save {path}: the model has no .config; pass model_config=")
    config = ModelConfig.from_dict(model_config) if isinstance(model_config, dict) else model_config
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and head.out_features != config.num_classes:
        raise CheckpointError(
            f"cannot save {path}: model_config.num_classes={config.num_classes} but the model's head has "
            f"{head.out_features} outputs; pass model_config=model.config (replace_head keeps it up to date)"
        )
    if isinstance(history, History):
        history = history.to_dict()
    try:
        extra_json = json.dumps(extra or {}, allow_nan=False, sort_keys=True)
        history_json = json.dumps(history, allow_nan=False) if history is not None else None
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"cannot save {path}: extra/history must be JSON-able (dicts, lists, str, int, float, bool, None; "
            f"no NaN): {err}; convert numpy arrays with .tolist()"
        ) from err
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": str(torch.__version__),
        "model_config": config.to_dict(),
        "class_names": [str(c) for c in class_names],
        "dataset_fingerprint": str(dataset_fingerprint),
        "history_json": history_json,
        "extra_json": extra_json,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    with runs.atomic_open(path, "wb") as f:
        torch.save(payload, f)
    return path


_STAGE_COMMANDS = {name: stages.command_of(name) for name in stages.NAMES}


def _fix(path: Path) -> str:
    """The fix for a broken checkpoint: delete it and run the stage command that retrains it."""
    path = Path(path)
    for folder in (path.parent, path.parent.parent):
        if folder.name in _STAGE_COMMANDS:
            return (
                f"delete {path} and run `specialkit {_STAGE_COMMANDS[folder.name]} --run {folder.parent}`, "
                "which trains it again"
            )
    return f"delete {path} and rerun the command that wrote it, which trains it again"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else ""


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found: run the stage that trains it (in a run folder, rerun the same command) or check the path"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {_first_line(err)}): {_fix(path)}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a specialkit checkpoint: pass a file written by save_checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload['format_version']}, newer than this specialkit "
            f"({FORMAT_VERSION}): upgrade specialkit"
        )
    return payload


def _info(path: Path, payload: dict[str, Any]) -> CheckpointInfo:
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        history_json = payload.get("history_json")
        info = CheckpointInfo(
            path=path,
            model_config=config,
            class_names=tuple(payload["class_names"]),
            dataset_fingerprint=payload["dataset_fingerprint"],
            history=History.from_dict(json.loads(history_json)) if history_json else None,
            extra=json.loads(payload.get("extra_json") or "{}"),
            format_version=int(payload["format_version"]),
            torch_version=str(payload.get("torch_version", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint {path} has malformed metadata ({type(err).__name__}: {err}): {_fix(path)}"
        ) from err
    if not isinstance(info.extra, dict):
        raise CheckpointError(f"checkpoint {path} has malformed metadata (extra is not an object): {_fix(path)}")
    return info


def read_info(path: str | Path) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of a checkpoint, without building the model."""
    path = Path(path)
    return _info(path, _read(path))


def _check_classes(path: Path, saved: tuple[str, ...], wanted: tuple[str, ...]) -> None:
    if len(saved) != len(wanted):
        raise CheckpointError(
            f"checkpoint {path} was trained on {len(saved)} classes, this dataset has {len(wanted)}: "
            f"retrain or pass the matching dataset"
        )
    if saved != wanted:
        i = next(i for i, (a, b) in enumerate(zip(saved, wanted)) if a != b)
        raise CheckpointError(
            f"checkpoint {path} was trained on other class names (class {i} is {saved[i]!r} there, {wanted[i]!r} "
            f"in this dataset): retrain or pass the matching dataset"
        )


def load_checkpoint(
    path: str | Path,
    *,
    class_names: tuple[str, ...] | list[str] | None = None,
    dataset_fingerprint: str | None = None,
    device: str | torch.device = "cpu",
    stage: str | None = None,
    required_extra: Sequence[str] = (),
) -> tuple[Classifier, CheckpointInfo]:
    """Rebuild the model of a checkpoint and load its weights (``weights_only=True``).

    Args:
        path: the checkpoint file.
        class_names: the dataset's class names; if given they must equal the checkpoint's.
        dataset_fingerprint: the dataset's fingerprint; if given it must equal the checkpoint's.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"auto"``).
        stage: if given, the checkpoint's ``extra["stage"]`` must equal it (a student's checkpoint copied
            over the generalist's is refused).
        required_extra: keys ``extra`` must hold (e.g. a specialist's ``classes``).

    Returns:
        (model in eval mode, info).

    Raises:
        CheckpointError: missing or corrupt file, another stage's checkpoint, incomplete metadata, or a
            different dataset.
    """
    path = Path(path)
    payload = _read(path)
    info = _info(path, payload)
    if stage is not None and info.extra.get("stage") != stage:
        found = info.extra.get("stage") or ("a specialist" if "classes" in info.extra else "no stage")
        raise CheckpointError(
            f"checkpoint {path} was written by {found!s} (stage recorded in the file), not by the {stage} stage: "
            f"it was copied or moved here; {_fix(path)}"
        )
    missing = [k for k in required_extra if k not in info.extra]
    if missing:
        raise CheckpointError(f"checkpoint {path} has incomplete metadata (no {', '.join(missing)}): {_fix(path)}")
    if class_names is not None:
        _check_classes(path, info.class_names, tuple(str(c) for c in class_names))
    if dataset_fingerprint is not None and dataset_fingerprint != info.dataset_fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was trained on dataset fingerprint {info.dataset_fingerprint}, this dataset has "
            f"{dataset_fingerprint} (same classes, different images: another per_class, image_size, seed or "
            f"version): load the dataset with the settings used for training, or retrain"
        )
    try:
        model = build_model(info.model_config)
        model.load_state_dict(payload["state_dict"])
    except (ModelError, RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {path}: the weights do not fit the saved model config ({err}): delete it and retrain"
        ) from err
    return model.to(resolve_device(device)).eval(), info
