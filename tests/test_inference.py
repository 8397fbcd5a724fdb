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


LAYOUT_PAIRS = [
    ("nchw", None),
    ("channels_last", None),
    ("blocked", None),
    ("blocked", "nchw"),
    ("nchw", "channels_last"),
]


@pytest.mark.parametrize("kind", ["dense", "delta"])
@pytest.mark.parametrize("batch", [1, 17])
@pytest.mark.parametrize(("layout", "own_layout"), LAYOUT_PAIRS)
def test_it_gives_the_outputs_of_the_networks_as_trained(one_thread, nets, kind, batch, layout, own_layout):
    g, dense, delta = nets
    specs = dense if kind == "dense" else delta
    shifts = [0.3, -0.7, 1.1]
    fast = inference.RoutedEnsemble(
        g, specs, GROUPS, dustbin_shifts=shifts, layout=layout, specialist_layout=own_layout
    )
    # a delta on the generalist's first later layer reuses its output, where both are strided tensors
    assert fast.reuses == (kind == "delta" and "blocked" not in (layout, own_layout))
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


def test_a_prepared_classifier_gives_the_models_logits_and_leaves_it_unchanged(one_thread, nets):
    g = nets[0]
    before = {k: v.clone() for k, v in g.state_dict().items()}
    prepared = inference.PreparedClassifier(g)
    assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in prepared.layers)  # every one folded
    x = torch.rand(9, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), g(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in before.items())
    assert not g.training


@pytest.mark.parametrize("layout", inference.LAYOUTS)
def test_a_prepared_classifier_gives_the_same_logits_in_every_layout(one_thread, nets, layout):
    g = nets[0]
    prepared = inference.PreparedClassifier(g, layout=layout)
    x = torch.rand(9, 1, 16, 16)
    with torch.no_grad():
        got = prepared(x)
        torch.testing.assert_close(got, g(x), rtol=1e-4, atol=1e-5)
    assert not got.is_mkldnn and prepared.layout == layout
    if layout == "channels_last":  # the model's own layers stay as they were
        assert all(p.is_contiguous() for p in g.parameters())


def test_layouts_are_checked_by_name(one_thread, nets):
    g, dense, _ = nets
    with pytest.raises(inference.InferenceError, match="layout must be one of nchw, channels_last, blocked"):
        inference.PreparedClassifier(g, layout="nhwc")
    with pytest.raises(inference.InferenceError, match="layout must be one of"):
        inference.RoutedEnsemble(g, dense, GROUPS, specialist_layout="NCHW")
    with pytest.raises(inference.InferenceError, match="fuse runs the specialists in layout 'nchw'"):
        inference.RoutedEnsemble(g, dense, GROUPS, fuse=True, layout="blocked")
    with pytest.raises(inference.InferenceError, match="runs on a CPU with oneDNN only, not on meta"):
        inference.check_layout("blocked", "meta")
    inference.RoutedEnsemble(g, dense, GROUPS, fuse=True, layout="blocked", specialist_layout="nchw")
    with pytest.raises(inference.InferenceError, match="a BatchNorm2d layer cannot run in layout 'blocked'"):
        inference.layout_steps([torch.nn.BatchNorm2d(3)], "blocked")
    with pytest.raises(inference.InferenceError, match="numeric zero padding"):
        inference.layout_steps([torch.nn.Conv2d(3, 3, 3, padding="same")], "blocked")
    with pytest.raises(inference.InferenceError, match="float32 networks only, not torch.float64"):
        inference.layout_steps([torch.nn.Conv2d(3, 3, 3).double()], "blocked")
    for layer in (torch.nn.AdaptiveMaxPool2d(1), torch.nn.AdaptiveAvgPool2d(3)):  # oneDNN's tensors refuse these
        with pytest.raises(inference.InferenceError, match=f"a {type(layer).__name__} layer cannot run in layout"):
            inference.layout_steps([layer], "blocked")
    flat = torch.rand(2, 5)
    assert inference.to_layout(flat, "channels_last") is flat  # not an image batch: left as it is
    image = torch.rand(2, 3, 4, 4)
    back = inference.to_layout(inference.to_layout(image, "blocked"), "nchw")  # any layout in, strided out
    assert not back.is_mkldnn and torch.equal(back, image)
    last = inference.to_layout(image, "channels_last")
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    assert inference.to_layout(last, "nchw").is_contiguous()  # NCHW networks get NCHW rows


def test_a_batch_norm_that_follows_no_convolution_is_kept():
    bn = torch.nn.BatchNorm2d(3).eval()
    layers = inference.prepared_layers([torch.nn.Sequential(torch.nn.ReLU(), bn), torch.nn.Conv2d(3, 3, 1)])
    assert layers[1] is bn and len(layers) == 3


OVERLAPPING = [np.array([1, 5, 9]), np.array([5, 9, 2]), np.array([9, 7, 11, 13])]  # class 9 in all three


@pytest.fixture(scope="module")
def overlapping():
    g = _generalist()
    trunk = g.trunk(1)
    specs = [
        _trained_like(models.low_rank_delta(models.share_trunk(specialists.init_from_generalist(g, c), trunk), g, 2))
        for c in OVERLAPPING
    ]
    return g, specs


def test_the_specialists_of_one_image_in_one_grouped_call_give_their_own_outputs(one_thread, overlapping):
    g, specs = overlapping
    fast = [inference.FastSpecialist(s, None, dustbin_shift=0.2 * m) for m, s in enumerate(specs)]
    small = specialists.collapse_head(specs[1], torch.rand(64, 1, 16, 16))  # |S|+1 rows: a shorter head, padded
    fast[1] = inference.FastSpecialist(small, None, dustbin_shift=0.0)
    h = g.trunk(1)(torch.rand(5, 1, 16, 16))
    fused = inference.FusedSpecialists(fast)
    assert fused.layers[0].groups == 1 and all(c.groups == 3 for c in fused.layers[1:] if hasattr(c, "groups"))
    with torch.no_grad():
        for got, one in zip(fused(h), fast, strict=True):
            torch.testing.assert_close(got, one(h), rtol=1e-4, atol=1e-6)
    with pytest.raises(inference.InferenceError, match="two or more"):
        inference.FusedSpecialists(fast[:1])


@pytest.mark.parametrize("fuse", [True, False])
def test_overlapping_groups_at_batch_1_route_every_class_as_the_networks_as_trained(one_thread, overlapping, fuse):
    g, specs = overlapping
    fast = inference.RoutedEnsemble(g, specs, OVERLAPPING, fuse=fuse)
    assert (fast._fused_of_class[9] is not None) == fuse and fast._fused_of_class[7] is None
    member = evaluation.group_membership(OVERLAPPING, C, "cpu")
    merged = [models.merge_deltas(s) for s in specs]
    x = torch.rand(1, 1, 16, 16)
    for c in (9, 5, 7, 0):  # three, two, one and no specialists
        routing = torch.full((1, C), 0.1 / (C - 1))
        routing[0, c] = 0.9
        p_gen, outs, active = fast(x, routing_probs=routing)
        r_gen, r_outs, r_active = evaluation.routed_forward(g, merged, x, member, routing_probs=routing)
        torch.testing.assert_close(p_gen, r_gen, rtol=1e-4, atol=1e-6)
        assert torch.equal(active, r_active) and int(active.sum()) == sum(c in grp for grp in OVERLAPPING)
        for o, r in zip(outs, r_outs, strict=True):
            assert (o is None) == (r is None)
            if o is not None:
                torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-6)


def test_a_channel_the_generalists_batch_norm_zeroes_turns_the_reuse_off_and_keeps_the_outputs(one_thread):
    g = _generalist()
    later_bn = list(g.body)[g._split(1)][1]
    with torch.no_grad():
        later_bn.weight[0] = 0.0  # its output carries nothing of that channel: the specialist cannot start from it
    trunk = g.trunk(1)
    specs = [
        _trained_like(models.low_rank_delta(models.share_trunk(specialists.init_from_generalist(g, c), trunk), g, 2))
        for c in GROUPS
    ]
    fast = inference.RoutedEnsemble(g, specs, GROUPS)
    assert not fast.reuses
    x = torch.rand(7, 1, 16, 16)
    routing = torch.softmax(3 * torch.randn(7, C), dim=1)
    _, outs, _ = fast(x, routing_probs=routing)
    _, r_outs, _ = _reference(g, specs, x, [0.0] * 3, routing=routing)
    for o, r in zip(outs, r_outs, strict=True):
        if o is not None:
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_layers_that_cannot_be_fused_are_refused_by_name(overlapping):
    g, specs = overlapping
    fast = [inference.FastSpecialist(s, None, dustbin_shift=0.0) for s in specs[:2]]
    fast[0].layers[-1] = torch.nn.Linear(4, 4)
    with pytest.raises(inference.InferenceError, match="differ in type"):
        inference.FusedSpecialists(fast)
    fast[1].layers[-1] = torch.nn.Linear(4, 4)
    with pytest.raises(inference.InferenceError, match="a Linear layer cannot be fused"):
        inference.FusedSpecialists(fast)


def _bench(name: str):
    """The module ``bench/<name>.py`` (the benches are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_bench_compares_the_fastest_layout_of_each_side(one_thread, nets):
    """bench/inference_cost.py's layout section: every layout timed, the fastest of each side picked, their ratio
    timed again on other rounds, in blocks."""
    import argparse

    bench = _bench("inference_cost")
    g, _, delta = nets
    args = argparse.Namespace(
        batch_sizes=[1, 4], images_small=3, images_large=8, repeats=1, blocks=2, skip_confident=1.0, max_active=0
    )
    x = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    p_route = torch.softmax(3 * torch.randn(8, C), dim=1).numpy()
    got = bench.layout_ratios(args, g, delta, x, p_route, GROUPS)
    assert set(got) == {1, 4}
    for r in got.values():
        assert len(r["ms"]) == len(inference.LAYOUTS) + len(inference.LAYOUTS) ** 2
        assert r["best_generalist"] == min((k for k in r["ms"] if k.startswith("generalist")), key=r["ms"].get)
        assert r["best_ensemble"] == min((k for k in r["ms"] if k.startswith("ensemble")), key=r["ms"].get)
        for ratio in (r["ratio"], r["nchw"], r["bound"]):  # 2 blocks of 2 x repeats rounds, apart from the choice
            assert (ratio.rounds, ratio.blocks) == (4, 2) and ratio.lo <= ratio.ratio <= ratio.hi
        assert 0.0 < r["routed"] <= 1.0  # every image goes to a specialist (no skip): the bound runs one on them


def test_the_bench_sets_the_skip_from_a_route_share_only_for_a_run():
    """--route-share is a cost budget read from a finished run's validation images: refused without --run, or with
    an explicit --skip-confident, each in one line naming the fix."""
    bench = _bench("inference_cost")
    assert bench.parse_args(["--run", "somewhere", "--route-share", "0.2"]).route_share == 0.2
    for argv in (["--route-share", "0.2"], ["--run", "x", "--route-share", "0.2", "--skip-confident", "0.7"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_the_fused_kernels_bench_checks_every_path_against_separate_calls(one_thread):
    """bench/fused_kernels.py: grouped_mm on an im2col (and oneDNN's packed convolution) give each specialist's
    convolution on its own rows, as M separate calls do; every shape is timed and put over the separate calls."""
    bench = _bench("fused_kernels")
    torch.manual_seed(0)
    counts = [2, 3, 1]
    x = torch.randn(sum(counts), 4, 5, 5)
    convs = [torch.nn.Conv2d(4, 8, 3, padding=1).eval() for _ in counts]
    with torch.no_grad():
        fns = bench.paths(x, counts, convs)
        want = fns["separate"]()
        assert [len(w) for w in want] == counts
        for name in ("grouped_mm", "packed"):
            if name in fns:
                for got, ref in zip(fns[name](), want, strict=True):
                    torch.testing.assert_close(got.contiguous(), ref.contiguous(), rtol=1e-4, atol=1e-5)
    got = bench.main(["--rows", "2", "3", "--rounds", "2"])
    assert set(got) == set(bench.SHAPES)
    for ratios in got.values():
        assert ratios["separate"] == 1.0 and {"grouped_mm", "one_conv"} <= set(ratios)
        assert all(r > 0 for r in ratios.values())
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "4"])  # one specialist: nothing to fuse
