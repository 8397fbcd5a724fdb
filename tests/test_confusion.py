from __future__ import annotations

import numpy as np
import pytest

from specialkit import confusion as cf

# 3 examples, 3 classes (hand-computed below)
PROBS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6]])


def test_confusion_matrix_hand_case() -> None:
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    cm = cf.confusion_matrix(y_true, y_pred, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_soft_confusion_matrix_sums_probabilities_per_true_class() -> None:
    m = cf.soft_confusion_matrix(np.array([0, 1, 1]), PROBS)
    np.testing.assert_allclose(m, [[1.0, 0.0, 0.0], [0.2, 1.2, 0.6], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(cf.row_normalise(m)[1], [0.1, 0.6, 0.3])
    with pytest.raises(cf.ConfusionError, match="outside"):
        cf.soft_confusion_matrix(np.array([0, 1, 3]), PROBS)


def test_confusion_matrix_from_probabilities_takes_argmax() -> None:
    cm = cf.confusion_matrix(np.array([0, 1, 1]), PROBS)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 0]])


@pytest.mark.parametrize(
    ("y_true", "y_pred", "c", "match"),
    [
        ([0, 3], [0, 1], 3, "outside"),
        ([0, 1], [0], 3, "same examples"),
        ([0, 1], [0, 1], None, "num_classes is required"),
        ([0.5, 1], [0, 1], 3, "integer"),
    ],
)
def test_confusion_matrix_rejects_bad_input(y_true, y_pred, c, match) -> None:
    with pytest.raises(cf.ConfusionError, match=match):
        cf.confusion_matrix(np.array(y_true), np.array(y_pred), c)


def test_row_normalise_and_per_class_accuracy_keep_empty_rows() -> None:
    cm = np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    f = cf.row_normalise(cm)
    np.testing.assert_allclose(f, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])
    acc = cf.per_class_accuracy(cm)
    np.testing.assert_allclose(acc[[0, 2]], [0.75, 0.5])
    assert np.isnan(acc[1])


def test_prediction_covariance_is_population_covariance_by_hand() -> None:
    # means (0.4, 0.4, 0.2); deviations (0.6,-0.4,-0.2), (-0.4,0.6,-0.2), (-0.2,-0.2,0.4); divide by N=3
    expected = np.array([[0.56, -0.44, -0.12], [-0.44, 0.56, -0.12], [-0.12, -0.12, 0.24]]) / 3
    cov = cf.prediction_covariance(PROBS)
    np.testing.assert_allclose(cov, expected, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(PROBS, rowvar=False, bias=True), atol=1e-12)
    np.testing.assert_allclose(cov.sum(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(cf.prediction_covariance(PROBS, ddof=1), expected * 3 / 2, atol=1e-12)


def test_prediction_covariance_rejects_logits() -> None:
    with pytest.raises(cf.ConfusionError, match="softmax"):
        cf.prediction_covariance(np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]))


def test_confusion_distance_by_hand() -> None:
    cm = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    d = cf.confusion_distance(cf.row_normalise(cm))
    expected = np.array([[0, 0.75, 5 / 6], [0.75, 0, 1.0], [5 / 6, 1.0, 0]])
    np.testing.assert_allclose(d, expected, atol=1e-12)
    np.testing.assert_allclose(cf.confusion_distance(cm), expected, atol=1e-12)  # counts are normalised


def test_class_similarity_ranges() -> None:
    cov = cf.prediction_covariance(PROBS)
    s = cf.class_similarity(cov, kind="covariance")
    np.testing.assert_allclose(s, s.T)
    np.testing.assert_allclose(np.diag(s), 1.0)
    assert s.min() >= -1 and s.max() <= 1
    np.testing.assert_allclose(s[0, 1], -0.44 / 0.56)
    cm = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    sc = cf.class_similarity(cm, kind="confusion")
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(sc[off], 1 - cf.confusion_distance(cm)[off])
    np.testing.assert_allclose(np.diag(sc), 1.0)
    with pytest.raises(cf.ConfusionError, match="kind"):
        cf.class_similarity(cm, kind="cosine")


def test_top_confused_pairs_directed_and_symmetric() -> None:
    cm = np.array([[5, 3, 1], [2, 6, 0], [0, 4, 4]])
    names = ("a", "b", "c")
    df = cf.top_confused_pairs(cm, names, k=3)
    assert list(df.columns) == ["true", "predicted", "count", "rate"]
    assert list(zip(df["true"], df["predicted"], df["count"], strict=True)) == [
        ("c", "b", 4),
        ("a", "b", 3),
        ("b", "a", 2),
    ]
    np.testing.assert_allclose(df["rate"], [0.5, 1 / 3, 0.25])
    sym = cf.top_confused_pairs(cm, names, k=10, symmetric=True)
    assert list(zip(sym["class_a"], sym["class_b"], sym["count"], strict=True)) == [
        ("a", "b", 5),
        ("b", "c", 4),
        ("a", "c", 1),
    ]
    assert list(sym["a_as_b"]) == [3, 0, 1] and list(sym["b_as_a"]) == [2, 4, 0]
    np.testing.assert_allclose(sym["rate"].iloc[0], 5 / 17)


def test_class_mean_features_and_missing_class() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    means = cf.class_mean_features(x, np.array([0, 0, 2]), 3)
    np.testing.assert_allclose(means[[0, 2]], [[2.0, 3.0], [10.0, 0.0]])
    assert np.isnan(means[1]).all()
    with pytest.raises(cf.ConfusionError, match="not finite"):
        cf.class_map(means, method="pca")


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(20, 6)) + np.repeat(np.eye(6)[:4] * 5, 5, axis=0)


@pytest.mark.parametrize("method", ["pca", "mds"])
def test_class_map_fast_methods_deterministic(features, method) -> None:
    a = cf.class_map(features, method=method, seed=1)
    b = cf.class_map(features, method=method, seed=1)
    assert a.shape == (20, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_class_map_umap_deterministic_and_small_c(features) -> None:
    a = cf.class_map(features, method="umap", seed=3, n_epochs=20)
    b = cf.class_map(features, method="umap", seed=3, n_epochs=20)
    assert a.shape == (20, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    small = cf.class_map(features[:6], method="umap", seed=0, n_epochs=20)  # n_neighbors = 5
    assert small.shape == (6, 2) and np.isfinite(small).all()


def test_class_map_rejects_bad_method_and_tiny_umap(features) -> None:
    with pytest.raises(cf.ConfusionError, match="unknown method"):
        cf.class_map(features, method="tsne")
    with pytest.raises(cf.ConfusionError, match="pca"):
        cf.class_map(features[:3], method="umap")


def test_summarise_bundles_consistent_statistics() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 4, size=50)
    s = cf.summarise(y, probs, ["w", "x", "y", "z"])
    assert s.cm.sum() == 50 and s.num_classes == 4
    assert s.accuracy == pytest.approx(float(np.mean(probs.argmax(1) == y)))
    np.testing.assert_allclose(s.F, cf.row_normalise(s.cm))
    np.testing.assert_allclose(s.F_soft.sum(axis=1), 1.0)
    np.testing.assert_allclose(s.covariance, cf.prediction_covariance(probs))
    np.testing.assert_allclose(s.distance, cf.confusion_distance(s.F))
    np.testing.assert_allclose(s.per_class, cf.per_class_accuracy(s.cm))
    assert len(s.top_pairs(3)) <= 3
    with pytest.raises(cf.ConfusionError, match="class names"):
        cf.summarise(y, probs, ["w", "x"])


def test_umap_leaves_torch_threads_as_they_were():
    """numba under UMAP resets OpenMP's thread count; training after a class map must not change threads
    (same seed, same numbers in one process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = np.random.default_rng(0).random((12, 12))
        d = (d + d.T) / 2
        np.fill_diagonal(d, 0)
        cf.class_map(d, method="umap", metric="precomputed", seed=0, n_epochs=10)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_umaps_compiled_functions_cache_their_code_on_disk_for_the_next_process():
    from numba.core.registry import CPUDispatcher

    umap = cf._umap()
    fns = [f for f in vars(umap.umap_).values() if isinstance(f, CPUDispatcher)]
    assert fns and all(type(f._cache).__name__ == "FunctionCache" for f in fns)
    assert cf._umap() is umap  # a second call changes nothing


def test_warming_the_umap_cache_leaves_its_compiled_code_on_disk():
    """``make setup`` runs ``warm_umap_cache`` so a fresh process's first class map loads UMAP's machine code instead
    of compiling it (about 30 s): after it, the layout optimiser has run and numba's cache holds its index file."""
    from pathlib import Path

    assert cf.warm_umap_cache() > 0
    fn = cf._umap().layouts._nb_optimize_layout_euclidean_single_epoch
    assert fn.signatures  # compiled (or loaded from the cache) for the inputs class maps give it
    index = Path(fn.stats.cache_path)
    assert any(p.name.startswith(f"layouts.{fn.py_func.__name__}-") for p in index.glob("*.nbi"))
