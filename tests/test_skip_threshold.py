"""Issue 22 part 4: HD-CNN's skip threshold on the activation, the fraction of images routed, and the accuracy
versus fraction-routed curve."""

import numpy as np
import pytest

from specialkit import config as config_mod
from specialkit import ensemble, frontier
from specialkit.config import ConfigError, PipelineConfig


def _probs(n: int, c: int, seed: int, scale: float = 3.0) -> np.ndarray:
    z = scale * np.random.default_rng(seed).standard_normal((n, c))
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


GROUPS = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7]), np.array([2, 8, 9])]


@pytest.mark.parametrize("top_n", [1, 3])
def test_threshold_zero_is_the_paper_rule_bit_for_bit(top_n):
    p = _probs(200, 10, 0)
    default = ensemble.activation(p, GROUPS, top_n=top_n)
    assert np.array_equal(ensemble.activation(p, GROUPS, top_n=top_n, threshold=0.0), default)
    assert default.dtype == bool and default.shape == (200, 4)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_threshold_keeps_exactly_the_switched_on_specialists_with_enough_group_mass(threshold):
    p = _probs(300, 10, 1)
    base = ensemble.activation(p, GROUPS, top_n=2)
    got = ensemble.activation(p, GROUPS, top_n=2, threshold=threshold)
    mass = np.stack([p[:, g].sum(1) for g in GROUPS], axis=1)
    assert np.array_equal(got, base & (mass >= threshold))
    assert got.sum() < base.sum()  # something is skipped on these images


def test_threshold_out_of_range_is_refused():
    p = _probs(5, 10, 2)
    for bad in (-0.1, 1.5):
        with pytest.raises(ensemble.EnsembleError, match="threshold must be in"):
            ensemble.activation(p, GROUPS, threshold=bad)


def test_fraction_routed_counts_images_and_specialists():
    active = np.array([[True, False], [False, False], [True, True], [False, True]])
    assert ensemble.fraction_routed(active) == {"fraction_routed": 0.75, "specialists_per_image": 1.0}
    with pytest.raises(ensemble.EnsembleError):
        ensemble.fraction_routed(np.zeros((0, 2), dtype=bool))


def test_threshold_curve_starts_at_the_paper_rule_and_routes_fewer_images_as_t_grows():
    rng = np.random.default_rng(3)
    n, c = 400, 10
    y = rng.integers(0, c, n)
    z = rng.standard_normal((n, c))
    z[np.arange(n), y] += 1.5  # a generalist that is right more often than not
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    outs = []
    for g in GROUPS:
        zs = rng.standard_normal((n, len(g) + 1))
        inside = np.isin(y, g)
        zs[inside, np.searchsorted(g, y[inside])] += 3.0  # specialists that know their classes
        zs[~inside, -1] += 3.0
        outs.append(ensemble.SpecialistOutputs(classes=g, probs=np.exp(zs) / np.exp(zs).sum(1, keepdims=True)))
    curve = frontier.threshold_curve(p, outs, y, (0.5, 0.9), resamples=1000)
    assert list(curve["threshold"]) == [0.0, 0.5, 0.9]
    paper = ensemble.combine_kl(p, outs, ensemble.activation(p, GROUPS)).argmax(1) == y
    assert curve["accuracy"].iloc[0] == paper.mean() and curve["delta"].iloc[0] == 0.0
    assert curve["fraction_routed"].iloc[0] == 1.0  # every class is in a group, so top-1 always switches one on
    assert np.all(np.diff(curve["fraction_routed"]) < 0)
    assert (curve["lo"] <= curve["accuracy"]).all() and (curve["accuracy"] <= curve["hi"]).all()
    assert set(curve["verdict"].iloc[1:]) <= {"better", "worse", "indistinguishable"}
    assert ((curve["p_value"] >= 0) & (curve["p_value"] <= 1)).all()


def test_skip_threshold_setting_enters_the_key_only_when_set():
    assert PipelineConfig().skip_threshold == 0.0
    assert not config_mod.hashed_now("skip_threshold", 0.0)
    assert config_mod.hashed_now("skip_threshold", 0.5)
    assert config_mod.stage_of("skip_threshold") == "ensembles"
    with pytest.raises(ConfigError, match="skip_threshold"):
        PipelineConfig(skip_threshold=1.5)


def test_a_run_with_a_skip_threshold_routes_fewer_test_images(tiny):
    base = tiny.activation("test")
    curve = frontier.run_threshold_curve(tiny, (0.9,))
    skipping = tiny.with_settings(skip_threshold=0.9)  # the last test of the module: it changes the run's settings
    fewer = skipping.activation("test")
    assert skipping.config.skip_threshold == 0.9 and skipping.key("ensembles") != tiny.key("ensembles")
    assert np.array_equal(fewer, base & fewer) and fewer.sum() <= base.sum()
    assert curve["fraction_routed"].iloc[0] == ensemble.fraction_routed(base)["fraction_routed"]
    assert curve["fraction_routed"].iloc[1] == ensemble.fraction_routed(fewer)["fraction_routed"]
