"""Issue 22 part 2: a trained specialist's full C-row head collapsed to S + 1 rows."""

import numpy as np
import pytest
import torch

from specialkit import models, specialists

C, CLASSES = 20, [3, 7, 11, 12]


@pytest.fixture(scope="module")
def trained(one_thread):
    """A generalist, a specialist initialised from it with its head moved (as training moves it), images."""
    torch.manual_seed(0)
    gen = models.build_model(
        models.ModelConfig(name="cnn", num_classes=C, in_channels=1, image_size=16, width=4, depth=2)
    ).eval()
    spec = specialists.init_from_generalist(gen, CLASSES).eval()
    with torch.no_grad():
        spec.head.linear.weight.add_(0.5 * torch.randn_like(spec.head.linear.weight))
        spec.head.linear.bias.add_(0.5 * torch.randn_like(spec.head.linear.bias))
    x_val, x_test = torch.rand(200, 1, 16, 16), torch.rand(100, 1, 16, 16)
    return gen, spec, x_val, x_test


def test_the_special_logits_are_exactly_the_full_heads(trained):
    _, spec, x_val, x_test = trained
    small = specialists.collapse_head(spec, x_val)
    with torch.no_grad():
        full, got = spec(x_test), small(x_test)
    assert got.shape == (100, len(CLASSES) + 1)
    # the same rows of the same weights: equal up to the matmul kernel's summation order (a (N, S+1) product may
    # round differently from a (N, C) one at another thread count or CPU), so the within-group argmax is the same
    torch.testing.assert_close(got[:, :-1], full[:, :-1], rtol=1e-6, atol=1e-5)
    assert torch.equal(got[:, :-1].argmax(1), full[:, :-1].argmax(1))


def test_the_fitted_dustbin_row_tracks_the_full_dustbin_probability_better_than_the_mean_row(trained):
    _, spec, x_val, x_test = trained
    small = specialists.collapse_head(spec, x_val)
    w, b = specialists.dustbin_head(spec.head.linear.weight, spec.head.linear.bias, CLASSES)
    with torch.no_grad():
        feats = spec.features(x_test)
        p_full = torch.softmax(spec(x_test), 1)[:, -1]
        p_small = torch.softmax(small(x_test), 1)[:, -1]
        p_mean_row = torch.softmax(feats @ w.T + b, 1)[:, -1]
    err_small = (p_small - p_full).abs().mean().item()
    err_mean_row = (p_mean_row - p_full).abs().mean().item()
    assert err_small < err_mean_row and err_small < 0.05


def test_the_small_head_stores_s_plus_1_rows_and_leaves_the_model_unchanged(trained):
    _, spec, x_val, _ = trained
    before = [p.clone() for p in spec.parameters()]
    small = specialists.collapse_head(spec, x_val)
    d = spec.head.in_features
    assert specialists.head_rows(spec) == C and specialists.head_rows(small) == len(CLASSES) + 1
    saved = models.count_parameters(spec) - models.count_parameters(small)
    assert saved == (C - len(CLASSES) - 1) * (d + 1)
    assert all(torch.equal(a, p) for a, p in zip(before, spec.parameters()))
    assert small.config.num_classes == len(CLASSES) + 1 and small.config.dustbin_of is None


def test_a_shared_trunk_specialist_keeps_sharing_the_generalists_trunk(trained):
    gen, spec, x_val, x_test = trained
    shared = models.share_trunk(specialists.init_from_generalist(gen, CLASSES), gen.trunk(1)).eval()
    small = specialists.collapse_head(shared, x_val)
    assert small.shared_trunk is shared.shared_trunk
    assert models.count_parameters(small) < models.count_parameters(shared)
    with torch.no_grad():
        torch.testing.assert_close(small(x_test)[:, :-1], shared(x_test)[:, :-1], rtol=1e-6, atol=1e-5)


def test_the_trained_dustbin_row_keeps_the_special_rows_and_matches_the_full_probabilities_better(trained):
    """``fit="trained"`` starts from the least-squares row and trains it on the cross-entropy to the full head's S + 1
    probabilities: on the fitting features the loss falls, and on other features the dustbin probability tracks the
    full head's better than the least-squares row's (features with a trained network's spread; the tiny network's
    features on noise images barely vary)."""
    _, spec, _, _ = trained
    g = torch.Generator().manual_seed(1)
    d = spec.head.in_features
    fit_feats, test_feats = torch.randn(400, d, generator=g) * 3, torch.randn(400, d, generator=g) * 3
    rows = {fit: specialists.small_head(spec.head, fit_feats, fit=fit) for fit in specialists.HEAD_FITS}
    with torch.no_grad():

        def full(h):
            return torch.softmax(spec.head(h), 1)

        ce = {k: -(full(fit_feats) * torch.log_softmax(m(fit_feats), 1)).sum(1).mean().item() for k, m in rows.items()}
        gap = {
            k: (torch.softmax(m(test_feats), 1)[:, -1] - full(test_feats)[:, -1]).abs().mean().item()
            for k, m in rows.items()
        }
        torch.testing.assert_close(
            rows["trained"](test_feats)[:, :-1], spec.head(test_feats)[:, :-1], rtol=1e-6, atol=1e-5
        )
    assert ce["trained"] < ce["lstsq"] - 1e-3
    assert gap["trained"] < gap["lstsq"]
    small = specialists.collapse_head(spec, torch.rand(200, 1, 16, 16), fit="trained")  # the same through the model
    assert specialists.head_rows(small) == len(CLASSES) + 1


def test_refusals(trained):
    gen, spec, x_val, _ = trained
    with pytest.raises(specialists.SpecialistError, match="not a DustbinHead"):
        specialists.collapse_head(gen, x_val)
    with pytest.raises(specialists.SpecialistError, match="N > D"):
        specialists.small_head(spec.head, torch.zeros(3, spec.head.in_features))
    with pytest.raises(specialists.SpecialistError, match="choose one of lstsq, trained"):
        specialists.collapse_head(spec, x_val, fit="exact")
    assert np.isfinite(specialists.head_rows(spec))
