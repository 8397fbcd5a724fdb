"""Issue 20 part 2: mixup for the student and its control (``distill_mixup``), the teacher asked on the mixed images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from specialkit import checkpoints, models, pipeline, training
from specialkit.config import ConfigError, PipelineConfig


class _Recorder(torch.nn.Module):
    """A model that keeps every input it sees in training mode (what the student trains on)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.head = inner.head
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x.detach().clone())
        return self.inner(x)


def _tiny_model(num_classes: int = 4) -> models.Classifier:
    torch.manual_seed(0)
    cfg = models.ModelConfig(
        name="cnn", num_classes=num_classes, in_channels=1, image_size=8, width=4, depth=2, blocks_per_stage=1
    )
    return models.build_model(cfg)


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def test_the_teacher_is_asked_on_exactly_the_mixed_batch_the_student_trains_on(one_thread):
    x, y = _data()
    asked: list[torch.Tensor] = []

    def teacher(xb: torch.Tensor) -> torch.Tensor:
        asked.append(xb.detach().clone())
        return torch.full((len(xb), 4), 0.25)

    model = _Recorder(_tiny_model())
    tc = training.TrainConfig(
        epochs=2, batch_size=16, soft_weight=0.5, mixup_alpha=0.4, device="cpu", progress=False, seed=5
    )
    training.fit(model, x, y, config=tc, teacher=teacher)
    assert len(asked) == len(model.seen) == 6  # 3 steps per epoch, 2 epochs
    for a, s in zip(asked, model.seen):
        assert torch.equal(a, s)  # consistent views: the same tensor, bit for bit
    # mixed: pixel values between the 256 levels of the augmented uint8 images (zero padding keeps them on the grid)
    off_grid = [float(((s * 255) - (s * 255).round()).abs().max()) for s in model.seen]
    assert max(off_grid) > 1e-3


def test_mixup_batch_mixes_images_and_labels_by_the_same_lambda():
    x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.full((1, 2, 2), 0.5)])
    xm, ym = training.mixup_batch(x, torch.tensor([0, 1, 2]), n_classes=4, alpha=0.4, generator=torch.Generator())
    assert ym.shape == (3, 4) and torch.allclose(ym.sum(1), torch.ones(3)) and float(ym[:, 3].abs().max()) == 0.0
    # each mixed image is the label-weighted mean of the three images' values (0, 1, 0.5)
    assert torch.allclose(xm.flatten(1).mean(1), ym[:, 1] + 0.5 * ym[:, 2])
    again = training.mixup_batch(x, torch.tensor([0, 1, 2]), n_classes=4, alpha=0.4, generator=torch.Generator())
    assert torch.equal(again[0], xm)  # only the generator's draws decide
    with pytest.raises(training.TrainingError, match="alpha=0"):
        training.mixup_batch(x, torch.tensor([0, 1, 2]), n_classes=4, alpha=0.0, generator=torch.Generator())


def test_alpha_zero_leaves_the_student_and_its_control_bit_identical(tiny, tmp_path):
    """``distill_mixup=0`` is today's run: the same keys and, trained afresh, the same weights."""
    runs = {}
    for name, extra in (("plain", {}), ("zero", {"distill_mixup": 0.0})):
        shutil.copytree(tiny.folder, tmp_path / name)
        cfg = tiny.config.replace(student_epochs=1, **extra)
        runs[name] = pipeline.Run(tmp_path / name, cfg, overwrite=True, log=lambda s: None)
    for stage in ("distill", "hard_label_student"):
        assert runs["zero"].key(stage) == runs["plain"].key(stage)
        weights = []
        for run in runs.values():
            run.get(stage)
            weights.append(checkpoints.load_checkpoint(run.stage_dir(stage) / "model.pt")[0].state_dict())
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_key_changes_only_when_set_and_a_bad_alpha_names_the_fix(tmp_path):
    cfg = PipelineConfig.preset("tiny")
    run = pipeline.Run(tmp_path / "k", cfg, log=lambda s: None)
    stages = ("distill", "hard_label_student")
    keys = {s: run.key(s) for s in stages}
    zero = pipeline.Run(tmp_path / "z", cfg.replace(distill_mixup=0.0), log=lambda s: None)
    mixed = pipeline.Run(tmp_path / "m", cfg.replace(distill_mixup=0.2), log=lambda s: None)
    assert {s: zero.key(s) for s in stages} == keys
    assert all(mixed.key(s) != keys[s] for s in stages)
    assert mixed.key("distill") != mixed.key("hard_label_student")
    for other in ("generalist", "specialists", "ensembles"):
        assert mixed.key(other) == run.key(other)
    for bad in (-0.5, float("inf"), True):
        with pytest.raises(ConfigError, match=r"distill_mixup=.*(>= 0|number)") as err:
            PipelineConfig.preset("tiny", distill_mixup=bad)
        assert "\n" not in str(err.value)


def test_a_mixed_student_trains_differently_and_reads_mixed_accuracy(one_thread):
    x, y = _data()
    out = {}
    for alpha in (0.0, 0.4):
        model = _tiny_model()
        tc = training.TrainConfig(epochs=1, batch_size=16, mixup_alpha=alpha, device="cpu", progress=False, seed=5)
        result = training.fit(model, x, y, config=tc)
        out[alpha] = (model.state_dict(), result)
    assert not all(torch.equal(out[0.0][0][k], out[0.4][0][k]) for k in out[0.0][0])
    assert np.isfinite(out[0.4][1].records[-1].train_loss)
    assert 0.0 <= out[0.4][1].records[-1].train_acc <= 1.0


def test_a_mixed_run_interrupted_and_resumed_ends_with_the_same_weights(one_thread, tmp_path):
    """lam and the partner order draw only from the run's generator, which the state file keeps."""
    x, y = _data()
    tc = training.TrainConfig(
        epochs=3, batch_size=16, schedule="constant", mixup_alpha=0.4, device="cpu", progress=False, seed=5
    )

    class Interrupt(Exception):
        pass

    def order(epoch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(len(y), generator=generator)

    def interrupted(epoch: int, generator: torch.Generator) -> torch.Tensor:
        if epoch == 2:
            raise Interrupt
        return order(epoch, generator)

    full = _tiny_model()
    training.fit(full, x, y, config=tc, sample_indices=order)
    state = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        training.fit(_tiny_model(), x, y, config=tc, sample_indices=interrupted, state_path=state)
    resumed = _tiny_model()
    with torch.no_grad():  # another start: the weights must come from the state file
        for p in resumed.parameters():
            p.add_(1.0)
    training.fit(resumed, x, y, config=tc, sample_indices=order, state_path=state)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_soft_targets_computed_beforehand_are_refused_with_mixup():
    x, y = _data()
    soft = torch.full((len(y), 4), 0.25)
    cfg = training.TrainConfig(epochs=1, batch_size=8, soft_weight=0.5, mixup_alpha=0.2, device="cpu", progress=False)
    with pytest.raises(training.TrainingError, match="per-batch teacher"):
        training.fit(_tiny_model(), x, y, config=cfg, soft_targets=soft)
