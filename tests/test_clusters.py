from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest

from specialkit import clusters as cl
from specialkit import confusion as cf
from specialkit.clusters import ClusterSpec, ClusterSpecError

NAMES = ("cat", "dog", "car", "truck", "ship", "plane")


def as_sets(spec: ClusterSpec) -> set[frozenset[str]]:
    return {frozenset(m) for m in spec.groups.values()}


# --------------------------------------------------------------------------- ClusterSpec


def test_spec_views() -> None:
    spec = ClusterSpec({"animals": ("cat", "dog"), "road": ["truck", "car"], "mixed": ("dog", "car")}, NAMES)
    assert spec.names == ("animals", "road", "mixed")
    assert [i.tolist() for i in spec.indices()] == [[0, 1], [3, 2], [1, 2]]
    np.testing.assert_array_equal(spec.coverage(), [1, 2, 2, 1, 0, 0])
    assert spec.uncovered() == ("ship", "plane")
    assert spec.membership().shape == (3, 6) and spec.membership()[1, 3]
    np.testing.assert_array_equal(spec.sizes(), [2, 2, 2])
    assert not spec.is_partition()
    np.testing.assert_array_equal(cl.group_labels(spec), [0, 0, 1, 1, -1, -1])
    np.testing.assert_array_equal(cl.order_classes(spec), [0, 1, 2, 3, 4, 5])
    with pytest.raises(TypeError):
        spec.groups["new"] = ("cat",)  # read-only


def test_order_classes_makes_blocks_contiguous() -> None:
    spec = ClusterSpec({"a": ("plane", "dog"), "b": ("cat", "ship")}, NAMES)
    np.testing.assert_array_equal(cl.order_classes(spec), [1, 5, 0, 4, 2, 3])


def test_unknown_class_lists_names_and_suggests() -> None:
    with pytest.raises(ClusterSpecError, match=r"'dgo' in group 'animals' \(did you mean 'dog'") as err:
        ClusterSpec({"animals": ("cat", "dgo"), "road": ("truk",)}, NAMES)
    assert "'truk'" in str(err.value) and "'truck'" in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ({"a": ()}, "is empty"),
        ({"a": ("cat", "dog", "cat")}, r"\['cat'\] more than once"),
        ({}, "at least one group"),
        ({"a": "cat"}, "list of class names"),
        ({"": ("cat",)}, "non-empty strings"),
    ],
)
def test_invalid_specs_raise(groups, match) -> None:
    with pytest.raises(ClusterSpecError, match=match):
        ClusterSpec(groups, NAMES)


def test_json_round_trip_and_file(tmp_path) -> None:
    spec = ClusterSpec({"animals": ("cat", "dog"), "road": ("truck", "car", "dog")}, NAMES)
    text = spec.to_json()
    assert json.loads(text) == {
        "classes": list(NAMES),
        "groups": {"animals": ["cat", "dog"], "road": ["truck", "car", "dog"]},
    }
    again = ClusterSpec.from_json(text)
    assert again == spec and hash(again) == hash(spec)
    assert again.names == spec.names and again.groups["road"] == ("truck", "car", "dog")
    path = spec.save(tmp_path / "runs" / "clusters.json")
    assert ClusterSpec.load(path, class_names=NAMES) == spec
    assert pickle.loads(pickle.dumps(spec)) == spec and copy.deepcopy(spec) == spec
    with pytest.raises(ClusterSpecError, match="the dataset has 5") as err:
        ClusterSpec.load(path, class_names=NAMES[:5])
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"classes": ["cat"], "groups": {"a": ["cat"]', "not valid JSON"),
        ('{"classes": ["cat"]}', r"missing keys \['groups'\]"),
        ('["cat"]', "top level must be a JSON object"),
        ('{"classes": ["cat"], "groups": {"a": "cat"}}', "must be a list"),
        ('{"classes": ["cat", "dog"], "groups": {"a": ["cat"], "a": ["dog"]}}', "duplicate keys"),
        ('{"classes": ["cat"], "groups": {"a": ["cta"]}}', "did you mean 'cat'"),
    ],
)
def test_malformed_json_names_the_file(tmp_path, text, match) -> None:
    path = tmp_path / "clusters.json"
    path.write_text(text)
    with pytest.raises(ClusterSpecError, match=match) as err:
        ClusterSpec.load(path)
    assert str(path) in str(err.value)


def test_wrong_dataset_is_named() -> None:
    spec = ClusterSpec({"a": ("cat", "dog")}, NAMES)
    assert spec.for_dataset(list(NAMES)) is spec
    with pytest.raises(ClusterSpecError, match="6 classes but the dataset has 5"):
        spec.for_dataset(NAMES[:5])
    with pytest.raises(ClusterSpecError, match="class 2 is 'car' in the spec but 'bus'"):
        spec.for_dataset(("cat", "dog", "bus", "truck", "ship", "plane"))


def test_edits_return_new_specs() -> None:
    spec = ClusterSpec({"a": ("cat", "dog"), "b": ("car",)}, NAMES)
    moved = spec.with_class_moved("dog", "a", "b")
    assert moved.groups == {"a": ("cat",), "b": ("car", "dog")}
    assert spec.groups["a"] == ("cat", "dog")  # unchanged
    assert spec.with_class_added("ship", "a").groups["a"] == ("cat", "dog", "ship")
    assert spec.with_class_removed("cat", "a").groups["a"] == ("dog",)
    assert spec.without_group("b").names == ("a",)
    assert spec.with_group("c", ["plane"]).names == ("a", "b", "c")
    with pytest.raises(ClusterSpecError, match=r"without_group\('b'\)"):
        spec.with_class_removed("car", "b")
    with pytest.raises(ClusterSpecError, match="without_group"):
        spec.with_class_moved("car", "b", "a")
    with pytest.raises(ClusterSpecError, match="already in group 'a'"):
        spec.with_class_added("cat", "a")
    with pytest.raises(ClusterSpecError, match="did you mean 'b'"):
        spec.with_class_added("ship", "bb")
    with pytest.raises(ClusterSpecError, match="only group"):
        spec.without_group("b").without_group("a")


def test_from_labels_partition_and_names() -> None:
    spec = ClusterSpec.from_labels(np.array([1, 1, 0, 0, -1, 0]), NAMES)
    assert spec.groups == {"group_00": ("car", "truck", "plane"), "group_01": ("cat", "dog")}
    assert spec.uncovered() == ("ship",)
    named = ClusterSpec.from_labels(np.array([1, 1, 0, 0, 0, 0]), NAMES, names=["vehicles", "animals"])
    assert named.names == ("vehicles", "animals") and named.is_partition()
    with pytest.raises(ClusterSpecError, match="duplicate group names"):
        ClusterSpec.from_labels(np.array([1, 1, 0, 0, 0, 0]), NAMES, names=["x", "x"])


# --------------------------------------------------------------------------- methods on block data

BLOCK_NAMES = tuple(f"c{i:02d}" for i in range(12))


@pytest.fixture(scope="module")
def blocks() -> dict:
    """12 classes in 3 blocks of 4 (block membership shuffled): classes are confused within a block."""
    rng = np.random.default_rng(0)
    c, per = 12, 80
    block_of = rng.permutation(np.repeat(np.arange(3), 4))
    y = np.repeat(np.arange(c), per)
    same = block_of[y][:, None] == block_of[None, :]
    logits = np.where(same, 0.5, -2.0) + rng.normal(0, 0.3, size=(len(y), c))
    logits[np.arange(len(y)), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = (rng.random(len(y))[:, None] < probs.cumsum(axis=1)).argmax(axis=1)
    cm = cf.confusion_matrix(y, pred, c)
    expected = {frozenset(BLOCK_NAMES[i] for i in np.nonzero(block_of == b)[0]) for b in range(3)}
    return {
        "cov": cf.prediction_covariance(probs),
        "cm": cm,
        "distance": cf.confusion_distance(cf.row_normalise(cm)),
        "expected": expected,
        "block_of": block_of,
    }


def test_block_data_has_cross_block_noise(blocks) -> None:
    off_block = blocks["block_of"][:, None] != blocks["block_of"][None, :]
    assert blocks["cm"][off_block].sum() > 0  # the methods must cope with noise


@pytest.mark.parametrize("method", ["covariance_kmeans", "spectral", "agglomerative", "balanced"])
def test_methods_recover_blocks(blocks, method) -> None:
    spec = cl.cluster(method, cov=blocks["cov"], distance=blocks["distance"], class_names=BLOCK_NAMES, k=3, seed=0)
    assert as_sets(spec) == blocks["expected"]
    assert spec.is_partition()
    again = cl.cluster(method, cov=blocks["cov"], distance=blocks["distance"], class_names=BLOCK_NAMES, k=3, seed=0)
    assert again == spec  # deterministic, canonical names


def test_method_variants_recover_blocks(blocks) -> None:
    raw = cl.covariance_kmeans(blocks["cov"], BLOCK_NAMES, k=3, seed=1, normalise=False)
    assert as_sets(raw) == blocks["expected"]
    gauss = cl.spectral(blocks["distance"], BLOCK_NAMES, k=3, affinity="gaussian", seed=1)
    assert as_sets(gauss) == blocks["expected"]
    complete = cl.agglomerative(blocks["distance"], BLOCK_NAMES, k=3, linkage="complete")
    assert as_sets(complete) == blocks["expected"]
    sim = cf.class_similarity(blocks["cov"], kind="covariance")
    assert as_sets(cl.balanced(sim, BLOCK_NAMES, k=3, kind="similarity")) == blocks["expected"]


def test_agglomerative_threshold_cut(blocks) -> None:
    d = blocks["distance"]
    same = blocks["block_of"][:, None] == blocks["block_of"][None, :]
    cut = (d[same & (d > 0)].mean() + d[~same].mean()) / 2
    spec = cl.agglomerative(d, BLOCK_NAMES, threshold=float(cut))
    assert as_sets(spec) == blocks["expected"]
    with pytest.raises(cl.ClusterError, match="exactly one of k"):
        cl.agglomerative(d, BLOCK_NAMES, k=3, threshold=0.5)


def test_balanced_sizes_differ_by_at_most_one(blocks) -> None:
    spec = cl.balanced(blocks["distance"][:10, :10], BLOCK_NAMES[:10], k=3, seed=2)
    assert sorted(spec.sizes().tolist()) == [3, 3, 4] and spec.is_partition()
    np.testing.assert_array_equal(cl.balanced_sizes(10, 3), [4, 3, 3])


def test_cluster_dispatch_errors(blocks) -> None:
    with pytest.raises(cl.ClusterError, match="did you mean 'spectral'"):
        cl.cluster("spectrall", distance=blocks["distance"], class_names=BLOCK_NAMES, k=3)
    with pytest.raises(cl.ClusterError, match="needs cov="):
        cl.cluster("kmeans", distance=blocks["distance"], class_names=BLOCK_NAMES, k=3)
    with pytest.raises(cl.ClusterError, match="needs distance="):
        cl.cluster("balanced", cov=blocks["cov"], class_names=BLOCK_NAMES, k=3)
    with pytest.raises(cl.ClusterError, match="2 <= k <= 12"):
        cl.spectral(blocks["distance"], BLOCK_NAMES, k=13)
    with pytest.raises(cl.ClusterError, match="symmetric"):
        cl.spectral(blocks["distance"] + np.triu(np.ones((12, 12)), 1) * 0.1, BLOCK_NAMES, k=3)
    with pytest.raises(cl.ClusterError, match=r"\(12, 12\)"):
        cl.balanced(blocks["distance"][:5, :5], BLOCK_NAMES, k=3)


# --------------------------------------------------------------------------- overlap

OVERLAP_NAMES = ("a", "b", "c", "d", "e", "f")
# rows = true class; groups A = {a, b, c}, B = {d, e, f}
F_HAND = np.array(
    [
        [0.90, 0.10, 0.00, 0.00, 0.00, 0.00],
        [0.10, 0.80, 0.10, 0.00, 0.00, 0.00],
        [0.05, 0.10, 0.70, 0.15, 0.00, 0.00],  # c -> B: 0.15
        [0.08, 0.00, 0.00, 0.90, 0.02, 0.00],  # d -> A: 0.08
        [0.00, 0.00, 0.00, 0.00, 1.00, 0.00],
        [0.05, 0.05, 0.00, 0.00, 0.00, 0.90],  # f -> A: 0.10
    ]
)


@pytest.fixture()
def two_groups() -> ClusterSpec:
    return ClusterSpec({"A": ("a", "b", "c"), "B": ("d", "e", "f")}, OVERLAP_NAMES)


def test_hdcnn_overlap_rule(two_groups) -> None:
    # K = 2, gamma = 5: threshold 1/10 -> f joins A (0.10, boundary), c joins B (0.15); d (0.08) does not
    grown = cl.grow_overlap(two_groups, F_HAND, rule="hdcnn", gamma=5.0)
    assert grown.groups == {"A": ("a", "b", "c", "f"), "B": ("d", "e", "f", "c")}
    np.testing.assert_array_equal(grown.coverage(), [1, 1, 2, 1, 1, 2])
    # counts give the same rates
    assert cl.grow_overlap(two_groups, F_HAND * 100, gamma=5.0) == grown
    # gamma = 20: threshold 1/40 -> d (0.08) joins A too, strongest first
    wide = cl.grow_overlap(two_groups, F_HAND, gamma=20.0)
    assert wide.groups["A"] == ("a", "b", "c", "f", "d")
    # max_size 4: only the strongest (f) fits
    capped = cl.grow_overlap(two_groups, F_HAND, gamma=20.0, max_size=4)
    assert capped.groups == {"A": ("a", "b", "c", "f"), "B": ("d", "e", "f", "c")}
    # gamma = 2: threshold 1/4 -> nothing
    assert cl.grow_overlap(two_groups, F_HAND, gamma=2.0) == two_groups


def test_top_r_overlap_rule(two_groups) -> None:
    # strength with A: d = F[d,A] + F[A,d] = 0.08 + 0.15 = 0.23, f = 0.10, e = 0
    # strength with B: c = 0.15 + 0 = 0.15, a = 0 + (0.08 + 0.05) = 0.13, b = 0 + 0.05 = 0.05
    one = cl.grow_overlap(two_groups, F_HAND, rule="top_r", r=1)
    assert one.groups == {"A": ("a", "b", "c", "d"), "B": ("d", "e", "f", "c")}
    two = cl.grow_overlap(two_groups, F_HAND, rule="top_r", r=2)
    assert two.groups == {"A": ("a", "b", "c", "d", "f"), "B": ("d", "e", "f", "c", "a")}
    # e has zero strength with A: never added even when r is large
    many = cl.grow_overlap(two_groups, F_HAND, rule="top_r", r=3)
    assert "e" not in many.groups["A"] and len(many.groups["B"]) == 6
    assert cl.grow_overlap(two_groups, F_HAND, rule="top_r", r=2, max_size=3) == two_groups
    with pytest.raises(cl.ClusterError, match="unknown rule"):
        cl.grow_overlap(two_groups, F_HAND, rule="hd-cnn")


# --------------------------------------------------------------------------- quality


def test_quality_in_group_share_by_hand() -> None:
    names = ("w", "x", "y", "z")
    spec = ClusterSpec({"g0": ("w", "x"), "g1": ("y", "z")}, names)
    cm = np.zeros((4, 4), dtype=np.int64)
    np.fill_diagonal(cm, 10)
    cm[0, 1], cm[1, 0], cm[0, 2], cm[3, 2] = 3, 1, 2, 4  # in-group: 3 + 1 + 4 of 10
    q = cl.quality(spec, cm)
    assert q["in_group_error_share"] == pytest.approx(0.8)
    assert q["errors"] == 10 and q["groups"] == 2 and q["size_min"] == q["size_max"] == 2
    assert q["uncovered"] == 0 and q["coverage_mean"] == 1.0
    # an overlapping group that also holds w and y captures the (w -> y) errors
    q2 = cl.quality(spec.with_class_added("w", "g1"), cm)
    assert q2["in_group_error_share"] == pytest.approx(1.0)
    assert q2["coverage_mean"] == pytest.approx(5 / 4)


def test_quality_agreement_with_coarse_labels(blocks) -> None:
    spec = ClusterSpec.from_labels(blocks["block_of"], BLOCK_NAMES)
    q = cl.quality(spec, blocks["cm"], coarse_of_class=blocks["block_of"])
    assert q["ari"] == pytest.approx(1.0) and q["nmi"] == pytest.approx(1.0)
    shuffled = ClusterSpec.from_labels(np.arange(12) % 3, BLOCK_NAMES)
    table = cl.quality_table({"true": spec, "stripes": shuffled}, blocks["cm"], blocks["block_of"])
    assert list(table.index) == ["true", "stripes"]
    assert table.loc["stripes", "ari"] < 0.5
    assert table.loc["true", "in_group_error_share"] > table.loc["stripes", "in_group_error_share"]
    assert table["groups"].dtype == np.int64
