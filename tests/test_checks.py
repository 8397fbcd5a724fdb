"""The shared input checks: each raises the caller's error class with a message that names the fix."""

import numpy as np
import pytest
import torch

from specialkit import checks, confusion, ensemble, evaluation, stats


def test_as_labels_converts_tensors_and_floats_only_when_asked():
    assert checks.as_labels(torch.tensor([2, 0])).tolist() == [2, 0]
    assert checks.as_labels(np.array([1.0, 3.0]), integral_floats=True).dtype == np.int64
    with pytest.raises(checks.InputError, match="integer class indices.*pass ds.y_test"):
        checks.as_labels(np.array([1.0, 3.0]), fix="pass ds.y_test")
    with pytest.raises(KeyError, match=r"y must be a \(N,\) array"):
        checks.as_labels(np.zeros((2, 2), dtype=int), name="y", error=KeyError)


def test_as_probs_names_the_first_bad_row_and_the_softmax():
    good = np.array([[0.25, 0.75], [1.0, 0.0]], dtype=np.float32)
    out = checks.as_probs(good, 2)
    assert out.dtype == np.float64 and np.array_equal(out, good.astype(np.float64))
    with pytest.raises(checks.InputError, match=r"row 1 has min -1 and sums to 1.*softmax"):
        checks.as_probs(np.array([[0.5, 0.5], [2.0, -1.0]]))
    with pytest.raises(checks.InputError, match="N=3 rows"):
        checks.as_probs(good, 3)
    logits = np.array([[3.0, -1.0]], dtype=np.float32)
    assert checks.as_probs(logits, 1, check_values=False) is logits  # scores: shape only, dtype kept
    assert checks.as_probs(np.array([[-5e-4, 1.0005]]), atol=1e-3).shape == (1, 2)
    with pytest.raises(checks.InputError, match="non-negative"):
        checks.as_probs(np.array([[-5e-4, 1.0005]]), atol=1e-3, neg_atol=0.0)


def test_groups_bools_and_square_matrices():
    assert [g.tolist() for g in checks.check_groups([np.array([0, 2]), torch.tensor([1])], 3)] == [[0, 2], [1]]
    with pytest.raises(checks.InputError, match=r"group 1 must hold distinct class indices in \[0, 3\)"):
        checks.check_groups([np.array([0]), np.array([1, 1])], 3)
    assert checks.as_bools(np.ones((4, 2), dtype=bool), (-1, 2), name="active").shape == (4, 2)
    with pytest.raises(checks.InputError, match=r"active must be a boolean array of shape \(N, 3\), got bool \(4, 2\)"):
        checks.as_bools(np.ones((4, 2), dtype=bool), (-1, 3), name="active")
    with pytest.raises(checks.InputError, match=r"square \(3, 3\) matrix"):
        checks.as_square(np.eye(2), 3, name="cov")
    with pytest.raises(checks.InputError, match="NaN or inf"):
        checks.as_square(np.full((2, 2), np.nan), name="cm")


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: confusion.soft_confusion_matrix(np.array([0]), np.array([[2.0, -1.0]])), confusion.ConfusionError),
        (lambda: ensemble.activation(np.array([[0.5, 0.5]]), [np.array([0, 0])]), ensemble.EnsembleError),
        (lambda: evaluation.top1(np.array([[0.5, 0.5]]), np.array([0.0])), evaluation.EvaluationError),
        (lambda: stats.mcnemar(np.array([1, 0]), np.array([True, False])), stats.StatsError),
    ],
)
def test_modules_keep_their_own_error_class(call, error):
    with pytest.raises(error):
        call()
