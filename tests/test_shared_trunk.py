"""Shared-trunk (cheap) specialists: stages, the trunk run once per batch, checkpoints, FLOP accounting (issue 12)."""

import numpy as np
import pytest
import torch
from test_specialists import _toy_dataset, _train_config

from specialkit import checkpoints, evaluation, metrics, models, specialists
from specialkit.specialists import SpecialistConfig

C = 6
GROUPS = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5, 1])]

pytestmark = pytest.mark.usefixtures("one_thread")


def _generalist(seed: int = 0, width: int = 4) -> models.Classifier:
    torch.manual_seed(seed)
    cfg = models.ModelConfig(
        name="cnn", num_classes=C, in_channels=1, image_size=8, width=width, depth=3, blocks_per_stage=1
    )
    m = models.build_model(cfg)
    m.train()
    with torch.no_grad():  # non-trivial BN statistics, so a trunk left in training mode would show
        m(torch.rand(16, 1, 8, 8))
    return m.eval()


@pytest.fixture(scope="module")
def ds():
    return _toy_dataset(per_class=12)


@pytest.fixture(scope="module")
def generalist():
    return _generalist()


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_trunk_then_later_stages_is_the_whole_model_for_every_split(name):
    torch.manual_seed(0)
    g = models.build_model(models.ModelConfig(name=name, num_classes=5, in_channels=1, width=4, depth=3)).eval()
    x = torch.rand(2, 1, 32, 32)
    assert g.num_stages == (3 if name == "cnn" else 4)
    with torch.no_grad():
        for s in range(1, 4) if name == "cnn" else (2, 4):
            torch.testing.assert_close(g.forward_from(g.trunk(s)(x), s), g(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(models.ModelError, match=f"has {g.num_stages} stages, so share 1..{g.num_stages}"):
        g.trunk(g.num_stages + 1)


def test_shared_trunk_runs_once_per_batch_and_each_active_specialist_once_on_its_rows(generalist):
    s = 2
    trunk = generalist.trunk(s)
    full = [specialists.init_from_generalist(generalist, c).eval() for c in GROUPS]
    shared = [models.share_trunk(specialists.init_from_generalist(generalist, c), trunk).eval() for c in GROUPS]
    calls, rows_seen = [], {m: [] for m in range(len(GROUPS))}
    trunk.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
    for m, sp in enumerate(shared):
        sp.body.register_forward_hook(lambda mod, inp, out, m=m: rows_seen[m].append(len(inp[0])))
    x = torch.rand(10, 1, 8, 8)
    act = np.zeros((10, 3), dtype=bool)
    act[[0, 3, 4], 0] = act[[1, 2, 3, 9], 1] = True  # specialist 2 is switched on by no image
    with torch.inference_mode():
        p_gen, outs, got = evaluation.ensemble_forward(generalist, shared, x, lambda p: act)
        p_ref, outs_ref, _ = evaluation.ensemble_forward(generalist, full, x, lambda p: act)
    assert calls == [10]  # one trunk pass for the generalist and all specialists together
    assert rows_seen == {0: [3], 1: [4], 2: []}
    np.testing.assert_allclose(p_gen, p_ref, rtol=1e-5, atol=1e-6)
    assert (got == act).all()
    for o, r, a in zip(outs, outs_ref, act.T):
        assert np.isnan(o[~a]).all()
        np.testing.assert_allclose(o[a], r[a], rtol=1e-5, atol=1e-6)
    with pytest.raises(evaluation.EvaluationError, match="share one trunk"):
        evaluation.ensemble_forward(generalist, [shared[0], full[1]], x)


def test_a_trained_shared_specialist_equals_a_full_one_with_the_same_frozen_weights_and_round_trips(
    ds, generalist, tmp_path
):
    before = models.fingerprint(generalist)
    cfg = SpecialistConfig(shared_stages=2, train=_train_config(epochs=1, augment=True), correction="odds")
    trained = specialists.train_specialist(ds, GROUPS[2], config=cfg, generalist=generalist)
    sp = trained.model
    assert isinstance(sp, models.SharedTrunkClassifier) and models.fingerprint(generalist) == before
    assert torch.equal(sp.shared_trunk.layers[0][0].weight, generalist.body[0][0].weight)  # frozen trunk, unchanged
    full = specialists.init_from_generalist(generalist, GROUPS[2]).eval()
    e = generalist.stage_ends()[1]
    assert not torch.equal(full.body[e][0].weight, sp.body[0][0].weight)  # the own stages did train
    torch.nn.Sequential(*full.body[e:]).load_state_dict(sp.body.state_dict())
    full.head.load_state_dict(sp.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sp(ds.x_test.float() / 255), full(ds.x_test.float() / 255), rtol=1e-5, atol=1e-5)

    path = specialists.save_specialist(tmp_path / "sp.pt", trained, ds=ds, group="g2")
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert set(stored) == set(sp.state_dict()) and sum(isinstance(m, torch.nn.Conv2d) for m in sp.modules()) == 1
    assert (
        sum(v.numel() for k, v in stored.items() if "running" not in k and "num_batches" not in k and "input_" not in k)
        == models.count_parameters(sp)
        < models.count_parameters(full)
    )
    loaded = specialists.load_specialist(path, ds=ds, trunk=generalist.trunk(2))
    np.testing.assert_allclose(
        loaded.predict(ds.x_test, device="cpu"), trained.predict(ds.x_test, device="cpu"), atol=1e-6
    )
    with pytest.raises(checkpoints.CheckpointError, match=r"pass trunk=generalist.trunk\(2\)"):
        specialists.load_specialist(path, ds=ds)
    with pytest.raises(
        checkpoints.CheckpointError, match=f"trained on the first 2 stages of generalist {before}.*retrain"
    ):
        specialists.load_specialist(path, ds=ds, trunk=_generalist(seed=1).trunk(2))


def test_flop_and_parameter_counts_add_up(generalist):
    shape = (1, 1, 8, 8)
    for s in (1, 2, 3):
        trunk = generalist.trunk(s)
        full = [specialists.init_from_generalist(generalist, c).eval() for c in GROUPS]
        shared = [models.share_trunk(specialists.init_from_generalist(generalist, c), trunk).eval() for c in GROUPS]
        t_flops, t_params = models.count_flops(trunk, shape), models.count_parameters(trunk)
        assert 0 < t_flops < models.count_flops(generalist, shape)
        for f, sh in zip(full, shared):
            cost = evaluation.model_cost(sh, shape)
            assert cost["flops"] + t_flops == models.count_flops(f, shape)
            assert cost["params"] + t_params == models.count_parameters(f)
        gen_cost = evaluation.model_cost(generalist, shape)
        act = np.eye(3, dtype=bool)[[0, 1, 2, 0]]
        ec = evaluation.ensemble_cost(gen_cost, [evaluation.model_cost(m, shape) for m in shared], act)
        own = [evaluation.model_cost(m, shape)["flops"] for m in shared]
        assert ec["all_flops"] == gen_cost["flops"] + sum(own)  # the trunk counted once, with the generalist
        assert ec["conditional_flops"] == pytest.approx(gen_cost["flops"] + (2 * own[0] + own[1] + own[2]) / 4)
        train = specialists.train_flops_per_example(shared[0], shape)
        # the frozen trunk runs forward only, and no input gradient flows into it (issue 20: the old 3 x rule counted one)
        assert t_flops + 2 * own[0] <= train < t_flops + 3 * own[0]


def test_smaller_specialists_start_from_scratch_or_from_a_distilled_copy_and_generalist_init_needs_the_same_network(
    ds, generalist
):
    tc = _train_config(epochs=1)
    with pytest.raises(specialists.SpecialistError, match="init='generalist' needs .* the same architecture"):
        specialists.train_specialist(
            ds, GROUPS[0], config=SpecialistConfig(width=2, init="generalist", train=tc), generalist=generalist
        )
    with pytest.raises(
        specialists.SpecialistError, match="shares the generalist's trunk, so the specialist must start"
    ):
        SpecialistConfig(shared_stages=1, init="distill")
    scratch = specialists.train_specialist(
        ds, GROUPS[0], config=SpecialistConfig(width=2, train=tc), generalist=generalist
    )
    distil = specialists.train_specialist(
        ds, GROUPS[0], config=SpecialistConfig(width=2, init="distill", train=tc), generalist=generalist
    )
    assert (scratch.initialised_from, distil.initialised_from) == ("scratch", "distill")
    assert scratch.model.config.width == distil.model.config.width == 2
    assert distil.examples_seen == scratch.examples_seen + len(ds.y_train)  # one distillation epoch over all the data
    assert isinstance(
        distil.model.head, models.DustbinHead
    )  # specialised from the distilled network, as from a generalist


def test_a_run_with_shared_stages_trains_specialists_on_one_trunk_and_keeps_the_generalist(tiny, tmp_path):
    import shutil

    from specialkit import pipeline

    shutil.copytree(tiny.folder, tmp_path / "r")
    base = pipeline.Run.open(tmp_path / "r", log=lambda s: None)
    gen_key, spec_key = base.key("generalist"), base.key("specialists")
    run = base.with_settings(specialist_shared_stages=1)
    assert run.key("generalist") == gen_key and run.key("specialists") != spec_key
    sps = run.specialists()
    trunk = run.shared_trunk()
    assert all(isinstance(s.model, models.SharedTrunkClassifier) and s.model.shared_trunk is trunk for s in sps)
    assert trunk.owner_fingerprint == models.fingerprint(run.generalist().model)
    full = models.count_parameters(run.generalist().model)
    assert all(models.count_parameters(s.model) < full - models.count_parameters(trunk) + 1 for s in sps)
    rows = metrics.cost_summary(run)
    by = {r["model"]: r for r in rows}
    assert by["ensemble, all specialists"]["params_stored"] == full + sum(models.count_parameters(s.model) for s in sps)
    assert by["ensemble, conditional"]["mflops_per_image"] <= by["ensemble, all specialists"]["mflops_per_image"]
    assert all(r["peak_activation_mb"] > 0 and r["weights_mb"] > 0 for r in rows)
    with pytest.raises(Exception, match="specialist_shared_stages > 0 shares the generalist's own trunk"):
        run.config.replace(specialist_width=2)


def test_frontier_budget_arithmetic_table_and_figure(tmp_path):
    from specialkit import frontier, plots, runs

    assert frontier.matched_epochs(30 * 100 * 6, 30, 100) == 6 and frontier.matched_epochs(1.0, 30, 100) == 1
    with pytest.raises(frontier.FrontierError, match="must be positive"):
        frontier.matched_epochs(0.0, 10, 100)
    summary = [
        {"model": m, "params_stored": p, "mflops_per_image": f, "ms_per_image_b1": None, "ms_per_image_b256": t}
        for m, p, f, t in (
            ("generalist", 10, 1.0, 0.1),
            ("ensemble, all specialists", 50, 3.0, 0.4),
            ("ensemble, conditional", 50, 1.5, 0.2),
            ("student", 10, 1.0, 0.1),
        )
    ]
    accuracies = (("generalist", 0.8), ("kl", 0.82), ("student", 0.81))
    comparison = [{"name": n, "top1": a, "top1_ci": [a - 0.01, a + 0.01]} for n, a in accuracies]
    metrics_ = {"cost": {"summary": summary}, "comparison": comparison}
    table, source = frontier.points_of(tmp_path, metrics_)
    assert "own models" in source and table["name"].tolist() == ["generalist", "kl (conditional)", "student"]
    assert table.set_index("name").loc["kl (conditional)", ["mflops", "params_stored"]].tolist() == [1.5, 50]
    records = metrics.finite(table.assign(ms_b1=None).to_dict("records"))
    runs.atomic_write_json(tmp_path / frontier.FILE, {"points": records, "budget_flops": 1e9})
    saved, source = frontier.points_of(tmp_path, metrics_)
    assert (
        "bench/frontier.py" in source
        and saved["ms_b1"].isna().all()
        and saved["accuracy"].tolist() == table["accuracy"].tolist()
    )
    fig = plots.frontier(saved)
    panels = [t for t in fig.data if t.mode == "markers+text"]
    assert {t.xaxis for t in panels} == {"x", "x2"} and sum(len(t.x) for t in panels) == 2 * len(saved)
    assert any(t.name == "Pareto front" for t in fig.data)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    from specialkit import pipeline
    from specialkit.config import PipelineConfig

    cfg = PipelineConfig.preset(
        "tiny",
        depth=2,
        specialist_shared_stages=1,
        compute_matched=False,
        student_matched=False,
        rules=("generalist", "kl"),
    )
    run = pipeline.Run(tmp_path_factory.mktemp("shared") / "run", cfg, log=lambda s: None)
    run.specialists()
    return run


def test_the_accuracy_path_runs_the_trunk_once_per_split_and_gives_the_same_numbers(shared_run):
    from specialkit import runs, training

    run = shared_run
    for i, sp in enumerate(run.specialists()):
        for split in ("val", "test"):
            x, _ = run.dataset().split(split)
            alone = training.predict_logits(sp.model, x, device="cpu")  # the trunk again, for this specialist
            saved = runs.load_array(specialists.folder_of(run, i) / f"logits_{split}.npy")
            assert np.array_equal(saved, alone.numpy())  # bit for bit
    trunk_outputs = [k for k in run._memo if k.startswith("trunk-output-")]
    assert sorted(k.split("-")[2] for k in trunk_outputs) == ["test", "val"]  # once per split, not per specialist


def test_the_teacher_runs_a_shared_trunk_once_per_batch_and_teaches_the_same(shared_run):
    from specialkit import distill, ensemble

    run = shared_run
    gen, sps = run.generalist().model, run.specialists()
    teacher = distill.ensemble_teacher(gen, sps, temperature=2.0)
    trunk = run.shared_trunk()
    calls = []
    hook = trunk.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    x = run.dataset().x_test[:40].float() / 255
    try:
        got = teacher(x)
    finally:
        hook.remove()
    assert calls == [40]  # once, on the whole batch
    with torch.no_grad():  # the teacher as first built: every active specialist runs the trunk on its rows again
        p_gen = torch.softmax(gen(x).double(), dim=1).numpy()
        active = ensemble.activation(p_gen, [s.classes for s in sps])
        outs = []
        for m, sp in enumerate(sps):
            probs = np.full((len(x), len(sp.classes) + 1), 1.0 / (len(sp.classes) + 1))
            rows = np.flatnonzero(active[:, m])
            if len(rows):
                z = sp.model(x[torch.as_tensor(rows)]).double().numpy()
                probs[rows] = specialists.apply_dustbin_shift(z, sp.dustbin_shift)
            outs.append(ensemble.SpecialistOutputs(sp.classes, probs))
        want = distill.soften(ensemble.combine_kl(p_gen, outs, active), 2.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
