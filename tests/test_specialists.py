import math

import numpy as np
import pytest
import torch

from specialkit import data, models, specialists, training
from specialkit.specialists import SpecialistConfig, SpecialistError

C = 6
GROUP = np.array([4, 1])  # deliberately not sorted: output order follows `classes`


def _toy_dataset(per_class: int = 24, seed: int = 0) -> data.Dataset:
    """6 classes of 8x8 one-channel images; class k lights up a class-specific 2x2 block."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(C).repeat_interleave(n)
        x = torch.randint(0, 60, (len(y), 1, 8, 8), generator=g)
        for k in range(C):
            r, c = divmod(k, 3)
            x[y == k, :, 2 * r + 1 : 2 * r + 3, 2 * c + 1 : 2 * c + 3] += 180
        return x.clamp(0, 255).to(torch.uint8), y

    xt, yt = split(per_class)
    xv, yv = split(6)
    xs, ys = split(6)
    return data.Dataset("toy6", tuple("abcdef"), xt, yt, xv, yv, xs, ys)


def _tiny_model(num_classes: int = C, width: int = 4, seed: int = 0) -> models.Classifier:
    torch.manual_seed(seed)
    cfg = models.ModelConfig(
        name="cnn", num_classes=num_classes, in_channels=1, image_size=8, width=width, depth=2, blocks_per_stage=1
    )
    return models.build_model(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ds() -> data.Dataset:
    return _toy_dataset()


@pytest.fixture(scope="module")
def generalist() -> models.Classifier:
    m = _tiny_model()
    with torch.no_grad():  # make the head non-trivial so the bounds below are not tested on ~0 logits
        m.head.weight.mul_(8.0)
        m.head.bias.copy_(torch.linspace(-2, 2, C))
    return m


def _train_config(**kw) -> training.TrainConfig:
    base = dict(
        epochs=5,
        batch_size=16,
        lr=0.05,
        schedule="constant",
        augment=False,
        device="cpu",
        progress=False,
        seed=3,
        amp=False,
        num_threads=1,
    )
    base.update(kw)
    return training.TrainConfig(**base)


# ---------------------------------------------------------------------------------------- target map


def test_target_map_keeps_special_identity_and_sends_the_rest_to_the_last_index():
    m = specialists.target_map(GROUP, C)
    assert m.dtype == np.int64 and m.shape == (C,)
    assert m.tolist() == [2, 1, 2, 2, 0, 2]
    y = np.array([4, 1, 0, 5, 4])
    assert m[y].tolist() == [0, 1, 2, 2, 0]
    with pytest.raises(SpecialistError, match="distinct"):
        specialists.target_map([1, 1], C)
    with pytest.raises(SpecialistError, match="distinct indices in"):
        specialists.target_map([0, 6], C)


def test_collapse_probs_keeps_special_cells_and_sums_the_rest():
    p = np.random.default_rng(0).dirichlet(np.ones(C), size=5)
    out = specialists.collapse_probs(p, GROUP)
    assert out.shape == (5, 3)
    np.testing.assert_allclose(out[:, 0], p[:, 4])
    np.testing.assert_allclose(out[:, 1], p[:, 1])
    np.testing.assert_allclose(out[:, 2], p[:, [0, 2, 3, 5]].sum(1))
    np.testing.assert_allclose(out.sum(1), 1.0)


def test_collapse_soft_targets_hand_case_and_consistency_with_temperature_one():
    v = np.zeros((1, 5))  # equal logits; S = {0}, K = 4 other classes
    p2 = np.full((1, 5), 0.2)  # softmax(v / 2)
    probs_way = specialists.collapse_soft_targets(p2, [0], temperature=2.0, method="probs")
    logits_way = specialists.collapse_soft_targets(p2, [0], temperature=2.0, method="logits")
    np.testing.assert_allclose(probs_way, [[0.2, 0.8]])
    np.testing.assert_allclose(logits_way, [[1 / 3, 2 / 3]])  # cells (0, log 4) softened at T=2: 1 : 4**0.5

    rng = np.random.default_rng(0)
    v = rng.normal(0, 2, (20, C))
    soft = lambda t: np.exp(v / t) / np.exp(v / t).sum(1, keepdims=True)  # noqa: E731
    target_t1 = specialists.collapse_probs(soft(1.0), GROUP)
    for method in ("logits", "probs"):
        np.testing.assert_allclose(
            specialists.collapse_soft_targets(soft(1.0), GROUP, temperature=1.0, method=method), target_t1
        )
    t3 = specialists.collapse_soft_targets(soft(3.0), GROUP, temperature=3.0)
    untempered = np.exp(3 * np.log(t3)) / np.exp(3 * np.log(t3)).sum(1, keepdims=True)
    np.testing.assert_allclose(untempered, target_t1, rtol=1e-9)  # same T=1 distribution as the generalist's
    assert (
        specialists.collapse_soft_targets(soft(3.0), GROUP, temperature=3.0, method="probs")[:, -1] >= t3[:, -1]
    ).all()


# ---------------------------------------------------------------------------------------- sampler


def _imbalanced_labels() -> torch.Tensor:
    counts = [50, 30, 200, 120, 20, 80]  # special {4, 1}: 50 of 500 examples
    return torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])


def test_enriched_sampler_default_epoch_is_one_pass_over_special_and_as_many_others():
    y = _imbalanced_labels()
    s = specialists.enriched_sampler(y, GROUP, special_fraction=0.5)
    assert (s.n_special, s.n_rest, s.epoch_size) == (50, 50, 100)
    order = s(0, torch.Generator().manual_seed(1))
    assert order.dtype == torch.int64 and len(order) == 100
    assert order.min() >= 0 and order.max() < len(y)
    special = np.isin(y[order].numpy(), GROUP)
    assert special.sum() == 50
    assert sorted(order[special].tolist()) == sorted(np.flatnonzero(np.isin(y.numpy(), GROUP)).tolist())
    assert len(set(order[~special].tolist())) == 50  # the rest drawn without repeats (its pool is larger)


@pytest.mark.parametrize("fraction, epoch_size", [(0.5, None), (0.3, 64), (0.7, 333)])
def test_enriched_sampler_share_is_the_special_fraction_in_every_batch(fraction, epoch_size):
    y = _imbalanced_labels()
    s = specialists.enriched_sampler(y, GROUP, special_fraction=fraction, epoch_size=epoch_size)
    g = torch.Generator().manual_seed(0)
    shares, batch_dev = [], []
    for epoch in range(50):
        order = s(epoch, g)
        assert len(order) == s.epoch_size and order.min() >= 0 and order.max() < len(y)
        special = np.isin(y[order].numpy(), GROUP)
        shares.append(special.mean())
        for b in range(0, len(order) - 16 + 1, 16):  # batches of 16: enriched too, not just the epoch
            batch_dev.append(abs(special[b : b + 16].sum() - 16 * s.special_fraction))
    assert abs(np.mean(shares) - fraction) < 0.01
    assert abs(s.special_fraction - fraction) <= 1 / s.epoch_size
    assert max(batch_dev) <= 2.0


def test_enriched_sampler_is_deterministic_for_a_generator_seed_and_varies_with_it():
    y = _imbalanced_labels()
    s = specialists.enriched_sampler(y, GROUP)
    a = s(0, torch.Generator().manual_seed(7))
    b = s(0, torch.Generator().manual_seed(7))
    c = s(0, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(s(2), s(2)) and not torch.equal(s(2), s(3))  # without a generator: seed and epoch


def test_enriched_sampler_reuses_a_small_rest_pool_evenly():
    y = torch.tensor([0] * 90 + [1] * 10)  # the rest (class 1) has 10 examples, 90 are needed
    s = specialists.enriched_sampler(y, [0], special_fraction=0.5)
    order = s(0, torch.Generator().manual_seed(0))
    rest_counts = np.bincount(order[y[order] == 1].numpy(), minlength=100)[90:]
    assert rest_counts.sum() == 90 and rest_counts.min() == rest_counts.max() == 9


def test_enriched_sampler_rejects_impossible_groups():
    y = _imbalanced_labels()
    with pytest.raises(SpecialistError, match="strictly between 0 and 1"):
        specialists.enriched_sampler(y, GROUP, special_fraction=1.0)
    with pytest.raises(SpecialistError, match="no example of the special"):
        specialists.enriched_sampler(torch.tensor([0, 0, 2]), [1], num_classes=3)
    with pytest.raises(SpecialistError, match="covers every class"):
        specialists.enriched_sampler(y, np.arange(C))


# ---------------------------------------------------------------------------------------- correction


def test_odds_correction_value_on_a_hand_case():
    y = np.array([0] * 20 + [1] * 80)  # pi = 0.2
    # f = 0.5: odds 1:1 instead of 1:4 -> r = 4
    assert specialists.odds_correction(y, [0], special_fraction=0.5) == pytest.approx(math.log(4.0))
    assert specialists.oversampling_factor(0.2, 0.5) == pytest.approx(4.0)
    assert specialists.odds_correction(y, [0], special_fraction=0.2) == pytest.approx(0.0, abs=1e-12)
    # f = 0.1 undersamples: r = (1/9) / (1/4)
    assert specialists.odds_correction(y, [0], special_fraction=0.1) == pytest.approx(math.log(4 / 9))


def test_correction_turns_training_sampling_priors_into_natural_priors():
    y = _imbalanced_labels().numpy()
    f = 0.5
    natural = np.bincount(y, minlength=C) / len(y)
    n_spec = natural[GROUP]  # natural priors of the special cells and the dustbin
    natural_cells = np.append(n_spec, 1 - n_spec.sum())
    train_cells = np.append(f * n_spec / n_spec.sum(), 1 - f)  # what the enriched sampling shows the model
    corr = specialists.odds_correction(y, GROUP, special_fraction=f)
    logits = np.log(train_cells)[None, :] + 3.0  # a model that learnt the sampling priors (any offset)
    np.testing.assert_allclose(specialists.apply_dustbin_shift(logits, corr)[0], natural_cells, rtol=1e-10)
    np.testing.assert_allclose(specialists.apply_dustbin_shift(logits, 0.0)[0], train_cells, rtol=1e-10)

    # the same with the priors the sampler really produces (empirical, over many epochs)
    s = specialists.enriched_sampler(y, GROUP, special_fraction=f)
    g = torch.Generator().manual_seed(0)
    drawn = np.concatenate([y[s(e, g).numpy()] for e in range(200)])
    cells = specialists.target_map(GROUP, C)[drawn]
    empirical = np.bincount(cells, minlength=3) / len(cells)
    corrected = specialists.apply_dustbin_shift(np.log(empirical)[None], corr)[0]
    np.testing.assert_allclose(corrected, natural_cells, atol=2e-3)


def test_prior_matched_correction_matches_the_natural_share_and_equals_log_r_for_a_prior_only_model():
    y = _imbalanced_labels().numpy()
    pi = specialists.natural_special_share(y, GROUP)
    assert pi == pytest.approx(0.1)
    n_spec = (np.bincount(y, minlength=C) / len(y))[GROUP]
    train_cells = np.append(0.5 * n_spec / n_spec.sum(), 0.5)
    logits = np.tile(np.log(train_cells), (7, 1))  # the same prior-only prediction for every image
    c = specialists.prior_matched_correction(logits, 1 - pi)
    assert c == pytest.approx(specialists.odds_correction(y, GROUP, special_fraction=0.5), abs=1e-6)
    z = np.random.default_rng(0).normal(0, 3, (200, 3))
    c = specialists.prior_matched_correction(z, 0.8)
    assert specialists.apply_dustbin_shift(z, c)[:, -1].mean() == pytest.approx(0.8, abs=1e-6)
    with pytest.raises(SpecialistError, match="dustbin_share"):
        specialists.prior_matched_correction(z, 1.0)


# ---------------------------------------------------------------------------------------- head init


def test_init_from_generalist_reproduces_the_generalist_exactly(generalist, ds):
    """Defect 1 of the trust issue: the one-row dustbin head started far from the generalist."""
    spec = specialists.init_from_generalist(generalist, GROUP).eval()
    assert spec.num_outputs == 3 and spec.config.num_classes == 3 and spec.config.dustbin_of == C
    assert generalist.num_outputs == C  # the generalist is left as it was
    x = data.to_float(ds.x_val)
    with torch.no_grad():
        p_gen = torch.softmax(generalist(x).double(), 1).numpy()
        p_spec = torch.softmax(spec(x).double(), 1).numpy()
    target = specialists.collapse_probs(p_gen, GROUP)
    assert np.abs(p_spec[:, -1] - target[:, -1]).mean() < 1e-3  # dustbin = generalist mass outside the group
    np.testing.assert_allclose(p_spec, target, atol=1e-5)  # and the special classes too
    with torch.no_grad():  # the trunk and the head are copies, not shared
        next(spec.body.parameters()).add_(1.0)
        spec.head.linear.weight.add_(1.0)
    with torch.no_grad():
        np.testing.assert_allclose(torch.softmax(generalist(x).double(), 1).numpy(), p_gen)


def test_one_row_dustbin_head_is_only_a_lower_bound(generalist):
    """The head the kit used before: mean of the other rows + log K, below the log-sum-exp it should equal."""
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    w, b = specialists.dustbin_head(generalist.head.weight.detach(), generalist.head.bias.detach(), GROUP)
    with torch.no_grad():
        h = generalist.features(x)
        zg, zd = generalist.head(h).double(), (h @ w.T + b)[:, -1].double()
    others = zg[:, [0, 2, 3, 5]]
    torch.testing.assert_close(zd, others.mean(1) + math.log(4), rtol=1e-5, atol=1e-5)
    lse = torch.logsumexp(others, dim=1)
    assert (zd <= lse + 1e-5).all()
    assert (lse - zd).max() > 1e-3  # not tight: the reason the kit keeps the full head


def test_specialist_checkpoint_round_trips_with_its_metadata(tmp_path, ds, generalist):
    cfg = SpecialistConfig(correction="odds", train=_train_config(epochs=1))
    sp = specialists.train_specialist(ds, GROUP, config=cfg, generalist=generalist)
    specialists.save_specialist(tmp_path / "s.pt", sp, ds=ds, group="g")
    back = specialists.load_specialist(tmp_path / "s.pt", ds=ds)
    assert back.special_fraction == sp.special_fraction and back.initialised_from == "generalist"
    assert back.correction == "odds" and back.dustbin_shift == sp.dustbin_shift
    x = data.to_float(ds.x_test[:8])
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), sp.model(x))


def test_a_checkpoint_written_before_the_rename_still_loads_and_one_without_a_shift_is_refused(
    tmp_path, ds, generalist
):
    from specialkit import checkpoints

    sp = specialists.train_specialist(
        ds, GROUP, config=SpecialistConfig(correction="odds", train=_train_config(epochs=1)), generalist=generalist
    )
    sp.dustbin_shift = 0.75  # a value no correction computes here, so reading the wrong key would show
    old = {k: v for k, v in sp.extra().items() if k != "dustbin_shift"}

    def write(path, extra):
        checkpoints.save_checkpoint(
            path,
            sp.model,
            model_config=sp.model_config,
            class_names=ds.class_names,
            dataset_fingerprint=ds.fingerprint,
            history=sp.history,
            extra={"stage": "specialist", "group": "g", **extra},
        )

    write(tmp_path / "old.pt", {**old, "dustbin_correction": 0.75})
    back = specialists.load_specialist(tmp_path / "old.pt", ds=ds)
    assert back.dustbin_shift == 0.75 and back.correction == "odds"
    specialists.save_specialist(tmp_path / "new.pt", sp, ds=ds, group="g")
    assert checkpoints.load_checkpoint(tmp_path / "new.pt")[1].extra["dustbin_shift"] == 0.75
    assert "dustbin_correction" not in checkpoints.load_checkpoint(tmp_path / "new.pt")[1].extra
    write(tmp_path / "none.pt", old)
    with pytest.raises(
        checkpoints.CheckpointError, match=r"none.pt has incomplete metadata \(no dustbin_shift\): delete"
    ):
        specialists.load_specialist(tmp_path / "none.pt", ds=ds)


def test_dustbin_head_is_exact_when_the_other_logits_are_equal():
    w = torch.zeros(5, 3)
    b = torch.tensor([1.0, 0.5, 0.5, 2.0, 0.5])
    w2, b2 = specialists.dustbin_head(w, b, [0, 3])
    assert b2[-1].item() == pytest.approx(0.5 + math.log(3))  # = logsumexp of three logits 0.5
    with pytest.raises(SpecialistError, match="covers every class"):
        specialists.dustbin_head(w, b, np.arange(5))


# ---------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_train_specialist_loss_falls_and_records_what_it_did(ds, generalist):
    cfg = SpecialistConfig(correction="odds", train=_train_config())
    sp = specialists.train_specialist(ds, GROUP, config=cfg, generalist=generalist)
    loss = [r.train_loss for r in sp.history]
    assert loss[-1] < 0.7 * loss[0]
    assert sp.initialised_from == "generalist" and sp.model.num_outputs == 3
    assert sp.class_names == ("e", "b")
    n_special = int(np.isin(ds.y_train.numpy(), GROUP).sum())
    assert sp.examples_seen == 5 * 2 * n_special == sp.history.examples_seen
    assert sp.dustbin_shift == pytest.approx(math.log((0.5 / 0.5) / ((2 / 6) / (4 / 6))))
    assert sp.extra()["classes"] == [4, 1] and sp.model_config.num_classes == 3
    assert generalist.num_outputs == C


@pytest.mark.slow
def test_train_specialist_with_soft_targets_from_the_generalist(ds, generalist):
    cfg = SpecialistConfig(soft_weight=0.5, temperature=2.0, train=_train_config(augment=True, crop_padding=1))
    sp = specialists.train_specialist(ds, GROUP, config=cfg, generalist=generalist)
    loss = [r.train_loss for r in sp.history]
    assert loss[-1] < 0.8 * loss[0]
    sp2 = specialists.train_specialist(ds, GROUP, config=cfg, generalist=generalist)  # deterministic
    torch.testing.assert_close(sp2.model.head.linear.weight, sp.model.head.linear.weight)


def test_specialist_teacher_collapses_the_generalist_on_the_batch_it_is_given(generalist):
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    teach = specialists.specialist_teacher(generalist, GROUP, temperature=2.0)
    with torch.no_grad():
        got = teach(x).double().numpy()
        v = generalist(x).double().numpy()
    expected = specialists.collapse_soft_targets(
        torch.softmax(torch.from_numpy(v) / 2.0, 1).numpy(), GROUP, temperature=2.0
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_smaller_specialist_is_built_from_scratch(ds, generalist):
    cfg = SpecialistConfig(width=2, train=_train_config(epochs=2))
    sp = specialists.train_specialist(ds, GROUP, config=cfg, generalist=generalist)
    assert sp.initialised_from == "scratch"
    assert sp.model_config.width == 2 and sp.model_config.num_classes == 3
    assert models.count_parameters(sp.model) < models.count_parameters(generalist)
    with pytest.raises(SpecialistError, match="same architecture"):
        specialists.train_specialist(
            ds, GROUP, config=SpecialistConfig(width=2, init="generalist"), generalist=generalist
        )


def test_prior_match_is_fitted_on_validation_images(ds, generalist):
    """Defect 2: prior_match was fitted on the specialist's own training images."""
    cfg = SpecialistConfig(correction="prior_match", train=_train_config(epochs=2))
    sp = specialists.train_specialist(ds, GROUP, config=cfg, generalist=generalist)
    p = specialists.predict_specialist(sp.model, ds.x_val, shift=sp.dustbin_shift, device="cpu")
    val_share = float((~np.isin(ds.y_val.numpy(), GROUP)).mean())
    assert p[:, -1].mean() == pytest.approx(val_share, abs=1e-4)
    z_train = training.predict_logits(sp.model, ds.x_train, device="cpu")
    on_train = specialists.prior_matched_correction(z_train, 1 - specialists.natural_special_share(ds.y_train, GROUP))
    assert abs(on_train - sp.dustbin_shift) > 1e-3  # fitted on other images than before
    none = specialists.train_specialist(
        ds, GROUP, config=SpecialistConfig(correction="none", train=_train_config(epochs=1)), generalist=generalist
    )
    assert none.dustbin_shift == 0.0


def test_the_default_correction_is_prior_match_the_one_measured_best_on_validation():
    from specialkit.config import PipelineConfig

    assert SpecialistConfig().correction == PipelineConfig().dustbin_correction == "prior_match"


def test_corrections_are_named_for_what_they_are(ds):
    """Defect 3: 'paper' computed the Bayes odds correction, not the paper's literal log(f/pi)."""
    y = ds.y_train
    pi = float(np.isin(y.numpy(), GROUP).mean())
    odds = specialists.correction_value("odds", y_train=y, classes=GROUP, special_fraction=0.5)
    literal = specialists.correction_value("paper_literal", y_train=y, classes=GROUP, special_fraction=0.5)
    assert odds == pytest.approx(math.log((0.5 / 0.5) / (pi / (1 - pi))))
    assert literal == pytest.approx(math.log(0.5 / pi))
    assert odds - literal == pytest.approx(math.log((1 - pi) / 0.5))
    with pytest.raises(SpecialistError, match="odds"):
        SpecialistConfig(correction="paper")
    from specialkit.config import ConfigError, PipelineConfig

    with pytest.raises(ConfigError, match="renamed"):
        PipelineConfig(dustbin_correction="paper")


def test_predict_specialist_adds_the_correction_to_the_dustbin_logit(ds, generalist):
    spec = specialists.init_from_generalist(generalist, GROUP).eval()
    x = ds.x_test[:10]
    with torch.no_grad():
        z = spec(data.to_float(x)).double()
    z[:, -1] += 1.3
    expected = torch.softmax(z, dim=1).numpy()
    got = specialists.predict_specialist(spec, x, shift=1.3, device="cpu")
    assert got.shape == (10, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    uncorrected = specialists.predict_specialist(spec, x, shift=0.0, device="cpu")
    assert (got[:, -1] > uncorrected[:, -1]).all()


def test_config_validation_names_the_fix():
    with pytest.raises(SpecialistError, match="strictly between 0 and 1"):
        SpecialistConfig(special_fraction=0.0)
    with pytest.raises(SpecialistError, match="use one of auto, generalist, scratch, distill"):
        SpecialistConfig(init="random")
    cfg = SpecialistConfig(soft_weight=0.3, temperature=3.0)
    assert (cfg.train_config().soft_weight, cfg.train_config().temperature) == (0.3, 3.0)


def test_specialist_examples_seen_sums():
    a = specialists.TrainedSpecialist(None, np.array([0]), ("a",), 0.0, [], 120)
    b = specialists.TrainedSpecialist(None, np.array([1]), ("b",), 0.0, [], 80)
    assert specialists.specialist_examples_seen([a, b]) == 200
