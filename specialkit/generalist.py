"""The recipes of the stages that save one whole-dataset model: the generalist (trained, or brought with
``generalist_from``) and the compute-matched generalist; :func:`train_model` and :func:`load_model` also make and
load the students of :mod:`specialkit.distill`.

A recipe takes the run (``pipeline.Run``: its settings, data, keys and folder protocol) and returns the stage's
result, training it only when the run's folder holds no finished copy for the current key.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import byog, checkpoints, cost, distributed, models, runs, stages, training
from .errors import ConfigError

__all__ = [
    "ModelResult",
    "SPLITS",
    "train_config",
    "model_config",
    "train_model",
    "load_model",
    "make_generalist",
    "make_compute_matched",
    "make_student_matched",
    "train_further",
    "records",
]

SPLITS = ("train", "val", "test")
"""The splits every whole-dataset model's logits are saved on."""


@dataclass
class ModelResult:
    """A trained model of the run with its outputs.

    Attributes:
        name: ``generalist``, ``compute_matched``, ``student_matched``, ``distill`` or ``hard_label_student``.
        model: the network (eval mode, on the CPU).
        history: per-epoch records of training.
        logits: split -> (N, C) float32 logits on ``train``/``val``/``test``.
        examples_seen: training example-passes spent on this model.
    """

    name: str
    model: torch.nn.Module
    history: list[dict[str, Any]]
    logits: dict[str, np.ndarray]
    examples_seen: int

    def probs(self, split: str) -> np.ndarray:
        """(N, C) float64 softmax of the logits on ``split``."""
        return training.softmax(self.logits[split])

    @property
    def val_probs(self) -> np.ndarray:
        """The generalist's class probabilities on the validation images."""
        return self.probs("val")

    @property
    def test_probs(self) -> np.ndarray:
        """The generalist's class probabilities on the test images."""
        return self.probs("test")


def train_config(
    config: Any,
    *,
    epochs: int,
    lr: float,
    seed_offset: int,
    soft_weight: float = 0.0,
    temperature: float = 1.0,
    mixup_alpha: float = 0.0,
) -> training.TrainConfig:
    """The training settings of one model of a run: the run's optimiser, schedule, batch, device and seed with these.

    Args:
        config: the run's ``PipelineConfig``.
        epochs: epochs to train.
        lr: peak learning rate.
        seed_offset: added to ``config.seed`` (:attr:`specialkit.stages.Stage.seed_offset`).
        soft_weight: weight of the soft-target term (0: hard labels only).
        temperature: temperature of the soft targets.
        mixup_alpha: mixup of every training batch (0: off; :func:`specialkit.training.mixup_batch`).

    Returns:
        The :class:`specialkit.training.TrainConfig`.
    """
    c = config
    return training.TrainConfig(
        epochs=epochs,
        batch_size=c.batch_size,
        optimizer=c.optimizer,
        lr=lr,
        weight_decay=c.weight_decay,
        schedule=c.schedule,
        label_smoothing=c.label_smoothing,
        soft_weight=soft_weight,
        temperature=temperature,
        mixup_alpha=mixup_alpha,
        device=c.device,
        seed=c.seed + seed_offset,
        progress=c.progress,
    )


def model_config(
    run: Any, *, num_classes: int, width: int | None = None, depth: int | None = None, name: str | None = None
) -> models.ModelConfig:
    """The architecture of a model of ``run``: the run's (or a brought torchvision generalist's) with these overrides.

    Args:
        run: the run (its dataset gives channels and image size).
        num_classes: outputs.
        width: another width, or ``None``.
        depth: another depth, or ``None``.
        name: another architecture, or ``None``.

    Returns:
        The :class:`specialkit.models.ModelConfig`.
    """
    ds, c = run.dataset(), run.config
    source = run.generalist_source()
    if source is not None and source.has_head and name is None and width is None and depth is None:
        return byog.torchvision_config(
            source,
            num_classes=num_classes,
            in_channels=ds.channels,
            image_size=ds.image_size,
            normalize=c.generalist_normalize,
            input_size=c.generalist_input_size,
        )
    return models.ModelConfig(
        name=name or c.model,
        num_classes=num_classes,
        in_channels=ds.channels,
        image_size=ds.image_size,
        width=width or c.width,
        depth=depth or c.depth,
    )


def train_model(
    run: Any,
    stage: str,
    *,
    model: torch.nn.Module,
    model_config: models.ModelConfig,
    tc: training.TrainConfig,
    teacher: training.Teacher | None = None,
    sample_indices: Callable | None = None,
    examples_seen: int | None = None,
) -> ModelResult:
    """Train (resumably) or load a whole-dataset model of the run; save checkpoint and logits. Under torchrun every
    rank trains its shard and only rank 0 writes (:mod:`specialkit.distributed`).

    Args:
        run: the run.
        stage: the stage (its folder).
        model: the network to train (its start: scratch or the generalist's weights).
        model_config: its configuration (saved in the checkpoint).
        tc: the training settings.
        teacher: soft targets per batch (distillation), or ``None``.
        sample_indices: the examples of each epoch (the compute-matched budget), or ``None`` for all.
        examples_seen: the example-passes to record (default: what training counted).

    Returns:
        The stage's result, loaded back from what was saved.
    """
    key, folder = run.key(stage), run.stage_dir(stage)
    if not run.is_done(stage, key):
        t0 = time.perf_counter()
        if distributed.is_main():
            run.begin(folder, key)
        distributed.barrier()
        ds = run.dataset()
        run.log(
            f"[{stage}] training {model_config.name} ({models.count_parameters(model):,} parameters) "
            f"for {tc.epochs} epochs on {run.device()}"
        )
        training.seed_everything(tc.seed)
        history = training.fit(
            model,
            ds.x_train,
            ds.y_train,
            config=tc,
            x_val=ds.x_val,
            y_val=ds.y_val,
            hflip=ds.hflip,
            teacher=teacher,
            sample_indices=sample_indices,
            state_path=folder / "state.pt",
            desc=stage,
        )
        seen = history.examples_seen if examples_seen is None else examples_seen
        if not distributed.is_main():
            distributed.barrier()  # rank 0 writes the files below
            return load_model(run, stage)
        checkpoints.save_checkpoint(
            folder / "model.pt",
            model,
            model_config=model_config,
            class_names=ds.class_names,
            dataset_fingerprint=ds.fingerprint,
            history=history,
            extra={"stage": stage, "examples_seen": seen},
        )
        for split in SPLITS:
            x, _ = ds.split(split)
            logits = training.predict_logits(model, x, device=run.config.device).numpy()
            runs.save_array(folder / f"logits_{split}.npy", logits)
        (folder / "state.pt").unlink(missing_ok=True)
        run.add_time(stage, time.perf_counter() - t0)
        run.finish(folder, key, seconds=round(time.perf_counter() - t0, 2), examples_seen=seen)
        distributed.barrier()
    return load_model(run, stage)


def load_model(run: Any, stage: str) -> ModelResult:
    """The saved result of a model stage (a scripted or predictions-only generalist from its copy in the run).

    Args:
        run: the run.
        stage: a stage whose :attr:`specialkit.stages.Stage.model` is true.

    Returns:
        Its result (remembered by the run).
    """
    source = run.generalist_source() if stage == "generalist" else None
    if source is not None and not source.has_head:
        return run.memo("generalist", lambda: _load_given(run, source))

    def load() -> ModelResult:
        folder, ds = run.stage_dir(stage), run.dataset()
        model, info = checkpoints.load_checkpoint(
            folder / "model.pt",
            class_names=ds.class_names,
            dataset_fingerprint=ds.fingerprint,
            stage=stage,
            required_extra=("examples_seen",),
        )
        logits = {s: runs.load_array(folder / f"logits_{s}.npy") for s in SPLITS}
        return ModelResult(stage, model.eval(), records(info.history), logits, int(info.extra["examples_seen"]))

    return run.memo(stage, load)


def make_generalist(run: Any) -> ModelResult:
    """Stage 1: the generalist over all classes (docs/METHOD.md section 1): trained, or brought.

    Args:
        run: the run.

    Returns:
        The generalist.
    """
    c = run.config
    mc = run.model_config(num_classes=run.dataset().num_classes)
    if c.generalist_from:
        return _given_generalist(run, mc)
    if not run.is_done("generalist"):
        training.seed_everything(c.seed)
        model = models.build_model(mc)
        tc = run.train_config(epochs=c.epochs, lr=c.lr, seed_offset=stages.by_name("generalist").seed_offset)
        return train_model(run, "generalist", model=model, model_config=mc, tc=tc)
    return load_model(run, "generalist")


def _given_generalist(run: Any, mc: models.ModelConfig) -> ModelResult:
    """The generalist of ``generalist_from`` (:mod:`specialkit.byog`): loaded and checked, then its logits on every split
    it has are saved (nothing is written until the file passed every check). No training."""
    source, key, folder = run.generalist_source(), run.key("generalist"), run.stage_dir("generalist")
    if not run.is_done("generalist", key):
        t0, ds, c = time.perf_counter(), run.dataset(), run.config
        model: torch.nn.Module | None = None
        if source.kind == "torchvision":
            model = byog.load_torchvision(source, mc)
        elif source.has_model:
            model = byog.load_scripted(
                source, normalize=c.generalist_normalize, input_size=c.generalist_input_size, log=run.log
            )
        if model is None:
            logits = byog.load_predictions(
                source.path, labels={s: ds.split(s)[1].numpy() for s in ("val", "test")}, class_names=ds.class_names
            )
        else:
            logits = {s: training.predict_logits(model, ds.split(s)[0], device=c.device).numpy() for s in SPLITS}
            for s, z in logits.items():
                byog.check_outputs(z, path=source.path, split=s, num_classes=ds.num_classes, rows=len(ds.split(s)[1]))
        run.log(f"[generalist] {source.kind} generalist from {source.path}: not trained by the kit")
        run.begin(folder, key)
        if source.kind == "torchvision":
            extra = {"stage": "generalist", "examples_seen": 0, "generalist_from": c.generalist_from}
            checkpoints.save_checkpoint(
                folder / "model.pt",
                model,
                model_config=mc,
                class_names=ds.class_names,
                dataset_fingerprint=ds.fingerprint,
                history=None,
                extra=extra,
            )
        elif model is not None:
            with runs.atomic_open(folder / f"model.{source.kind}", "wb") as f, open(source.path, "rb") as src:
                shutil.copyfileobj(src, f)
        for s, z in logits.items():
            runs.save_array(folder / f"logits_{s}.npy", z)
        run.add_time("generalist", time.perf_counter() - t0)
        run.finish(
            folder, key, seconds=round(time.perf_counter() - t0, 2), examples_seen=0, generalist_from=c.generalist_from
        )
    return load_model(run, "generalist")


def _load_given(run: Any, source: byog.Source) -> ModelResult:
    """A scripted or predictions-only generalist from its stage folder (the run's copy of the file)."""
    folder, c = run.stage_dir("generalist"), run.config
    model = None
    if source.has_model:
        model = byog.load_scripted(
            source,
            normalize=c.generalist_normalize,
            input_size=c.generalist_input_size,
            path=folder / f"model.{source.kind}",
            log=run.log,
        )
    logits = {s: runs.load_array(folder / f"logits_{s}.npy") for s in SPLITS if (folder / f"logits_{s}.npy").is_file()}
    return ModelResult("generalist", model, [], logits, 0)


def make_compute_matched(run: Any) -> ModelResult:
    """The generalist trained further for the training compute all specialists used (``compute_match``: the same
    FLOPs, or the same example-passes; :func:`specialkit.cost.compute_budget`, docs/METHOD.md §7), at
    :data:`specialkit.stages.FINE_TUNE_LR` times the generalist's learning rate. A ``generalist_from`` torchvision
    model is fine-tuned for that budget; other kinds have none (a ``ConfigError`` here).

    Args:
        run: the run.

    Returns:
        The compute-matched generalist.
    """
    return _trained_further(
        run,
        "compute_matched",
        lambda: cost.compute_budget(run)["compute_matched_passes"],
        fix="set compute_matched=false (or bring a torchvision:<arch>:<weights> generalist)",
    )


def make_student_matched(run: Any) -> ModelResult:
    """The generalist trained further for the student's whole budget (:func:`specialkit.cost.student_budget`: the
    specialists' training, the teacher's forward passes and the student's own passes), the same way as the
    compute-matched generalist: the control that says whether the student beats what its compute buys anyway.

    Args:
        run: the run.

    Returns:
        The student-matched generalist.
    """
    return _trained_further(
        run,
        "student_matched",
        lambda: cost.student_budget(run)["student_matched_passes"],
        fix="set student_matched=false (there is no student-matched generalist)",
    )


def _trained_further(run: Any, stage: str, passes: Callable[[], int], *, fix: str) -> ModelResult:
    """``stage`` loaded when finished, else :func:`train_further` for ``passes()``; a skipped stage is a
    ``ConfigError`` naming ``fix``."""
    reason = run.skip_reason(stage)
    if reason:
        raise ConfigError(f"{reason}; {fix}")
    if not run.is_done(stage):
        return train_further(run, stage, passes())
    return load_model(run, stage)


def train_further(run: Any, stage: str, extra: int) -> ModelResult:
    """The trained generalist trained ``extra`` further example-passes as ``stage``: whole epochs of a fixed size
    (``extra`` rounded to epochs of about the training set's size), at :data:`specialkit.stages.FINE_TUNE_LR` times
    the generalist's learning rate, with the stage's seed offset.

    Args:
        run: the run (its generalist finished).
        stage: ``compute_matched`` or ``student_matched``.
        extra: example-passes to spend.

    Returns:
        The model trained as ``stage``.
    """
    ds, c = run.dataset(), run.config
    n = len(ds.y_train)
    epochs = max(1, round(extra / n))
    per_epoch = max(1, extra // epochs)
    model = checkpoints.load_checkpoint(run.stage_dir("generalist") / "model.pt")[0]
    tc = run.train_config(epochs=epochs, lr=c.lr * stages.FINE_TUNE_LR, seed_offset=stages.by_name(stage).seed_offset)
    return train_model(
        run,
        stage,
        model=model,
        model_config=run.model_config(num_classes=ds.num_classes),
        tc=tc,
        sample_indices=_fixed_size_sampler(n, per_epoch),
        examples_seen=per_epoch * epochs,
    )


def _fixed_size_sampler(n: int, per_epoch: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Epochs of exactly ``per_epoch`` examples: random permutations of ``n``, concatenated as needed."""

    def sample(epoch: int, generator: torch.Generator) -> torch.Tensor:
        reps = math.ceil(per_epoch / n)
        return torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)])[:per_epoch]

    return sample


def records(history: training.History | None) -> list[dict[str, Any]]:
    """Per-epoch records as plain dicts (what notebooks and plots take).

    Args:
        history: a training history, or ``None``.

    Returns:
        Its records (empty for ``None``).
    """
    return [] if history is None else history.to_dict()["records"]
