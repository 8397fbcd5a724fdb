"""Issue 22: the confidence skip (the generalist answers alone for an image it is sure of), chosen on validation
images, in the activation, the torch routing, the prepared ensemble, the settings and the frontier."""

import numpy as np
import pandas as pd
import pytest
import torch

from specialkit import config as config_mod
from specialkit import ensemble, evaluation, frontier, inference, models, specialists
from specialkit.config import ConfigError, PipelineConfig

GROUPS = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7]), np.array([2, 8, 9])]


def _probs(n: int, c: int, seed: int, scale: float = 3.0) -> np.ndarray:
    z = scale * np.random.default_rng(seed).standard_normal((n, c))
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _problem(seed: int, n: int = 600, c: int = 10):
    """A generalist right more often than not, and specialists that know their classes (every row filled)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.standard_normal((n, c)) * 1.5
    z[np.arange(n), y] += 2.0
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    outs = []
    for g in GROUPS:
        zs = rng.standard_normal((n, len(g) + 1))
        inside = np.isin(y, g)
        zs[inside, np.searchsorted(g, y[inside])] += 3.0
        zs[~inside, -1] += 3.0
        outs.append(ensemble.SpecialistOutputs(classes=g, probs=np.exp(zs) / np.exp(zs).sum(1, keepdims=True)))
    return p, outs, y


@pytest.mark.parametrize("top_n", [1, 2])
@pytest.mark.parametrize("confident", [0.5, 0.8, 0.95])
def test_an_image_the_generalist_is_sure_of_runs_no_specialist(top_n, confident):
    p = _probs(400, 10, 0)
    base = ensemble.activation(p, GROUPS, top_n=top_n, threshold=0.2)
    got = ensemble.activation(p, GROUPS, top_n=top_n, threshold=0.2, confident=confident)
    sure = p.max(1) > confident
    assert 0 < sure.sum() < len(p)  # both kinds of image are here
    assert not got[sure].any()
    assert np.array_equal(got[~sure], base[~sure])


def test_confident_one_is_the_paper_rule_and_out_of_range_is_refused():
    p = _probs(50, 10, 1, scale=30.0)  # some top-1 probabilities round to exactly 1.0
    assert (p.max(1) == 1.0).any()
    assert np.array_equal(ensemble.activation(p, GROUPS, confident=1.0), ensemble.activation(p, GROUPS))
    for bad in (0.0, -0.2, 1.01):
        with pytest.raises(ensemble.EnsembleError, match="confident must be in"):
            ensemble.activation(p, GROUPS, confident=bad)


@pytest.mark.parametrize("top_n", [1, 2])
def test_the_torch_routing_switches_on_what_the_activation_does(top_n):
    p = _probs(300, 10, 2)
    member = evaluation.group_membership(GROUPS, 10, torch.device("cpu"))
    for threshold, confident in ((0.0, 1.0), (0.3, 1.0), (0.0, 0.7), (0.3, 0.7)):
        want = ensemble.activation(p, GROUPS, top_n=top_n, threshold=threshold, confident=confident)
        got = evaluation.routed_activation(
            torch.as_tensor(p, dtype=torch.float32), member, top_n=top_n, threshold=threshold, confident=confident
        )
        assert np.array_equal(got.numpy(), want)


def test_the_prepared_ensemble_skips_sure_images_and_gives_the_networks_outputs_on_the_rest(one_thread):
    torch.manual_seed(0)
    g = models.build_model(models.ModelConfig(name="cnn", num_classes=10, in_channels=1, image_size=16, width=4))
    g.train()
    with torch.no_grad():
        g(torch.rand(32, 1, 16, 16))
    g.eval()
    trunk = g.trunk(1)
    specs = [
        models.low_rank_delta(models.share_trunk(specialists.init_from_generalist(g, c), trunk), g, 2) for c in GROUPS
    ]
    x = torch.rand(64, 1, 16, 16)
    routing = torch.softmax(4 * torch.randn(64, 10), dim=1)
    sure = routing.amax(1) > 0.8
    assert 0 < int(sure.sum()) < 64
    every = inference.RoutedEnsemble(g, specs, GROUPS)
    skipping = inference.RoutedEnsemble(g, specs, GROUPS, confident=0.8)
    p_all, outs_all, act_all = every(x, routing_probs=routing)
    p_skip, outs_skip, act_skip = skipping(x, routing_probs=routing)
    torch.testing.assert_close(p_skip, p_all)
    assert not act_skip[sure].any() and torch.equal(act_skip[~sure], act_all[~sure])
    for o_all, o_skip, m in zip(outs_all, outs_skip, range(len(GROUPS))):
        rows = act_skip[:, m]
        if o_skip is None:
            assert not rows.any()
            continue
        assert torch.isnan(o_skip[~rows]).all()
        torch.testing.assert_close(o_skip[rows], o_all[rows])
    for i in (int(sure.nonzero()[0]), int((~sure).nonzero()[0])):  # batch 1 routes the same way
        _, outs1, act1 = skipping(x[i : i + 1], routing_probs=routing[i : i + 1])
        assert torch.equal(act1[0], act_skip[i]) and sum(o is not None for o in outs1) == int(act_skip[i].sum())
    with pytest.raises(inference.InferenceError, match="confident"):
        inference.RoutedEnsemble(g, specs, GROUPS, confident=0.0)


def test_the_confidence_curve_starts_with_every_image_routed_and_routes_fewer_as_the_value_falls():
    p, outs, y = _problem(3)
    curve = frontier.confidence_curve(p, outs, y, (0.9, 0.6), resamples=1000)
    assert list(curve["confident"]) == [1.0, 0.9, 0.6]
    paper = ensemble.combine_kl(p, outs, ensemble.activation(p, GROUPS)).argmax(1) == y
    assert curve["accuracy"].iloc[0] == paper.mean() and curve["delta"].iloc[0] == 0.0
    assert curve["fraction_routed"].iloc[0] == 1.0
    assert np.all(np.diff(curve["fraction_routed"]) < 0)
    assert pd.isna(curve["verdict"].iloc[0])
    assert set(curve["verdict"].iloc[1:]) <= {"better", "worse", "indistinguishable"}
    assert (curve["lo"] <= curve["accuracy"]).all() and (curve["accuracy"] <= curve["hi"]).all()


def test_choose_confident_takes_the_lowest_value_that_changes_few_answers():
    p, outs, _ = _problem(4)
    grid = (0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)

    def changed(c):
        full = ensemble.combine_kl(p, outs, ensemble.activation(p, GROUPS)).argmax(1)
        return np.mean(ensemble.combine_kl(p, outs, ensemble.activation(p, GROUPS, confident=c)).argmax(1) != full)

    shares = {c: changed(c) for c in grid}
    assert shares[0.3] > 0.02 and shares[0.99] <= 0.01  # the grid crosses the limits used below
    for limit in (0.0, 0.01, 0.05):
        chosen = frontier.choose_confident(p, outs, grid, max_changed=limit)
        assert chosen == 1.0 or shares[chosen] <= limit
        below = [c for c in grid if c < chosen]
        if below:  # the value after the chosen one changes too many answers
            assert shares[max(below)] > limit
    assert frontier.choose_confident(p, outs, (), max_changed=0.01) == 1.0
    with pytest.raises(frontier.FrontierError, match="max_changed"):
        frontier.choose_confident(p, outs, grid, max_changed=1.0)


def test_skip_confident_setting_enters_the_key_only_when_set():
    assert PipelineConfig().skip_confident == 1.0
    assert not config_mod.hashed_now("skip_confident", 1.0)
    assert config_mod.hashed_now("skip_confident", 0.7)
    assert config_mod.stage_of("skip_confident") == "ensembles"
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="skip_confident"):
            PipelineConfig(skip_confident=bad)


def test_a_run_with_a_confidence_skip_routes_fewer_test_images(tiny):
    base = tiny.activation("test")
    sure = round(float(np.median(tiny.generalist().probs("test").max(1))), 3)  # half the images are surer
    curve = frontier.run_confidence_curve(tiny, (0.999, sure))
    assert curve["chosen"].sum() == 1 and curve["confident"].iloc[0] == 1.0
    skipping = tiny.with_settings(skip_confident=sure)  # the last test of the module: it changes the run's settings
    fewer = skipping.activation("test")
    assert skipping.key("ensembles") != tiny.key("ensembles")
    assert np.array_equal(fewer, base & fewer) and fewer.sum() < base.sum()
    row = curve[curve["confident"] == sure].iloc[0]
    assert row["fraction_routed"] == ensemble.fraction_routed(fewer)["fraction_routed"]


def test_confident_for_share_routes_the_budgeted_share_of_the_least_confident_images():
    p, _, _ = _problem(5)
    top = p.max(axis=1)
    for share in (0.1, 0.25, 0.5, 0.9):
        c = frontier.confident_for_share(p, share)
        routed = ensemble.activation(p, GROUPS, confident=c).any(axis=1)
        k = int(np.floor(share * len(p)))
        assert routed.sum() == k  # no ties in continuous probabilities: exactly the budget
        assert set(np.flatnonzero(routed)) == set(np.argsort(top)[:k])  # and the least confident ones
    assert frontier.confident_for_share(p, 1.0) == 1.0
    for bad in (0.0, -0.1, 1.5, float("nan"), "0.2"):
        with pytest.raises(frontier.FrontierError, match="share must be in"):
            frontier.confident_for_share(p, bad)
    with pytest.raises(frontier.FrontierError, match="routes none of"):
        frontier.confident_for_share(p[:5], 0.1)
    with pytest.raises(frontier.FrontierError, match=r"\(N, C\) probabilities"):
        frontier.confident_for_share(p[0], 0.1)
