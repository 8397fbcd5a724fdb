"""Issue 22 part 3: specialists stored as low-rank deltas on the generalist's later stages."""

import numpy as np
import pytest
import torch

from specialkit import models, specialists

C, CLASSES = 20, [1, 5, 9]


@pytest.fixture()
def nets(one_thread):
    torch.manual_seed(0)
    gen = models.build_model(
        models.ModelConfig(name="cnn", num_classes=C, in_channels=1, image_size=16, width=4, depth=3)
    ).eval()
    shared = models.share_trunk(specialists.init_from_generalist(gen, CLASSES), gen.trunk(2)).eval()
    delta = models.low_rank_delta(
        models.share_trunk(specialists.init_from_generalist(gen, CLASSES), gen.trunk(2)), gen, 2
    ).eval()
    return gen, shared, delta, torch.rand(8, 1, 16, 16)


def test_a_fresh_delta_specialist_computes_what_the_shared_specialist_computes(nets):
    _, shared, delta, x = nets
    with torch.no_grad():
        torch.testing.assert_close(delta(x), shared(x), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, models.LowRankDelta) for m in delta.modules()) == 2  # the last stage's two convs


def test_it_stores_the_deltas_batch_norms_and_head_only(nets):
    gen, shared, delta, _ = nets
    convs = [m for m in shared.body.modules() if isinstance(m, torch.nn.Conv2d)]
    dense = sum(c.weight.numel() for c in convs)
    low = sum(2 * (c.weight.shape[0] + c.weight[0].numel()) for c in convs)
    assert models.count_parameters(shared) - models.count_parameters(delta) == dense - low
    assert not any(n.endswith("_base") for n in delta.state_dict())


def test_training_moves_the_delta_and_never_the_generalist(nets):
    gen, _, delta, x = nets
    before = {n: p.clone() for n, p in gen.named_parameters()}
    delta.train()
    opt = torch.optim.SGD(delta.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        delta(x).logsumexp(1).mean().backward()
        opt.step()
    assert all(torch.equal(before[n], p) for n, p in gen.named_parameters())
    ups = [m.up for m in delta.modules() if isinstance(m, models.LowRankDelta)]
    assert any(u.abs().sum() > 0 for u in ups)  # the deltas moved off zero
    delta.eval()
    with torch.no_grad():
        layer = next(m for m in delta.modules() if isinstance(m, models.LowRankDelta))
        assert np.linalg.matrix_rank((layer.weight() - layer.base.weight).flatten(1).numpy()) <= 2


def test_refusals(nets):
    gen, shared, _, _ = nets
    with pytest.raises(models.ModelError, match="rank"):
        models.LowRankDelta(torch.nn.Conv2d(3, 4, 3), 0)
    with pytest.raises(models.ModelError, match="shared-trunk"):
        models.low_rank_delta(gen, gen, 2)


def test_its_head_collapses_and_the_generalists_layers_stay_shared(nets):
    _, _, delta, x = nets
    small = specialists.collapse_head(delta, torch.rand(64, 1, 16, 16))
    bases = [m.base for m in delta.modules() if isinstance(m, models.LowRankDelta)]
    assert [m.base for m in small.modules() if isinstance(m, models.LowRankDelta)] == bases
    with torch.no_grad():
        # a (N, S+1) head against the (N, C) one it was cut from: equal up to the kernel's summation order
        torch.testing.assert_close(small(x)[:, :-1], delta(x)[:, :-1], rtol=1e-6, atol=1e-5)


def test_the_specialist_config_takes_a_delta_rank_only_with_a_shared_trunk():
    assert specialists.SpecialistConfig().delta_rank == 0
    assert specialists.SpecialistConfig(shared_stages=2, delta_rank=4).delta_rank == 4
    with pytest.raises(specialists.SpecialistError, match="delta_rank"):
        specialists.SpecialistConfig(delta_rank=4)


def test_merged_deltas_give_the_same_outputs_with_dense_layers(nets):
    _, shared, delta, x = nets
    with torch.no_grad():
        for layer in (m for m in delta.modules() if isinstance(m, models.LowRankDelta)):
            layer.up.normal_()  # a trained-looking delta
        merged = models.merge_deltas(delta)
        torch.testing.assert_close(merged(x), delta(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, models.LowRankDelta) for m in merged.modules())
    assert models.count_parameters(merged) == models.count_parameters(shared)
    assert merged.shared_trunk is delta.shared_trunk
    assert any(isinstance(m, models.LowRankDelta) for m in delta.modules())  # the original is unchanged


def test_a_delta_checkpoint_stores_only_the_deltas_and_loads_only_on_its_generalist(nets, tmp_path):
    gen, _, delta, x = nets
    with torch.no_grad():
        for layer in (m for m in delta.modules() if isinstance(m, models.LowRankDelta)):
            layer.up.normal_()
    rebuilt = models.build_model(delta.config.to_dict())
    assert rebuilt.config.delta_rank == 2 and "delta_rank" in delta.config.to_dict()
    rebuilt.load_state_dict(delta.state_dict())  # strict: the same keys, no generalist weights among them
    rebuilt.attach(gen.trunk(2)).eval()
    with pytest.raises(models.ModelError, match="no generalist attached"):
        rebuilt(x)
    other = models.build_model(gen.config)
    wider = models.ModelConfig(name="cnn", num_classes=C, in_channels=1, image_size=16, width=8, depth=3)
    with pytest.raises(models.ModelError, match="shapes differ from the generalist"):
        models.attach_deltas(rebuilt, models.build_model(wider))
    models.attach_deltas(rebuilt, other)  # the same architecture: attaches, computes something else
    with torch.no_grad():
        assert not torch.allclose(rebuilt(x), delta(x))
        models.attach_deltas(rebuilt, gen)
        torch.testing.assert_close(rebuilt(x), delta(x), rtol=1e-5, atol=1e-5)
    assert "delta_rank" not in models.ModelConfig(num_classes=3).to_dict()  # dense configs are written as before


def test_a_run_with_delta_specialists_writes_delta_checkpoints_that_reload_to_the_same_outputs(one_thread, tmp_path):
    from specialkit import pipeline
    from specialkit.checkpoints import CheckpointError
    from specialkit.config import PipelineConfig

    cfg = PipelineConfig.preset("tiny", depth=2, compute_matched=False, rules=("generalist", "kl"))
    base = pipeline.Run(tmp_path / "r", cfg, log=lambda s: None)
    dense = base.with_settings(specialist_shared_stages=1)
    run = base.with_settings(specialist_shared_stages=1, specialist_delta_rank=2)
    assert run.key("generalist") == base.key("generalist") and run.key("specialists") != dense.key("specialists")
    sps = run.specialists()
    gen = run.generalist().model
    for i, sp in enumerate(sps):
        lows = [m for m in sp.model.modules() if isinstance(m, models.LowRankDelta)]
        assert lows and all(m.base_attached for m in lows)
        path = specialists.folder_of(run, i) / "model.pt"
        saved = torch.load(path, weights_only=True)["state_dict"]
        assert any(k.endswith(".down") for k in saved) and not any(
            ".weight" in k and "body" in k and saved[k].dim() == 4 for k in saved
        )
        again = specialists.load_specialist(path, ds=run.dataset(), generalist=gen)
        x = run.dataset().x_test[:16].float() / 255
        with torch.no_grad():
            torch.testing.assert_close(again.model(x), sp.model(x))
        with pytest.raises(CheckpointError, match="pass generalist="):
            specialists.load_specialist(path, ds=run.dataset(), trunk=gen.trunk(1))
    dense_params = sum(models.count_parameters(s.model) for s in dense.specialists())
    assert sum(models.count_parameters(s.model) for s in sps) < dense_params
    for probs in run.specialist_probs("test"):  # the ensembles read the reloaded specialists' saved outputs
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_sharing_every_stage_leaves_no_convolution_for_a_delta():
    torch.manual_seed(0)
    gen = models.build_model(
        models.ModelConfig(name="cnn", num_classes=C, in_channels=1, image_size=16, width=4, depth=2)
    )
    whole_shared = models.share_trunk(specialists.init_from_generalist(gen, CLASSES), gen.trunk(2))
    with pytest.raises(models.ModelError, match="no convolution after"):
        models.low_rank_delta(whole_shared, gen, 2)


def test_its_cost_counts_the_deltas_stored_and_the_dense_layers_run(nets):
    from specialkit import evaluation

    _, shared, delta, _ = nets
    c_delta, c_shared = evaluation.model_cost(delta, (1, 16, 16)), evaluation.model_cost(shared, (1, 16, 16))
    assert c_delta["flops"] == c_shared["flops"]  # merged for inference: the same convolutions
    assert c_delta["params"] == models.count_parameters(delta) < c_shared["params"]
