"""Issue 22: at most ``max_active`` specialists per image (those whose group holds the most generalist mass), in the
activation, the torch routing, the prepared ensemble, the student's teacher and the settings."""

import copy

import numpy as np
import pytest
import torch

from specialkit import config as config_mod
from specialkit import distill, ensemble, evaluation, inference, models, specialists
from specialkit.config import ConfigError, PipelineConfig

C = 12
GROUPS = [np.array([0, 1, 2]), np.array([2, 3, 4]), np.array([2, 4, 5, 6]), np.array([7, 8])]  # 2 in three groups


def _probs(n: int, seed: int) -> np.ndarray:
    z = 3.0 * np.random.default_rng(seed).standard_normal((n, C))
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("top_n", [1, 2])
@pytest.mark.parametrize("most", [1, 2])
def test_an_image_keeps_the_switched_on_specialists_whose_groups_hold_the_most_mass(top_n, most):
    p = _probs(400, 0)
    every = ensemble.activation(p, GROUPS, top_n=top_n)
    kept = ensemble.activation(p, GROUPS, top_n=top_n, max_active=most)
    mass = np.stack([p[:, g].sum(1) for g in GROUPS], axis=1)
    assert np.array_equal(kept, every & kept) and (kept.sum(1) == np.minimum(every.sum(1), most)).all()
    assert (every.sum(1) > most).any()  # the cap bites on some images
    for i in np.flatnonzero(every.sum(1) > most):
        dropped = every[i] & ~kept[i]
        assert mass[i, kept[i]].min() >= mass[i, dropped].max()  # no dropped group holds more mass than a kept one


def test_no_limit_is_the_paper_rule_ties_go_to_the_lower_index_and_bad_values_are_refused():
    p = _probs(50, 1)
    assert np.array_equal(ensemble.activation(p, GROUPS), ensemble.activation(p, GROUPS, max_active=0))
    assert np.array_equal(ensemble.activation(p, GROUPS), ensemble.activation(p, GROUPS, max_active=len(GROUPS)))
    tie = np.full((1, C), 0.5 / (C - 1))
    tie[0, 2] = 0.5  # class 2 is in groups 0, 1 and 2; groups 0 and 1 hold the same mass, group 2 more
    tie[0, [0, 1, 3, 4]] = 0.0
    tie /= tie.sum()
    assert ensemble.activation(tie, GROUPS, max_active=1)[0].tolist() == [False, False, True, False]
    assert ensemble.activation(tie, GROUPS, max_active=2)[0].tolist() == [True, False, True, False]
    for bad in (-1, 1.5, True):
        with pytest.raises(ensemble.EnsembleError, match="max_active"):
            ensemble.activation(p, GROUPS, max_active=bad)
    tie_t = torch.as_tensor(tie, dtype=torch.float32)
    member = evaluation.group_membership(GROUPS, C)
    assert evaluation.routed_activation(tie_t, member, max_active=2)[0].tolist() == [True, False, True, False]


@pytest.mark.parametrize("kwargs", [{"top_n": 1}, {"top_n": 2, "threshold": 0.2}, {"top_n": 1, "confident": 0.7}])
def test_the_torch_routing_caps_as_the_activation_does(kwargs):
    p = _probs(300, 2)
    member = evaluation.group_membership(GROUPS, C)
    want = ensemble.activation(p, GROUPS, max_active=1, **kwargs)
    got = evaluation.routed_activation(torch.as_tensor(p, dtype=torch.float32), member, max_active=1, **kwargs)
    assert np.array_equal(got.numpy(), want)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    g = models.build_model(
        models.ModelConfig(name="cnn", num_classes=C, in_channels=1, image_size=16, width=4, depth=3)
    )
    g.train()
    with torch.no_grad():
        g(torch.rand(32, 1, 16, 16))
    g.eval()
    trunk = g.trunk(1)
    specs = [
        models.low_rank_delta(models.share_trunk(specialists.init_from_generalist(g, c), trunk), g, 2).eval()
        for c in GROUPS
    ]
    with torch.no_grad():
        for s in specs:
            for layer in s.modules():
                if isinstance(layer, models.LowRankDelta):
                    layer.up.normal_(0, 0.05)
    return g, specs


@pytest.mark.parametrize("batch", [1, 17])
def test_the_prepared_ensemble_runs_only_the_kept_specialists_and_gives_their_outputs(one_thread, nets, batch):
    g, specs = nets
    fast = inference.RoutedEnsemble(g, specs, GROUPS, max_active=1)
    member = evaluation.group_membership(GROUPS, C)
    merged = [models.merge_deltas(s) for s in specs]
    torch.manual_seed(3)
    x = torch.rand(batch, 1, 16, 16)
    routing = torch.full((batch, C), 0.02)
    routing[:, 2] = 0.5  # every image's top class is in three groups
    routing[:, 5] = 0.2  # ... and group 2 holds the most mass
    routing /= routing.sum(1, keepdim=True)
    _, outs, active = fast(x, routing_probs=routing)
    _, r_outs, r_active = evaluation.routed_forward(g, merged, x, member, max_active=1, routing_probs=routing)
    assert torch.equal(active, r_active) and active.sum(1).eq(1).all() and active[:, 2].all()
    for o, r in zip(outs, r_outs, strict=True):
        assert (o is None) == (r is None)
        if o is not None:  # the reused first layer rescales the generalist's folded output: float32 rounding
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, equal_nan=True)
    with pytest.raises(inference.InferenceError, match="max_active"):
        inference.RoutedEnsemble(g, specs, GROUPS, max_active=-1)


def test_the_teacher_runs_only_the_kept_specialists_on_their_rows(one_thread, nets):
    g, specs = nets
    g = copy.deepcopy(g)  # the specialists' trunk still reads the original; only this copy's head changes
    with torch.no_grad():
        g.head.bias[2] += 5.0  # every image's top class is 2, which three groups hold
    trained = [
        specialists.TrainedSpecialist(
            model=s, classes=c, class_names=[str(k) for k in c], history=[], examples_seen=0, dustbin_shift=0.0
        )
        for s, c in zip(specs, GROUPS, strict=True)
    ]
    rows = {m: 0 for m in range(len(specs))}
    for m, s in enumerate(specs):  # count the rows each specialist's own stages see
        own = s.forward_shared
        s.forward_shared = lambda h, m=m, own=own: (rows.__setitem__(m, rows[m] + len(h)), own(h))[1]
    torch.manual_seed(4)
    x = torch.rand(200, 1, 16, 16)
    with torch.no_grad():
        p_gen = torch.softmax(g(x).double(), dim=1).numpy()
    for most in (0, 1):
        rows.update(dict.fromkeys(rows, 0))
        q = distill.ensemble_teacher(g, trained, max_active=most)(x)
        want = ensemble.activation(p_gen, GROUPS, max_active=most)
        assert q.shape == (200, C) and [rows[m] for m in range(len(specs))] == want.sum(0).tolist()
    assert (ensemble.activation(p_gen, GROUPS).sum(1) > 1).any()  # the cap changed what ran


def test_max_active_setting_enters_the_key_only_when_set():
    assert PipelineConfig().max_active == 0
    assert not config_mod.hashed_now("max_active", 0)
    assert config_mod.hashed_now("max_active", 1)
    assert config_mod.stage_of("max_active") == "ensembles"
    with pytest.raises(ConfigError, match="max_active"):
        PipelineConfig(max_active=-1)


def test_a_run_with_max_active_routes_at_most_that_many_per_image(tiny):
    base = tiny.activation("test")
    capped = tiny.with_settings(max_active=1)
    one = capped.activation("test")
    assert capped.key("ensembles") != tiny.key("ensembles")
    assert np.array_equal(one, base & one) and (one.sum(1) <= 1).all()
