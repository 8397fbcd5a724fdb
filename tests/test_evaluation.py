import math
import time

import numpy as np
import pytest
import torch

from specialkit import ensemble, evaluation, models
from specialkit.evaluation import EvaluationError


def _onehot(pred, c):
    p = np.full((len(pred), c), 0.01)
    p[np.arange(len(pred)), pred] = 1.0
    return p / p.sum(1, keepdims=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_case():
    rng = np.random.default_rng(0)
    n, c = 400, 12
    y = rng.integers(0, c, n)
    p_gen = rng.dirichlet(np.ones(c), size=n)
    p_gen[np.arange(n), y] += rng.random(n) * 0.5  # better than chance
    p_gen /= p_gen.sum(1, keepdims=True)
    q = p_gen + rng.normal(0, 0.05, p_gen.shape).clip(-p_gen, None)
    q /= q.sum(1, keepdims=True)
    coverage = rng.integers(0, 5, c)
    coverage[0] = 0
    return p_gen, q, y, coverage


# ------------------------------------------------------------------------------------------ accuracy


def test_top1_accepts_probabilities_or_predictions():
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
    y = np.array([0, 0, 1])
    assert evaluation.top1(p, y) == pytest.approx(2 / 3)
    assert evaluation.top1(np.array([0, 1, 1]), y) == pytest.approx(2 / 3)
    assert evaluation.top1(torch.tensor(p), torch.tensor(y)) == pytest.approx(2 / 3)
    with pytest.raises(EvaluationError, match="predictions for"):
        evaluation.top1(p, y[:2])


def test_conditional_accuracy_only_counts_covered_examples_and_restricts_the_argmax():
    p = np.array(
        [
            [0.1, 0.3, 0.6],  # y=1: global argmax 2 is wrong, restricted to {0,1} -> 1 correct
            [0.5, 0.2, 0.3],  # y=0: correct
            [0.4, 0.5, 0.1],  # y=0: wrong
            [0.9, 0.05, 0.05],  # y=2: not covered -> ignored
        ]
    )
    y = np.array([1, 0, 0, 2])
    assert evaluation.conditional_accuracy(p, y, [0, 1]) == pytest.approx(2 / 3)
    assert evaluation.conditional_accuracy(p, y, np.array([True, True, False])) == pytest.approx(2 / 3)
    assert evaluation.top1(p, y) == pytest.approx(1 / 4)
    assert math.isnan(evaluation.conditional_accuracy(p[:1], np.array([2]), [0, 1]))
    with pytest.raises(EvaluationError, match="empty"):
        evaluation.conditional_accuracy(p, y, [])


def test_coverage_breakdown_rows_add_up_to_the_totals(random_case):
    p_gen, q, y, coverage = random_case
    df = evaluation.coverage_breakdown(p_gen, q, y, coverage)
    gen_correct = int((p_gen.argmax(1) == y).sum())
    ens_correct = int((q.argmax(1) == y).sum())
    assert df["n_examples"].sum() == len(y)
    assert df["n_classes"].sum() == len(coverage)
    assert df["gen_correct"].sum() == gen_correct and df["ens_correct"].sum() == ens_correct
    assert df["delta_correct"].sum() == ens_correct - gen_correct
    assert list(df.index) == [str(k) for k in sorted(set(coverage))]
    row = df.loc["2"]
    sel = coverage[y] == 2
    assert row["n_examples"] == sel.sum()
    assert row["relative_gain"] == pytest.approx(row["delta_correct"] / row["gen_correct"])
    assert row["gen_acc"] == pytest.approx((p_gen.argmax(1) == y)[sel].mean())


def test_coverage_breakdown_tail_bucket_total_row_and_nan_gain():
    y = np.array([0, 1, 2, 3, 3])
    p_gen = _onehot(np.array([1, 1, 2, 3, 0]), 4)  # class 0 never right under the generalist
    q = _onehot(np.array([0, 1, 2, 3, 3]), 4)
    coverage = np.array([0, 1, 3, 5])
    df = evaluation.coverage_breakdown(p_gen, q, y, coverage, tail=3, add_total=True)
    assert list(df.index) == ["0", "1", "3+", "total"]
    assert df.loc["3+", "n_examples"] == 3 and df.loc["3+", "n_classes"] == 2
    assert df.loc["3+", "delta_correct"] == 1 and df.loc["3+", "relative_gain"] == pytest.approx(0.5)
    assert math.isnan(df.loc["0", "relative_gain"])  # generalist 0 correct: NaN, not a division error
    assert (
        df.loc["total", ["n_examples", "gen_correct", "ens_correct", "delta_correct"]]
        == df.drop(index="total")[["n_examples", "gen_correct", "ens_correct", "delta_correct"]].sum()
    ).all()
    with pytest.raises(EvaluationError, match="coverage must be"):
        evaluation.coverage_breakdown(p_gen, q, y, coverage[:3])


def test_per_class_change_hand_case():
    y = np.array([0, 0, 1, 1, 2])
    gen = np.array([0, 1, 1, 1, 0])
    ens = np.array([0, 0, 1, 0, 0])
    df = evaluation.per_class_change(gen, ens, y, 4, class_names=list("abcd"))
    assert df["n"].tolist() == [2, 2, 1, 0]
    assert df.loc[0, "gen_acc"] == 0.5 and df.loc[0, "ens_acc"] == 1.0 and df.loc[0, "delta"] == 0.5
    assert df.loc[1, "delta"] == -0.5
    assert math.isnan(df.loc[3, "gen_acc"]) and df.loc[2, "name"] == "c"


def test_fixed_and_broken_hand_case():
    y = np.array([0, 1, 2, 0, 1])
    gen = _onehot(np.array([0, 0, 2, 1, 1]), 3)
    ens = _onehot(np.array([0, 1, 1, 0, 1]), 3)
    fixed, broken = evaluation.fixed_and_broken(gen, ens, y)
    assert fixed.tolist() == [1, 3] and broken.tolist() == [2]


def test_comparison_table_relative_to_the_baseline(random_case):
    p_gen, q, y, coverage = random_case
    df = evaluation.comparison_table({"generalist": p_gen, "kl": q}, y, covered_classes=coverage > 0)
    assert df.loc["generalist", "relative_change"] == 0.0
    g, e = evaluation.top1(p_gen, y), evaluation.top1(q, y)
    assert df.loc["kl", "relative_change"] == pytest.approx((e - g) / g)
    assert df.loc["kl", "conditional_acc"] == pytest.approx(evaluation.conditional_accuracy(q, y, coverage > 0))
    with pytest.raises(EvaluationError, match="baseline 'gen'"):
        evaluation.comparison_table({"generalist": p_gen}, y, baseline="gen")


# ------------------------------------------------------------------------------------------ cost


def test_ensemble_cost_hand_case():
    gen = {"params": 1000, "flops": 100}
    specs = [{"params": 100, "flops": 10}, {"params": 200, "flops": 20}]
    active = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=bool)
    c = evaluation.ensemble_cost(gen, specs, active)
    assert c["all_flops"] == 130 and c["all_ratio"] == pytest.approx(1.3)
    assert c["conditional_flops"] == pytest.approx(100 + (10 + 30 + 0 + 20) / 4)
    assert c["conditional_ratio"] == pytest.approx(1.15)
    assert c["mean_active"] == 1.0
    assert c["ensemble_params"] == 1300 and c["params_ratio"] == pytest.approx(1.3)
    with pytest.raises(EvaluationError, match="active must be"):
        evaluation.ensemble_cost(gen, specs, active[:, :1])


def _tiny(k: int, width: int = 4) -> models.Classifier:
    torch.manual_seed(k)
    return models.build_model(
        models.ModelConfig(num_classes=k, in_channels=1, image_size=8, width=width, depth=2, blocks_per_stage=1)
    ).eval()


def test_model_cost_uses_the_models_counters():
    m = _tiny(5)
    c = evaluation.model_cost(m, (1, 8, 8))
    assert c["params"] == models.count_parameters(m)
    assert c["flops"] == models.count_flops(m, (1, 1, 8, 8)) > 0
    assert evaluation.model_cost(_tiny(5, width=2), (1, 1, 8, 8))["flops"] < c["flops"]


def test_measure_latency_times_every_batch_and_returns_seconds_per_image():
    calls = []

    def fn(b):
        calls.append(len(b))
        time.sleep(0.002)

    x = torch.zeros(10, 1)
    t = evaluation.measure_latency(fn, x, batch_size=4, repeats=3, warmup=1)
    assert calls == [4, 4, 2] * 4
    assert 0.002 * 3 / 10 <= t < 0.05
    assert not torch.is_inference_mode_enabled()


def test_measure_latencies_interleaves_the_callables_round_by_round():
    order = []

    def slow(b):
        order.append("slow")
        time.sleep(0.004)

    def fast(b):
        order.append("fast")

    x = torch.zeros(6, 1)
    t = evaluation.measure_latencies({"slow": slow, "fast": fast}, x, batch_size=6, rounds=3, warmup=1)
    assert order == ["slow", "fast"] * 4  # one pass of each per round, in turn
    assert set(t) == {"slow", "fast"} and 0.004 / 6 <= t["slow"] and t["fast"] < t["slow"]
    with pytest.raises(evaluation.EvaluationError, match="rounds >= 1"):
        evaluation.measure_latencies({"fast": fast}, x, batch_size=1, rounds=0)
    rounds = evaluation.measure_latency_rounds({"slow": slow, "fast": fast}, x, batch_size=3, rounds=4, warmup=0)
    assert {k: v.shape for k, v in rounds.items()} == {"slow": (4,), "fast": (4,)}
    assert (rounds["slow"] >= 0.004 / 3).all() and (rounds["fast"] < rounds["slow"]).all()


def test_latency_table_conditional_runs_specialists_only_where_active():
    gen = _tiny(6)
    specs = [_tiny(3), _tiny(4)]
    x = torch.randint(0, 255, (12, 1, 8, 8), dtype=torch.uint8)
    active = np.zeros((12, 2), dtype=bool)
    active[:4, 0] = True
    active[4:6, 1] = True
    seen = []

    def combine(p_gen, outs, act):
        assert p_gen.shape[1] == 6 and [o.shape[1] for o in outs] == [3, 4]
        finite = np.stack([np.isfinite(o).all(1) for o in outs], 1)
        seen.append("all" if finite.all() else bool((finite == act).all()))
        return p_gen

    df = evaluation.latency_table(
        gen, specs, x, active, batch_sizes=(1, 5), rules={"test": combine}, repeats=1, warmup=0
    )
    assert list(df["model"][:3]) == ["generalist", "test all", "test conditional"]
    assert (df[df["model"] == "generalist"]["ratio"] == 1.0).all()
    assert (df["seconds_per_image"] > 0).all()
    assert df[df["model"] == "test conditional"]["mean_active"].tolist() == [0.5, 0.5]
    # "all" passes every row; conditional passes exactly the active rows (the others NaN)
    assert seen.count("all") >= 12 + 3 and all(s in ("all", True) for s in seen) and True in seen


def test_latency_table_with_the_ensemble_rules_and_their_own_routing():
    gen, specs = _tiny(6), [_tiny(3), _tiny(4)]
    groups = [np.array([0, 1]), np.array([2, 3, 4])]
    x = torch.randint(0, 255, (8, 1, 8, 8), dtype=torch.uint8)

    def kl(p, outs, act):
        return ensemble.combine_kl(p, [ensemble.SpecialistOutputs(g, o) for g, o in zip(groups, outs)], act)

    def moe(p, outs, act):
        return ensemble.combine_moe(p, [ensemble.SpecialistOutputs(g, o) for g, o in zip(groups, outs)], threshold=0.4)

    def moe_run(p):
        return ensemble.moe_gates(p, groups, threshold=0.4).run

    df = evaluation.latency_table(
        gen,
        specs,
        x,
        lambda p: ensemble.activation(p, groups),
        batch_sizes=(4,),
        rules={"kl": kl, "moe": (moe, moe_run)},
        repeats=1,
        warmup=0,
    )
    assert df["model"].tolist() == ["generalist", "kl all", "kl conditional", "moe all", "moe conditional"]
    assert np.isfinite(df["ratio"]).all()
    with torch.no_grad():
        p_gen = torch.softmax(gen(x.float() / 255), 1).numpy()
    kl_active = df.set_index("model").loc["kl conditional", "mean_active"]
    assert kl_active == pytest.approx(ensemble.activation(p_gen, groups).sum(1).mean(), abs=1e-6)
    assert df.set_index("model").loc["moe conditional", "mean_active"] == pytest.approx(moe_run(p_gen).sum(1).mean())


def test_latency_table_adds_the_rule_time_and_routes_with_given_probabilities():
    gen, specs = _tiny(6), [_tiny(3), _tiny(4)]
    x = torch.randint(0, 255, (6, 1, 8, 8), dtype=torch.uint8)
    route = np.random.default_rng(0).dirichlet(np.ones(6), size=6)
    seen = []

    def activate(p):
        seen.append(p)
        return p[:, :2] > 0.1

    def slow_rule(p, outs, act):
        time.sleep(0.003)

    df = evaluation.latency_table(
        gen, specs, x, activate, batch_sizes=(3,), rules={"slow": slow_rule}, repeats=1, warmup=0, routing_probs=route
    )
    row = df.set_index("model").loc["slow conditional"]
    assert row["combine_seconds_per_image"] >= 0.003 / 3
    assert row["seconds_per_image"] >= row["combine_seconds_per_image"]
    assert row["mean_active"] == pytest.approx((route[:, :2] > 0.1).sum(1).mean())
    assert all(any(np.array_equal(r, route[i]) for i in range(6)) for p in seen for r in p)


def test_compute_matched_epochs():
    assert evaluation.compute_matched_epochs([100, 100, 100], 150) == pytest.approx(2.0)
    assert evaluation.compute_matched_epochs(75, 150) == pytest.approx(0.5)
    with pytest.raises(EvaluationError, match="n_train"):
        evaluation.compute_matched_epochs(10, 0)


def test_nll_and_ece_on_cases_worked_by_hand():
    from specialkit import evaluation as ev

    y = np.array([0, 1, 2, 0])
    sure = np.eye(3)[y]
    assert ev.nll(sure, y) == pytest.approx(0.0, abs=1e-9) and ev.ece(sure, y) == 0.0
    flat = np.full((4, 3), 1 / 3)  # right 2 of 4 times (argmax 0), always 1/3 sure: |0.5 - 1/3|
    assert ev.nll(flat, y) == pytest.approx(np.log(3)) and ev.ece(flat, y) == pytest.approx(0.5 - 1 / 3)
    p = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.2, 0.6], [0.95, 0.05, 0.0]])
    # bins of width 1/15: 0.9 -> bin 13 (right), 0.95 -> 14 (right), 0.6 -> 9 twice (one right): per bin
    # |correct - summed confidence|, over N
    expected = (abs(1 - 0.9) + abs((0 + 1) - (0.6 + 0.6)) + abs(1 - 0.95)) / 4
    assert ev.ece(p, y) == pytest.approx(expected)
    assert ev.ece(p, y, bins=1) == pytest.approx(abs(3 / 4 - (0.9 + 0.6 + 0.6 + 0.95) / 4))
    with pytest.raises(ev.EvaluationError, match="N = len"):
        ev.nll(p[:2], y)
