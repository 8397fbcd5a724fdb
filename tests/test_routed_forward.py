"""Issue 22 part 1: the ensemble pass with its routing in torch gives the eager pass's outputs."""

import numpy as np
import pytest
import torch

from specialkit import ensemble, evaluation, models, specialists

C = 24
GROUPS = [np.arange(0, 6), np.arange(6, 12), np.array([12, 13, 14, 2]), np.arange(15, 24)]


@pytest.fixture(scope="module")
def nets(one_thread):
    torch.manual_seed(0)
    gen = models.build_model(
        models.ModelConfig(name="cnn", num_classes=C, in_channels=1, image_size=16, width=4, depth=3)
    ).eval()
    whole = [specialists.init_from_generalist(gen, g).eval() for g in GROUPS]
    for s in whole:
        with torch.no_grad():
            s.head.linear.weight.add_(torch.randn_like(s.head.linear.weight))
    trunk = gen.trunk(2)
    shared = [models.share_trunk(specialists.init_from_generalist(gen, g), trunk).eval() for g in GROUPS]
    return gen, whole, shared, torch.rand(40, 1, 16, 16)


@pytest.mark.parametrize("kind", ["whole", "shared"])
@pytest.mark.parametrize(("top_n", "threshold"), [(1, 0.0), (2, 0.0), (1, None)])
@pytest.mark.parametrize("batch", [1, 40])
def test_routed_forward_matches_the_eager_pass(nets, kind, top_n, threshold, batch):
    gen, whole, shared, x = nets
    specs = whole if kind == "whole" else shared
    member = evaluation.group_membership(GROUPS, C)
    if threshold is None:  # the median mass of the group the top class switches on: half the images skip
        with torch.inference_mode():
            p_all = torch.softmax(gen(x), 1).numpy().astype(np.float64)
        mass = (p_all @ member.numpy().astype(np.float64))[ensemble.activation(p_all, GROUPS)]
        threshold = float(np.median(mass))
    outs_all = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            p_ref, o_ref, a_ref = evaluation.ensemble_forward(
                gen, specs, xb, lambda p: ensemble.activation(p, GROUPS, top_n=top_n, threshold=threshold)
            )
            p, o, a = evaluation.routed_forward(gen, specs, xb, member, top_n=top_n, threshold=threshold)
            np.testing.assert_allclose(p.numpy(), p_ref, rtol=1e-6, atol=1e-7)
            assert np.array_equal(a.numpy(), a_ref)
            for m, (got, ref) in enumerate(zip(o, o_ref)):
                if got is None:
                    assert not a_ref[:, m].any()
                    continue
                rows = a_ref[:, m]
                np.testing.assert_allclose(got.numpy()[rows], ref[rows], rtol=1e-5, atol=1e-6)
                assert np.isnan(got.numpy()[~rows]).all()
            outs_all.append(a.numpy())
    active = np.concatenate(outs_all)
    if threshold > 0:
        assert 0 < active.any(1).mean() < 1  # some images skip every specialist, some do not


def test_group_membership_refuses_a_class_out_of_range():
    with pytest.raises(evaluation.EvaluationError, match="class indices"):
        evaluation.group_membership([np.array([0, C])], C)
