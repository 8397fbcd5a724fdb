"""Cost accounting (issue 20 part 4, issue 21 part 4): the training budgets add up to an independent count.

The budgets of :mod:`specialkit.cost` are checked against ``torch.utils.flop_counter.FlopCounterMode`` wrapped around
the real training loop (``training.fit``) of a tiny run, validation passes left out (they are counted by a nested
counter and subtracted: a nested counter's operations reach the outer one too, which the first test checks).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from specialkit import cost, models, pipeline, training
from specialkit.config import PipelineConfig

TOLERANCE = 0.01


def test_a_nested_counter_also_reaches_the_outer_one():
    a, b = torch.randn(4, 8), torch.randn(8, 8)
    with FlopCounterMode(display=False) as outer:
        _ = a @ b
        with FlopCounterMode(display=False) as inner:
            _ = a @ b
    assert outer.get_total_flops() == 2 * inner.get_total_flops() == 2 * 2 * 4 * 8 * 8


@pytest.fixture(scope="module")
def counted(tmp_path_factory, one_thread):
    """A tiny run (two specialists sharing the generalist's first stage and learning from its soft targets, the
    compute-matched generalist, the student and the student-matched generalist) whose every ``training.fit`` ran under
    a FLOP counter (the student's teacher runs inside it): stage -> FLOPs of training."""
    cfg = PipelineConfig.quick(
        per_class=6,
        epochs=1,
        specialist_epochs=2,
        student_epochs=1,
        k=2,
        width=4,
        depth=2,
        specialist_shared_stages=1,
        specialist_soft_weight=0.5,
        rules=("generalist", "kl"),
        latency=False,
        html_report=False,
    )
    run = pipeline.Run(tmp_path_factory.mktemp("cost") / "quick", cfg, log=lambda s: None)
    fit, evaluate = training.fit, training.evaluate
    spent: dict[str, float] = {}
    validation = [0.0]

    def counted_evaluate(*args, **kwargs):
        with FlopCounterMode(display=False) as inner:
            out = evaluate(*args, **kwargs)
        validation[0] += inner.get_total_flops()
        return out

    def counted_fit(*args, desc: str = "train", **kwargs):
        validation[0] = 0.0
        with FlopCounterMode(display=False) as counter:
            out = fit(*args, desc=desc, **kwargs)
        stage = "specialists" if desc.startswith("specialist") else desc
        spent[stage] = spent.get(stage, 0.0) + counter.get_total_flops() - validation[0]
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(training, "fit", counted_fit)
    mp.setattr(training, "evaluate", counted_evaluate)
    try:
        run.ensure("generalist", "clusters", "specialists", "compute_matched", "distill", "student_matched")
    finally:
        mp.undo()
    return run, spent


def test_the_specialists_budget_adds_up_to_the_flops_their_training_spent(counted):
    run, spent = counted
    budget = cost.compute_budget(run.view())
    assert spent["specialists"] > 0
    assert budget["specialist_train_flops"] == pytest.approx(spent["specialists"], rel=TOLERANCE)
    # the generalist's forward as teacher is part of it (soft targets on every pass): without it the sum falls short
    shape = (1, 1, 32, 32)
    teacher = models.count_flops(run.generalist().model, shape) * sum(s.examples_seen for s in run.specialists())
    assert budget["specialist_train_flops"] - teacher < spent["specialists"] * (1 - TOLERANCE)


def test_the_generalist_and_the_compute_matched_generalist_spend_what_their_budgets_say(counted):
    run, spent = counted
    gen, cm = run.generalist(), run.compute_matched()
    shape = (1, 1, 32, 32)
    assert cost.train_flops(gen.model, shape, gen.examples_seen) == pytest.approx(spent["generalist"], rel=TOLERANCE)
    budget = cost.compute_budget(run.view())
    assert cm.examples_seen == pytest.approx(
        budget["compute_matched_passes"], rel=TOLERANCE
    )  # whole epochs of equal size
    assert budget["compute_matched_train_flops"] == pytest.approx(spent["compute_matched"], rel=TOLERANCE)
    # and it buys what the specialists spent, to within one pass
    assert (
        abs(budget["compute_matched_train_flops"] - budget["specialist_train_flops"])
        <= budget["generalist_train_flops_per_pass"]
    )


def test_the_old_three_times_forward_rule_over_counts_a_shared_trunk():
    torch.manual_seed(0)
    gen = models.build_model(
        models.ModelConfig(name="cnn", num_classes=62, in_channels=1, image_size=32, width=16, depth=3)
    )
    shape = (1, 1, 32, 32)
    shared = models.share_trunk(copy.deepcopy(gen), copy.deepcopy(gen).trunk(2))
    total, trunk = models.count_flops(shared, shape), models.count_flops(shared.shared_trunk, shape)
    old = 3 * (total - trunk) + trunk
    new = cost.train_flops_per_example(shared, shape)
    assert old / new == pytest.approx(1.076, abs=0.002)  # the 7.6% of issue 20 on the demo's CNN
    assert cost.train_flops_per_example(gen, shape) < 3 * models.count_flops(
        gen, shape
    )  # no input gradient for the images


def test_measuring_a_training_pass_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    gen = models.build_model(
        models.ModelConfig(name="cnn", num_classes=5, in_channels=1, image_size=8, width=4, depth=1)
    )
    gen.eval()
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    cost.train_flops_per_example(gen, (1, 1, 8, 8))
    assert not gen.training and all(torch.equal(before[k], v) for k, v in gen.state_dict().items())
    assert all(p.grad is None for p in gen.parameters())


def test_the_students_budget_adds_up_to_what_it_and_its_teacher_spent(counted):
    run, spent = counted
    budget = cost.student_budget(run.view())
    student = run.distill()
    assert budget["student_passes"] == student.examples_seen > 0
    assert budget["teacher_forward_flops_per_pass"] > 0  # it learnt from soft targets
    own = budget["student_passes"] * (budget["student_train_flops_per_pass"] + budget["teacher_forward_flops_per_pass"])
    assert own == pytest.approx(spent["distill"], rel=TOLERANCE)
    assert budget["student_budget_flops"] == pytest.approx(spent["distill"] + spent["specialists"], rel=TOLERANCE)


def test_the_student_matched_generalist_spends_the_students_whole_budget(counted):
    run, spent = counted
    budget = cost.student_budget(run.view())
    sm = run.student_matched()
    assert sm.examples_seen == pytest.approx(budget["student_matched_passes"], rel=TOLERANCE)
    assert budget["student_matched_train_flops"] == pytest.approx(spent["student_matched"], rel=TOLERANCE)
    assert (
        abs(budget["student_matched_train_flops"] - budget["student_budget_flops"])
        <= budget["generalist_train_flops_per_pass"]
    )
    # it buys more than the compute-matched generalist: the student's passes and its teacher's come on top
    assert budget["student_matched_passes"] > cost.compute_budget(run.view())["compute_matched_passes"]


def test_recomputed_metrics_keep_the_latency_measured_of_the_same_networks_on_the_same_machine(tiny):
    """``metrics.measured_latency``: a run's earlier measurement is reused only under the same ``cost.latency_key``
    (networks, routing, machine, thread count); under any other key the ensemble is timed again."""
    from specialkit.metrics import measured_latency

    view = tiny.view()
    first, key = measured_latency(view)
    assert first and key == cost.latency_key(view)
    earlier = {"cost": {"latency": first, "latency_key": key}}
    assert measured_latency(view, earlier) == (first, key)  # the same records, not timed again
    stale = {"cost": {"latency": first, "latency_key": "another machine"}}
    again, key_now = measured_latency(view, stale)
    assert key_now == key and again != first  # timed again: other seconds
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert cost.latency_key(view) != key  # another thread count is another measurement
    finally:
        torch.set_num_threads(threads)
