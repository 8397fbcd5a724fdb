"""Tests of specialkit.ensemble: activation, the KL combination (EM vs generic optimisers), the
two alternative routings, and conditional execution. Hand-made inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from specialkit import ensemble
from specialkit import ensemble as E
from specialkit.ensemble import EnsembleError, SpecialistOutputs


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Tiny problems: BLAS threads only slow them down (scipy's L-BFGS-B 25x on a busy 2-core box)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def random_batch() -> dict:
    """30 classes, 4 overlapping specialists, 25 images with a random non-empty activation."""
    rng = np.random.default_rng(1234)
    num_classes, n = 30, 25
    groups = [np.sort(rng.choice(num_classes, size=int(rng.integers(6, 13)), replace=False)) for _ in range(4)]
    p_gen = rng.dirichlet(np.full(num_classes, 0.7), size=n)
    specs = [SpecialistOutputs(g, rng.dirichlet(np.full(g.size + 1, 0.7), size=n)) for g in groups]
    active = rng.random((n, 4)) < 0.5
    active[~active.any(axis=1), 0] = True
    return {"p_gen": p_gen, "specs": specs, "active": active, "groups": groups}


def _reference_objective(z: torch.Tensor, g: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """Independent float64 objective on logits: KL(g||q) + sum KL(p||collapse(q)), with loops."""
    log_q = torch.log_softmax(z, dim=0)
    q = torch.exp(log_q)
    gt = torch.from_numpy(g)
    f = (gt[gt > 0] * (torch.log(gt[gt > 0]) - log_q[gt > 0])).sum()
    for classes, p in parts:
        outside = [j for j in range(len(g)) if j not in set(classes.tolist())]
        cells = torch.cat([q[torch.from_numpy(classes)], q[outside].sum().reshape(1)])
        pt = torch.from_numpy(p)
        f = f + (pt[pt > 0] * (torch.log(pt[pt > 0]) - torch.log(cells[pt > 0]))).sum()
    return f


def _reference_fun(
    z: np.ndarray, g: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, np.ndarray]:
    """The same objective in plain numpy with its gradient in z, written out class by class."""
    log_q = z - z.max() - np.log(np.exp(z - z.max()).sum())
    q = np.exp(log_q)
    pos = g > 0
    f = float(np.sum(g[pos] * (np.log(g[pos]) - log_q[pos])))
    df_dq = -g / q
    for classes, p in parts:
        outside = np.setdiff1d(np.arange(g.size), classes)
        cells = np.append(q[classes], q[outside].sum())
        f += float(sum(pc * np.log(pc / qc) for pc, qc in zip(p, cells) if pc > 0))
        df_dq[classes] -= p[:-1] / cells[:-1]
        df_dq[outside] -= p[-1] / cells[-1]
    return f, q * (df_dq - q @ df_dq)


def _reference_solve(g: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, float]:
    """scipy L-BFGS-B on the softmax logits, float64, tight tolerances."""
    res = minimize(
        _reference_fun,
        np.log(g),
        args=(g, parts),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 5000, "maxcor": 30},
    )
    return _softmax(res.x), float(res.fun)


# ---------------------------------------------------------------------------------- data model


def test_specialist_outputs_validates_shape_and_classes() -> None:
    with pytest.raises(EnsembleError, match="dustbin last"):
        SpecialistOutputs(np.array([0, 1]), np.full((3, 2), 0.5))
    with pytest.raises(EnsembleError, match="distinct"):
        SpecialistOutputs(np.array([1, 1]), np.full((3, 3), 1 / 3))
    s = SpecialistOutputs(np.array([2, 0]), np.full((4, 3), 1 / 3))
    assert s.classes.dtype == np.int64 and s.num_images == 4


def test_collapse_cell_index_and_expand_hand_case() -> None:
    q = np.array([[0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_allclose(E.collapse(q, np.array([2, 0])), [[0.3, 0.1, 0.6]])
    np.testing.assert_array_equal(E.cell_index(np.array([2, 0]), 4), [1, 2, 0, 2])
    p_gen = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
    spec = np.array([[0.5, 0.2, 0.3], [0.6, 0.2, 0.2]])
    full = E.expand_to_full(spec, np.array([0, 1]), p_gen)
    # row 0: dustbin 0.3 over classes 2, 3 in ratio 0.3 : 0.4; row 1: p_gen has no mass there -> uniform
    np.testing.assert_allclose(full, [[0.5, 0.2, 0.3 * 3 / 7, 0.3 * 4 / 7], [0.6, 0.2, 0.1, 0.1]])
    np.testing.assert_allclose(full.sum(axis=1), 1.0)


# ---------------------------------------------------------------------------------- activation


def test_activation_top1_top2_and_bad_top_n() -> None:
    groups = [np.array([0, 1]), np.array([1, 2]), np.array([3])]
    p_gen = np.array(
        [
            [0.1, 0.6, 0.1, 0.1, 0.1],  # top1 = 1 -> groups 0 and 1; top2 adds a tie broken to class 0
            [0.1, 0.1, 0.1, 0.1, 0.6],  # top1 = 4 -> none; top2 = {4, 0} -> group 0
            [0.3, 0.0, 0.0, 0.45, 0.25],  # top1 = 3 -> group 2; top2 = {3, 0} -> groups 0, 2
        ]
    )
    np.testing.assert_array_equal(
        E.activation(p_gen, groups, top_n=1), [[True, True, False], [False, False, False], [False, False, True]]
    )
    np.testing.assert_array_equal(
        E.activation(p_gen, groups, top_n=2), [[True, True, False], [True, False, False], [True, False, True]]
    )
    for bad in (0, -1, 6, 1.0, True):
        with pytest.raises(EnsembleError, match="top_n"):
            E.activation(p_gen, groups, top_n=bad)
    with pytest.raises(EnsembleError, match=r"\[0, 5\)"):
        E.activation(p_gen, [np.array([5])])


# ---------------------------------------------------------------------------------- KL rule: known answers


def test_no_active_specialist_returns_p_gen_exactly() -> None:
    rng = np.random.default_rng(0)
    p_gen = rng.dirichlet(np.ones(6), size=4)
    probs = rng.dirichlet(np.ones(3), size=4)
    probs[[1, 3]] = np.nan  # placeholders where the specialist is not run
    spec = SpecialistOutputs(np.array([0, 1]), probs)
    active = np.array([[True], [False], [True], [False]])
    q = E.combine_kl(p_gen, [spec], active)
    np.testing.assert_array_equal(q[[1, 3]], p_gen[[1, 3]])
    assert np.isfinite(q).all() and not np.allclose(q[0], p_gen[0])
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)


def test_specialist_agreeing_with_generalist_leaves_p_gen() -> None:
    rng = np.random.default_rng(1)
    p_gen = rng.dirichlet(np.ones(8), size=5)
    specs = [SpecialistOutputs(g, E.collapse(p_gen, g)) for g in (np.array([0, 3, 5]), np.array([5, 6]))]
    q = E.combine_kl(p_gen, specs, np.ones((5, 2), dtype=bool))
    np.testing.assert_allclose(q, p_gen, atol=1e-12)


def test_generalist_only_gives_its_own_distribution() -> None:
    p_gen = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(E.combine("generalist", p_gen), p_gen)
    np.testing.assert_array_equal(E.combine_kl(p_gen, [], np.zeros((2, 0), dtype=bool)), p_gen)


def test_full_cover_specialist_gives_the_average() -> None:
    rng = np.random.default_rng(2)
    p, r = rng.dirichlet(np.ones(5), size=3), rng.dirichlet(np.ones(5), size=3)
    everything = np.arange(5)[::-1]
    spec = SpecialistOutputs(everything, np.concatenate([r[:, everything], np.zeros((3, 1))], axis=1))
    q = E.combine_kl(p, [spec], np.ones((3, 1), dtype=bool))
    np.testing.assert_allclose(q, (p + r) / 2, atol=1e-12)
    with pytest.raises(EnsembleError, match="dustbin is empty"):
        bad = spec.probs.copy()
        bad[:, :-1] *= 0.9
        bad[:, -1] = 0.1
        E.combine_kl(p, [SpecialistOutputs(everything, bad)], np.ones((3, 1), dtype=bool))


def test_two_class_closed_form() -> None:
    # p_gen (0.5, 0.3, 0.2); specialist on {0, 1} says (0.2, 0.6 | dustbin 0.2): the dustbin agrees,
    # inside {0, 1} the weights add up: q0 = 0.8 * 0.7 / 1.6, q1 = 0.8 * 0.9 / 1.6.
    q = E.combine_kl(
        np.array([[0.5, 0.3, 0.2]]), [(np.array([0, 1]), np.array([[0.2, 0.6, 0.2]]))], np.ones((1, 1), bool)
    )
    np.testing.assert_allclose(q, [[0.35, 0.45, 0.2]], atol=1e-10)


def test_zero_generalist_mass_is_still_reached() -> None:
    # A = {0}: (0.1 | 0.9), B = {1}: (0.1 | 0.9), p_gen = (0.5, 0.5, 0). Both dustbins contain class 2,
    # so the optimum moves mass there: by symmetry q = (a, a, 1 - 2a) with -1.2 log a - 1.8 log(1 - a)
    # minimal at a = 0.4. A solver started at p_gen exactly would keep q_2 = 0.
    p_gen = np.array([[0.5, 0.5, 0.0]])
    specs = [(np.array([0]), np.array([[0.1, 0.9]])), (np.array([1]), np.array([[0.1, 0.9]]))]
    sol = E.solve_kl(p_gen, specs, np.ones((1, 2), dtype=bool))
    assert sol.converged.all()
    np.testing.assert_allclose(sol.q, [[0.4, 0.4, 0.2]], atol=1e-8)


# ---------------------------------------------------------------------------------- KL rule: vs generic optimisers


def test_kl_objective_matches_independent_formula(random_batch: dict) -> None:
    b = random_batch
    rng = np.random.default_rng(3)
    q = rng.dirichlet(np.ones(30), size=25)
    got = E.kl_objective(q, b["p_gen"], b["specs"], b["active"])
    for i in range(25):
        parts = [(s.classes, s.probs[i]) for m, s in enumerate(b["specs"]) if b["active"][i, m]]
        ref = _reference_objective(torch.log(torch.from_numpy(q[i])), b["p_gen"][i], parts)
        assert got[i] == pytest.approx(float(ref), rel=1e-12, abs=1e-12)


def test_kl_matches_generic_optimiser_on_random_instances(random_batch: dict) -> None:
    b = random_batch
    sol = E.solve_kl(b["p_gen"], b["specs"], b["active"], tol=1e-12)
    assert sol.converged.all()
    np.testing.assert_allclose(sol.q.sum(axis=1), 1.0, atol=1e-12)
    ours = E.kl_objective(sol.q, b["p_gen"], b["specs"], b["active"])
    worst_gap, worst_q = 0.0, 0.0
    for i in range(25):
        parts = [(s.classes, s.probs[i]) for m, s in enumerate(b["specs"]) if b["active"][i, m]]
        q_ref, f_ref = _reference_solve(b["p_gen"][i], parts)
        assert ours[i] <= f_ref + 1e-12  # EM is never worse than the generic optimiser
        assert sol.gap[i] >= ours[i] - f_ref - 1e-12  # EM rows stop on the Frank-Wolfe bound: it holds
        worst_gap = max(worst_gap, abs(ours[i] - f_ref))
        worst_q = max(worst_q, float(np.abs(sol.q[i] - q_ref).max()))
    assert worst_gap < 1e-9
    assert worst_q < 1e-5


def test_kl_gradient_baseline_agrees_with_em(random_batch: dict) -> None:
    b = random_batch
    q_em = E.combine_kl(b["p_gen"], b["specs"], b["active"], tol=1e-12)
    f_em = E.kl_objective(q_em, b["p_gen"], b["specs"], b["active"])
    for method in ("lbfgs", "torch-lbfgs"):
        rows = slice(0, 25) if method == "lbfgs" else slice(0, 5)
        specs = [SpecialistOutputs(s.classes, s.probs[rows]) for s in b["specs"]]
        q = E.combine_kl_gradient(b["p_gen"][rows], specs, b["active"][rows], method=method, tol=1e-9)
        f = E.kl_objective(q, b["p_gen"][rows], specs, b["active"][rows])
        assert np.abs(f - f_em[rows]).max() < 1e-8, method
        assert np.abs(q - q_em[rows]).max() < 1e-4, method
    with pytest.raises(EnsembleError, match="lbfgs"):
        E.combine_kl_gradient(b["p_gen"], b["specs"], b["active"], method="newton")


def test_em_objective_decreases_monotonically(random_batch: dict) -> None:
    b = random_batch
    values = [E.kl_objective(b["p_gen"], b["p_gen"], b["specs"], b["active"])]  # EM starts at p_gen
    for k in range(1, 31):
        sol = E.solve_kl(b["p_gen"], b["specs"], b["active"], max_iter=k, tol=1e-14, newton_after=None)
        values.append(E.kl_objective(sol.q, b["p_gen"], b["specs"], b["active"]))
    values = np.array(values)  # (31, N)
    assert (np.diff(values, axis=0) <= 1e-13).all()
    assert (values[1] < values[0] - 1e-6).all()  # the first step makes real progress on every image
    several = b["active"].sum(axis=1) >= 2
    assert several.sum() >= 5 and (~several).sum() >= 3
    assert (values[30, several] < values[1, several] - 1e-9).all()
    # one active specialist: one EM step from p_gen is already optimal (cell mass (G + P) / 2,
    # spread inside the cell in proportion to p_gen)
    np.testing.assert_allclose(values[30, ~several], values[1, ~several], rtol=0, atol=1e-14)


def _peaky(seed: int, n: int = 200, num_classes: int = 30, conf: float = 25.0, noise: float = 4.0) -> tuple:
    """Confident float32 models (probabilities down to ~1e-20) that often disagree: slow for EM."""
    rng = np.random.default_rng(seed)
    groups = [np.sort(rng.choice(num_classes, size=10, replace=False)) for _ in range(4)]
    y = rng.integers(0, num_classes, n)
    logits = rng.normal(scale=noise, size=(n, num_classes))
    logits[np.arange(n), y] += conf
    p_gen = torch.softmax(torch.tensor(logits, dtype=torch.float32), 1).numpy()
    specs = []
    for g in groups:
        sl = rng.normal(scale=noise, size=(n, g.size + 1))
        sl[np.arange(n), np.where(np.isin(y, g), rng.integers(0, g.size, n), g.size)] += conf
        specs.append(SpecialistOutputs(g, torch.softmax(torch.tensor(sl, dtype=torch.float32), 1).numpy()))
    return p_gen, specs, E.activation(p_gen, groups, top_n=2)


def test_newton_phase_finishes_what_em_is_slow_at() -> None:
    p_gen, specs, active = _peaky(1)
    em = E.solve_kl(p_gen, specs, active, max_iter=300, newton_after=None)
    assert not em.converged.all()  # plain EM leaves some images unfinished after 300 iterations
    sol = E.solve_kl(p_gen, specs, active, max_iter=300, newton_after=50)
    assert sol.converged.all() and sol.iterations.max() < 150
    assert E.solve_kl(p_gen, specs, active).converged.all()  # the default (Newton after 200) too
    f_em = E.kl_objective(em.q, p_gen, specs, active)
    f_newton = E.kl_objective(sol.q, p_gen, specs, active)
    assert (f_newton <= f_em + 1e-11).all()
    slow = np.flatnonzero(~em.converged)
    sub = [SpecialistOutputs(s.classes, s.probs[slow]) for s in specs]
    long = E.solve_kl(p_gen[slow], sub, active[slow], max_iter=100_000, newton_after=None, tol=1e-12)
    f_long = E.kl_objective(long.q, p_gen[slow], sub, active[slow])
    assert (f_em[slow] - f_long > 1e-7).any()  # EM at 300 iterations was measurably short
    np.testing.assert_allclose(f_newton[slow], f_long, rtol=0, atol=1e-10)
    np.testing.assert_allclose(sol.q.sum(axis=1), 1.0, atol=1e-12)


def test_max_iter_warns_and_reports(random_batch: dict) -> None:
    b = random_batch
    with pytest.warns(E.ConvergenceWarning, match="max_iter=1"):
        E.combine_kl(b["p_gen"], b["specs"], b["active"], max_iter=1)
    sol = E.solve_kl(b["p_gen"], b["specs"], b["active"], max_iter=1)
    assert not sol.converged.all() and (sol.iterations == 1).all()
    with pytest.raises(EnsembleError, match="max_iter"):
        E.solve_kl(b["p_gen"], b["specs"], b["active"], max_iter=0)


def test_active_rows_must_hold_probabilities(random_batch: dict) -> None:
    b = random_batch
    probs = b["specs"][0].probs.copy()
    probs[b["active"][:, 0]] = np.nan
    specs = [SpecialistOutputs(b["specs"][0].classes, probs), *b["specs"][1:]]
    with pytest.raises(EnsembleError, match="specialist 0 has NaN"):
        E.combine_kl(b["p_gen"], specs, b["active"])
    with pytest.raises(EnsembleError, match="same images"):
        E.combine_kl(b["p_gen"][:5], b["specs"], b["active"][:5])


# ---------------------------------------------------------------------------------- option (a): top confident


def _top_confident_case() -> tuple[np.ndarray, list[SpecialistOutputs]]:
    p_gen = np.full((1, 4), 0.25)
    specs = [
        SpecialistOutputs(np.array([0, 1]), np.array([[0.6, 0.2, 0.2]])),  # max 0.6, mass 0.8
        SpecialistOutputs(np.array([2]), np.array([[0.5, 0.5]])),  # max 0.5, mass 0.5
        SpecialistOutputs(np.array([3]), np.array([[0.1, 0.9]])),  # max 0.1, mass 0.1
        SpecialistOutputs(np.array([0, 1, 2]), np.array([[0.3, 0.3, 0.3, 0.1]])),  # max 0.3, mass 0.9
    ]
    return p_gen, specs


def test_top_confident_is_gated_by_the_generalist_by_default() -> None:
    """Defect 4: ungated, one confident specialist over {0, 1} overrules a generalist 95% sure of class 5."""
    p_gen = np.array([[0.01, 0.01, 0.01, 0.01, 0.01, 0.95]])
    specs = [
        SpecialistOutputs(np.array([0, 1]), np.array([[0.97, 0.02, 0.01]])),
        SpecialistOutputs(np.array([4, 5]), np.array([[0.30, 0.60, 0.10]])),
    ]
    ungated = E.combine("top_confident", p_gen, specs, n=1, gated=False)
    assert ungated.argmax(1).tolist() == [0]
    gated = E.combine("top_confident", p_gen, specs, n=1)
    assert gated.argmax(1).tolist() == [5]
    only_01 = specs[:1]  # no specialist switched on: the generalist's answer stands
    assert E.combine("top_confident", p_gen, only_01, n=1).argmax(1).tolist() == [5]


def test_top_confident_hand_cases() -> None:
    p_gen, specs = _top_confident_case()
    e0 = np.array([0.6, 0.2, 0.1, 0.1])  # dustbin 0.2 over classes 2, 3 (uniform p_gen)
    e1 = np.array([1 / 6, 1 / 6, 0.5, 1 / 6])
    e3 = np.array([0.3, 0.3, 0.3, 0.1])
    np.testing.assert_allclose(E.combine_top_confident(p_gen, specs, n=2), [(e0 + e1) / 2])
    np.testing.assert_allclose(E.combine_top_confident(p_gen, specs, n=2, confidence="mass"), [(e3 + e0) / 2])
    np.testing.assert_allclose(E.combine_top_confident(p_gen, specs, n=1), [e0])
    # candidates restricted by an activation mask; a row with no candidate keeps p_gen
    p2 = np.repeat(p_gen, 2, axis=0)
    specs2 = [SpecialistOutputs(s.classes, np.repeat(s.probs, 2, axis=0)) for s in specs]
    active = np.array([[False, False, True, False], [False, False, False, False]])
    q = E.combine_top_confident(p2, specs2, n=2, active=active)
    np.testing.assert_allclose(q, [[0.3, 0.3, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    with pytest.raises(EnsembleError, match=r"n must be an integer in \[1, M=4\]"):
        E.combine_top_confident(p_gen, specs, n=5)
    with pytest.raises(EnsembleError, match="confidence"):
        E.combine_top_confident(p_gen, specs, confidence="entropy")


# ---------------------------------------------------------------------------------- option (b): mixture of experts


def _moe_case() -> tuple[np.ndarray, list[SpecialistOutputs]]:
    p_gen = np.array([[0.4, 0.3, 0.2, 0.1]])
    specs = [
        SpecialistOutputs(np.array([0, 1]), np.array([[0.5, 0.3, 0.2]])),
        SpecialistOutputs(np.array([1, 2]), np.array([[0.6, 0.2, 0.2]])),
    ]
    return p_gen, specs


def test_moe_hand_case_and_threshold() -> None:
    p_gen, specs = _moe_case()
    # class 1 is in both groups: gates 0.4 + 0.3/2 = 0.55 and 0.3/2 + 0.2 = 0.35; class 3 is
    # uncovered: the generalist keeps 0.1.
    gates = E.moe_gates(p_gen, [s.classes for s in specs])
    np.testing.assert_allclose(gates.specialist, [[0.55, 0.35]])
    np.testing.assert_allclose(gates.generalist, [0.1])
    np.testing.assert_allclose(gates.group_mass, [[0.7, 0.5]])
    e0 = np.array([0.5, 0.3, 0.2 * 2 / 3, 0.2 * 1 / 3])  # dustbin over classes 2, 3 in ratio 0.2 : 0.1
    e1 = np.array([0.2 * 0.8, 0.6, 0.2, 0.2 * 0.2])  # dustbin over classes 0, 3 in ratio 0.4 : 0.1
    q = E.combine_moe(p_gen, specs)
    np.testing.assert_allclose(q, [0.1 * p_gen[0] + 0.55 * e0 + 0.35 * e1])
    np.testing.assert_allclose(q.sum(), 1.0)
    # threshold 0.6 skips specialist 1 (group mass 0.5): its gate goes to the generalist
    q_thr = E.combine_moe(p_gen, specs, threshold=0.6)
    np.testing.assert_allclose(q_thr, [0.45 * p_gen[0] + 0.55 * e0])
    assert E.moe_gates(p_gen, [s.classes for s in specs], threshold=0.6).run.tolist() == [[True, False]]
    # a skipped specialist is never read: NaN there is fine
    nan_specs = [specs[0], SpecialistOutputs(specs[1].classes, np.full((1, 3), np.nan))]
    np.testing.assert_allclose(E.combine_moe(p_gen, nan_specs, threshold=0.6), q_thr)
    np.testing.assert_allclose(E.combine_moe(p_gen, specs, threshold=1.0), p_gen)  # everything skipped
    with pytest.raises(EnsembleError, match="threshold"):
        E.combine_moe(p_gen, specs, threshold=1.5)


def test_moe_with_agreeing_specialists_is_p_gen() -> None:
    rng = np.random.default_rng(5)
    p_gen = rng.dirichlet(np.ones(7), size=6)
    specs = [SpecialistOutputs(g, E.collapse(p_gen, g)) for g in (np.array([0, 1, 2]), np.array([2, 3]), np.array([6]))]
    np.testing.assert_allclose(E.combine_moe(p_gen, specs), p_gen, atol=1e-12)


# ---------------------------------------------------------------------------------- dispatch, conditional execution


def test_combine_dispatch(random_batch: dict) -> None:
    b = random_batch
    with pytest.raises(EnsembleError, match="generalist, kl, kl_calibrated, top_confident, moe"):
        E.combine("vote", b["p_gen"], b["specs"])
    default = E.combine("kl", b["p_gen"], b["specs"])
    explicit = E.combine_kl(b["p_gen"], b["specs"], E.activation(b["p_gen"], b["groups"], top_n=1))
    np.testing.assert_array_equal(default, explicit)
    top2 = E.combine("kl", b["p_gen"], b["specs"], top_n=2)
    assert not np.allclose(top2, default)
    np.testing.assert_array_equal(
        E.combine("moe", b["p_gen"], b["specs"], threshold=0.2), E.combine_moe(b["p_gen"], b["specs"], threshold=0.2)
    )
    np.testing.assert_array_equal(
        E.combine("top_confident", b["p_gen"], b["specs"], n=3, gated=False),
        E.combine_top_confident(b["p_gen"], b["specs"], n=3),
    )
    np.testing.assert_array_equal(
        E.combine("top_confident", b["p_gen"], b["specs"], n=3),
        E.combine_top_confident(b["p_gen"], b["specs"], n=3, active=E.activation(b["p_gen"], b["groups"], top_n=1)),
    )
    with pytest.raises(EnsembleError, match="threshold"):
        E.combine("moe", b["p_gen"], b["specs"], active=b["active"])
    flat = [E.Calibration(2.0, np.full(s.classes.size + 1, 1.0 / (s.classes.size + 1))) for s in b["specs"]]
    for rule in E.RULES:
        q = E.combine(rule, b["p_gen"], b["specs"], **({"calibration": flat} if rule == "kl_calibrated" else {}))
        np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)


def test_run_conditionally_calls_only_active_images(random_batch: dict) -> None:
    b = random_batch
    calls: list[list[int]] = [[] for _ in b["specs"]]

    def make_fn(m: int):
        def fn(indices: np.ndarray) -> np.ndarray:
            calls[m].extend(indices.tolist())
            return b["specs"][m].probs[indices]

        return fn

    active = b["active"].copy()
    active[:, 3] = False  # specialist 3 is never needed: never called
    run = E.run_conditionally(active, b["groups"], [make_fn(m) for m in range(4)])
    for m in range(4):
        assert calls[m] == np.flatnonzero(active[:, m]).tolist()
        assert np.isnan(run.specialists[m].probs[~active[:, m]]).all()
    assert run.evaluations == int(active.sum()) and run.per_specialist.tolist() == active.sum(axis=0).tolist()
    np.testing.assert_array_equal(
        E.combine_kl(b["p_gen"], run.specialists, active), E.combine_kl(b["p_gen"], b["specs"], active)
    )
    with pytest.raises(EnsembleError, match="predict_fns"):
        E.run_conditionally(active, b["groups"], [lambda idx: np.zeros((len(idx), 2))] * 4)


# ------------------------------------------------------------------------------------------- calibrated evidence
def _synthetic(seed: int, n: int = 3000, c: int = 20, boost: float = 2.2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(0, 1, (n, c))
    z[np.arange(n), y] += boost
    p = np.exp(z)
    return y, p / p.sum(axis=1, keepdims=True)


def _noise_specialist(rng, n: int, size: int, scale: float = 3.0) -> np.ndarray:
    p = np.exp(rng.normal(0, scale, (n, size + 1)))
    return p / p.sum(axis=1, keepdims=True)


def _informed_specialist(rng, y: np.ndarray, classes: np.ndarray, sure: float = 0.9) -> np.ndarray:
    cells = ensemble.cell_index(classes, 20)[y]
    p = np.full((y.size, classes.size + 1), (1 - sure) / classes.size)
    p[np.arange(y.size), cells] = sure
    return p


GROUPS = [np.arange(i, i + 4) for i in range(0, 20, 4)]


@pytest.fixture(scope="module")
def noise_case():
    rng = np.random.default_rng(5)
    (yv, _), (yt, pt) = _synthetic(1), _synthetic(2)
    val = [_noise_specialist(rng, yv.size, g.size) for g in GROUPS]
    test = [ensemble.SpecialistOutputs(g, _noise_specialist(rng, yt.size, g.size)) for g in GROUPS]
    cal = [ensemble.calibrate(p, g, yv) for p, g in zip(val, GROUPS)]
    return yt, pt, test, cal


def _acc(q: np.ndarray, y: np.ndarray) -> float:
    return float((q.argmax(axis=1) == y).mean())


def test_specialists_that_output_noise_leave_the_calibrated_rules_at_the_generalist(noise_case):
    """Issue 20: with noise specialists the rules as first built collapsed (dustbin mass handed to the
    generalist's best class outside the group; the generalist replaced, not combined); read as calibrated
    evidence, each stays within 1 point of the generalist."""
    y, pg, specs, cal = noise_case
    base, active = _acc(pg, y), ensemble.activation(pg, GROUPS)
    assert all(c.temperature > 50 for c in cal)  # noise is tempered almost flat on the validation images
    for rule, kw in (("top_confident", {"active": active, "n": 2}), ("moe", {}), ("top_confident", {"n": 2})):
        raw = _acc(ensemble.combine(rule, pg, specs, **kw), y)
        calibrated = _acc(ensemble.combine(rule, pg, specs, calibration=cal, **kw), y)
        assert raw < base - 0.2, (rule, raw, base)  # what a bad specialist did to the first rules
        assert abs(calibrated - base) <= 0.01, (rule, calibrated, base)


def test_informed_specialists_still_help_when_read_as_evidence():
    rng = np.random.default_rng(7)
    (yv, _), (yt, pt) = _synthetic(3), _synthetic(4)
    cal = [ensemble.calibrate(_informed_specialist(rng, yv, g), g, yv) for g in GROUPS]
    specs = [ensemble.SpecialistOutputs(g, _informed_specialist(rng, yt, g)) for g in GROUPS]
    base = _acc(pt, yt)
    for rule, kw in (("top_confident", {"active": ensemble.activation(pt, GROUPS), "n": 1}), ("moe", {})):
        assert _acc(ensemble.combine(rule, pt, specs, calibration=cal, **kw), yt) > base + 0.05, rule


def test_calibration_recovers_a_temperature_and_an_uninformed_output_changes_nothing():
    rng = np.random.default_rng(11)
    g = GROUPS[1]
    calibrated = rng.dirichlet(np.full(g.size + 1, 0.5), 6000)  # labels drawn from these beliefs: calibrated at T = 1
    cells = (calibrated.cumsum(axis=1) > rng.random((6000, 1))).argmax(axis=1)
    y = np.where(cells < g.size, g[np.minimum(cells, g.size - 1)], 0)
    hot = ensemble.temper(calibrated, 1 / 3.0)  # the same beliefs, over-confident by a factor 3 in log space
    cal = ensemble.calibrate(hot, g, y)
    assert cal.temperature == pytest.approx(3.0, rel=0.05)
    np.testing.assert_allclose(cal.mean.sum(), 1.0)
    pg = _synthetic(8, n=50)[1]
    flat = np.tile(cal.mean, (50, 1))
    np.testing.assert_allclose(
        ensemble.evidence_update(ensemble.temper(flat, 1 / cal.temperature), g, pg, cal), pg, atol=1e-9
    )
    with pytest.raises(ensemble.EnsembleError, match="one Calibration per specialist"):
        ensemble.combine_moe(pg, [ensemble.SpecialistOutputs(g, flat)], calibration=[])


# ------------------------------------------------------------------------------------------- kl_calibrated
def test_kl_calibrated_leaves_the_generalist_where_the_paper_rule_breaks(noise_case):
    """Issue 20: the paper's kl follows a confident noise specialist; read as calibrated evidence it does not."""
    y, pg, specs, cal = noise_case
    base, active = _acc(pg, y), ensemble.activation(pg, GROUPS)
    raw = _acc(ensemble.combine("kl", pg, specs, active=active), y)
    robust = _acc(ensemble.combine("kl_calibrated", pg, specs, active=active, calibration=cal), y)
    assert raw < base - 0.2, (raw, base)
    assert abs(robust - base) <= 0.01, (robust, base)
    np.testing.assert_array_equal(  # kl is the paper's rule, bit for bit, whatever the pipeline calibrates
        ensemble.combine("kl", pg, specs, active=active), ensemble.solve_kl(pg, specs, active).q
    )


def test_kl_calibrated_still_follows_informed_specialists():
    rng = np.random.default_rng(7)
    (yv, _), (yt, pt) = _synthetic(3), _synthetic(4)
    cal = [ensemble.calibrate(_informed_specialist(rng, yv, g), g, yv) for g in GROUPS]
    specs = [ensemble.SpecialistOutputs(g, _informed_specialist(rng, yt, g)) for g in GROUPS]
    q = ensemble.combine("kl_calibrated", pt, specs, calibration=cal)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
    assert _acc(q, yt) > _acc(pt, yt) + 0.05


def test_kl_calibrated_with_an_uninformative_output_returns_the_generalist():
    rng = np.random.default_rng(13)
    pg = _synthetic(9, n=200)[1]
    cal = [ensemble.Calibration(4.0, rng.dirichlet(np.ones(g.size + 1))) for g in GROUPS]
    # tempered output == mean: temper(p, T) = mean when p = temper(mean, 1 / T)
    specs = [
        ensemble.SpecialistOutputs(g, ensemble.temper(np.tile(c.mean, (200, 1)), 0.25)) for g, c in zip(GROUPS, cal)
    ]
    active = ensemble.activation(pg, GROUPS, top_n=3)  # several active specialists per image
    assert (active.sum(axis=1) > 1).any()
    np.testing.assert_allclose(ensemble.combine_kl(pg, specs, active, calibration=cal), pg, atol=1e-8)
    assert not np.allclose(ensemble.combine_kl(pg, specs, active), pg, atol=1e-3)  # the paper's rule moves


def test_kl_calibrated_targets_are_distributions_and_inactive_rows_are_untouched(noise_case):
    y, pg, specs, cal = noise_case
    active = ensemble.activation(pg, GROUPS)
    active[:100] = False  # no specialist for the first 100 images
    holey = [
        ensemble.SpecialistOutputs(s.classes, np.where(active[:, [m]], s.probs, np.nan)) for m, s in enumerate(specs)
    ]
    q = ensemble.combine_kl(pg, holey, active, calibration=cal)  # never reads an inactive (NaN) row
    np.testing.assert_array_equal(q[:100], pg[:100])
    np.testing.assert_array_equal(q, ensemble.combine_kl(pg, specs, active, calibration=cal))
    targets = ensemble._evidence_targets(pg, specs, active, cal)
    for m, t in enumerate(targets):
        rows = active[:, m]
        assert (t.probs[rows] >= 0).all() and np.isnan(t.probs[~rows]).all()
        np.testing.assert_allclose(t.probs[rows].sum(axis=1), 1.0, atol=1e-12)


def test_kl_calibrated_needs_a_calibration(noise_case):
    y, pg, specs, cal = noise_case
    with pytest.raises(ensemble.EnsembleError, match="needs calibration="):
        ensemble.combine("kl_calibrated", pg, specs)
    with pytest.raises(ensemble.EnsembleError, match="takes no calibration"):
        ensemble.combine("kl", pg, specs, calibration=cal)
    with pytest.raises(ensemble.EnsembleError, match="one Calibration per specialist"):
        ensemble.combine("kl_calibrated", pg, specs, calibration=cal[:2])
