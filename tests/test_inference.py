"""Issue 22: an ensemble prepared once for routed inference gives what the networks as trained give."""

import numpy as np
import pytest
import torch

from specialkit import evaluation, inference, models, specialists

C = 20
GROUPS = [np.array([1, 5, 9]), np.array([2, 3]), np.array([7, 11, 13, 17])]


def _generalist() -> models.Classifier:
    torch.manual_seed(0)
    g = models.build_model(
        models.ModelConfig(name="cnn", num_classes=C, in_channels=1, image_size=16, width=4, depth=3)
    )
    g.train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        g(torch.rand(32, 1, 16, 16))
    return g.eval()


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, models.LowRankDelta):
                layer.up.normal_(0, 0.05)
            elif isinstance(layer, torch.nn.BatchNorm2d):
                layer.weight.mul_(1.1)
        model.head.linear.weight.add_(0.1 * torch.randn_like(model.head.linear.weight))
    return model.eval()


@pytest.fixture(scope="module")
def nets():
    g = _generalist()
    trunk = g.trunk(2)
    dense = [_trained_like(models.share_trunk(specialists.init_from_generalist(g, c), trunk)) for c in GROUPS]
    delta = [
        _trained_like(models.low_rank_delta(models.share_trunk(specialists.init_from_generalist(g, c), trunk), g, 2))
        for c in GROUPS
    ]
    return g, dense, delta


def _reference(g, specs, x, shifts, routing=None):
    """routed_forward on the merged networks, each specialist's dustbin correction applied afterwards."""
    member = evaluation.group_membership(GROUPS, C, x.device)
    merged = [models.merge_deltas(s) for s in specs]
    p_gen, outs, active = evaluation.routed_forward(g, merged, x, member, routing_probs=routing)
    fixed = []
    for o, c in zip(outs, shifts):
        if o is None:
            fixed.append(None)
            continue
        z = torch.log(o.double())
        z[:, -1] += c
        fixed.append(torch.softmax(z, dim=1).float())
    return p_gen, fixed, active


@pytest.mark.parametrize("kind", ["dense", "delta"])
@pytest.mark.parametrize("batch", [1, 17])
def test_it_gives_the_outputs_of_the_networks_as_trained(one_thread, nets, kind, batch):
    g, dense, delta = nets
    specs = dense if kind == "dense" else delta
    shifts = [0.3, -0.7, 1.1]
    fast = inference.RoutedEnsemble(g, specs, GROUPS, dustbin_shifts=shifts)
    assert fast.reuses == (kind == "delta")  # a delta on the generalist's first later layer reuses its output
    torch.manual_seed(2)
    x = torch.rand(batch, 1, 16, 16)
    routing = torch.softmax(3 * torch.randn(batch, C), dim=1)  # spreads the rows over every specialist
    for route in (None, routing):
        p_gen, outs, active = fast(x, routing_probs=route)
        r_gen, r_outs, r_active = _reference(g, specs, x, shifts, routing=route)
        torch.testing.assert_close(p_gen, r_gen, rtol=1e-5, atol=1e-6)
        assert torch.equal(active, r_active)
        for o, r in zip(outs, r_outs):
            assert (o is None) == (r is None)
            if o is not None:
                torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert any(o is not None for o in fast(x, routing_probs=routing)[1])


def test_refusals(one_thread, nets):
    g, dense, _ = nets
    whole = [specialists.init_from_generalist(g, c).eval() for c in GROUPS]
    with pytest.raises(inference.InferenceError, match="share one trunk"):
        inference.RoutedEnsemble(g, whole, GROUPS)
    with pytest.raises(inference.InferenceError, match="not cut from this generalist"):
        inference.RoutedEnsemble(models.build_model(g.config), dense, GROUPS)
    with pytest.raises(inference.InferenceError, match="one group per specialist"):
        inference.RoutedEnsemble(g, dense, GROUPS[:2])
