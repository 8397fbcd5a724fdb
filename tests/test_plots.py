from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch
from PIL import Image

from specialkit import plots

NAMES = ("apple", "bear", "cat", "dog", "eel", "fox")
C = len(NAMES)


def decode_image(trace: go.Image) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an image trace's PNG data URI."""
    assert trace.source.startswith("data:image/png;base64,")
    png = base64.b64decode(trace.source.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def hover_cells(fig: go.Figure, index: int = 1) -> list[str]:
    """Non-empty hover texts of an image grid's hover heatmap, row-major."""
    trace = fig.data[index]
    assert trace.type == "heatmap"
    return [t for row in trace.text for t in row if t]


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def gray_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------- image grids


def test_sample_grid_composes_grayscale_torch_images(gray_images: torch.Tensor) -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    fig = plots.sample_grid(gray_images, labels, NAMES, ncols=4, gap=2, title="t")
    assert isinstance(fig, go.Figure)
    assert fig.data[0].type == "image"
    img = decode_image(fig.data[0])
    assert img.shape == (3 * 8 + 2 * 2, 4 * 8 + 3 * 2, 3)
    np.testing.assert_array_equal(img[0:8, 0:8, 0], gray_images[0, 0].numpy())
    np.testing.assert_array_equal(img[0:8, 0:8, 2], gray_images[0, 0].numpy())
    np.testing.assert_array_equal(img[10:18, 10:18, 1], gray_images[5, 0].numpy())  # row 1, col 1
    cells = hover_cells(fig)
    assert len(cells) == 10
    assert "fox" in cells[5] and "dog" in cells[9]


def test_sample_grid_keeps_rgb_channels_and_adds_captions(rng: np.random.Generator) -> None:
    images = rng.integers(0, 256, (3, 3, 24, 20), dtype=np.uint8)
    fig = plots.sample_grid(images, np.array([2, 0, 1]), NAMES, ncols=16, gap=1, captions=True)
    img = decode_image(fig.data[0])
    assert img.shape[1] == 3 * 20 + 2 * 1
    assert img.shape[0] > 24  # a caption band under the row
    np.testing.assert_array_equal(img[0:24, 21:41], images[1].transpose(1, 2, 0))
    assert [a.text for a in fig.layout.annotations] == ["cat", "apple", "bear"]


def test_sample_grid_accepts_float_images_and_rejects_bad_input() -> None:
    x = np.full((2, 1, 4, 4), 0.5, dtype=np.float32)
    img = decode_image(plots.sample_grid(x, [0, 1], NAMES, ncols=2, gap=0).data[0])
    assert img.shape == (4, 8, 3) and np.all(img == 128)
    with pytest.raises(plots.PlotInputError, match="channels"):
        plots.sample_grid(np.zeros((2, 4, 4, 3), np.uint8), [0, 1], NAMES)
    with pytest.raises(plots.PlotInputError, match=r"\[0, 6\)"):
        plots.sample_grid(np.zeros((2, 1, 4, 4), np.uint8), [0, 6], NAMES)
    with pytest.raises(plots.PlotInputError, match="one label per image"):
        plots.sample_grid(np.zeros((2, 1, 4, 4), np.uint8), [0], NAMES)
    with pytest.raises(plots.PlotInputError, match=r"\[0, 1\]"):
        plots.sample_grid(np.full((1, 1, 4, 4), 2.0), [0], NAMES)


def test_confused_examples_grid_captions_true_to_pred() -> None:
    images = np.zeros((5, 1, 32, 32), dtype=np.uint8)
    true = np.array([0, 1, 2, 3, 4])
    pred = np.array([1, 2, 3, 4, 5])
    fig = plots.confused_examples_grid(images, true, pred, NAMES, ncols=3, max_images=4, scores=np.linspace(0, 1, 5))
    assert [a.text for a in fig.layout.annotations] == ["apple → bear", "bear → cat", "cat → dog", "dog → eel"]
    cells = hover_cells(fig)
    assert len(cells) == 4 and "true cat → predicted dog" in cells[2] and "score 0.500" in cells[2]
    assert decode_image(fig.data[0]).shape[1] == 3 * 32 + 2 * 2


def test_captions_that_do_not_fit_are_truncated_but_hover_is_full(gray_images: torch.Tensor) -> None:
    long = ("a-very-long-class-name", "b")
    fig = plots.confused_examples_grid(gray_images[:1], [0], [1], long)
    caption = fig.layout.annotations[0].text
    assert caption.endswith("…") and "a-very-long-class-name → b".startswith(caption[:-1])
    assert "a-very-long-class-name" in hover_cells(fig)[0]


def test_fixed_broken_grid_splits_examples(gray_images: torch.Tensor) -> None:
    y = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    gen = y.copy()
    ens = y.copy()
    gen[[1, 4, 7]] = 0  # generalist wrong at 1, 4, 7; ensemble right there -> fixed
    ens[[2]] = 5  # generalist right at 2, ensemble wrong -> broken
    gen[9], ens[9] = 0, 1  # both wrong: neither panel
    fig = plots.fixed_broken_grid(gray_images, y, gen, ens, NAMES, ncols=2)
    assert fig.layout.meta == {"n_fixed": 3, "n_broken": 1}
    images = [t for t in fig.data if t.type == "image"]
    assert len(images) == 2
    assert decode_image(images[0]).shape[1] == 2 * 8 + 2  # 3 images in 2 columns
    np.testing.assert_array_equal(decode_image(images[1])[0:8, 0:8, 0], gray_images[2, 0].numpy())
    assert "Fixed by the ensemble: 3" in fig.layout.annotations[0].text
    none = plots.fixed_broken_grid(gray_images, y, y, y, NAMES)
    assert not any(t.type == "image" for t in none.data)
    assert {"no fixed examples", "no broken examples"} <= {a.text for a in none.layout.annotations}


# ---------------------------------------------------------------- training curves


@dataclass(frozen=True)
class Record:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float


class FakeHistory:
    def __init__(self, records: list[Record]) -> None:
        self.records = records


def test_training_curves_one_colour_per_model_train_dashed_val_solid() -> None:
    dicts = [
        dict(epoch=e, train_loss=1.0 / e, train_acc=0.1 * e, val_loss=None, val_acc=None, lr=0.1) for e in (1, 2, 3)
    ]
    recs = FakeHistory([Record(e, 2.0 / e, 0.2 * e, 3.0 / e, 0.15 * e, 0.01 * e) for e in (1, 2)])
    fig = plots.training_curves({"gen": dicts, "spec": recs}, show_lr=True)
    by_name: dict[str, list[go.Scatter]] = {}
    for t in fig.data:
        by_name.setdefault(t.name, []).append(t)
    assert set(by_name) == {"gen train", "spec train", "spec val", "gen lr", "spec lr"}
    assert len(by_name["gen train"]) == 2  # loss and accuracy panels
    loss, acc = by_name["spec val"]
    np.testing.assert_allclose(loss.y, [3.0, 1.5])
    np.testing.assert_allclose(acc.y, [0.15, 0.3])
    assert list(loss.x) == [1, 2]
    assert all(t.line.dash == "dash" for t in by_name["spec train"])
    assert all(t.line.dash == "solid" for t in by_name["spec val"])
    assert by_name["gen train"][0].line.color != by_name["spec train"][0].line.color
    assert by_name["spec train"][0].line.color == by_name["spec val"][0].line.color
    assert fig.layout.yaxis3.type == "log"


def test_training_curves_rejects_empty_input() -> None:
    with pytest.raises(plots.PlotInputError, match="non-empty"):
        plots.training_curves({})
    with pytest.raises(plots.PlotInputError, match="no epochs"):
        plots.training_curves({"m": []})
    fig = plots.specialist_curves(
        {"s0": [dict(epoch=1, train_loss=1.0, train_acc=0.5, val_loss=None, val_acc=None, lr=0.1)]}
    )
    assert "Specialist" in fig.layout.title.text


# ---------------------------------------------------------------- heatmaps


@pytest.fixture(scope="module")
def counts(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 20, (C, C)).astype(float) + 30 * np.eye(C)


def test_confusion_heatmap_applies_order_to_rows_columns_and_names(counts: np.ndarray) -> None:
    order = np.array([3, 0, 5, 1, 4, 2])
    fig = plots.confusion_heatmap(counts, NAMES, order=order, normalised=False)
    z = np.asarray(fig.data[0].z)
    for i in range(C):
        for j in range(C):
            assert z[i][j] == counts[order[i], order[j]]
    assert list(fig.data[0].x) == [NAMES[k] for k in order]
    assert list(fig.data[0].y) == [NAMES[k] for k in order]
    assert fig.data[0].meta["order"] == order.tolist()
    assert "→" in fig.data[0].hovertemplate and "true" in fig.data[0].hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"


def test_confusion_heatmap_normalises_rows_and_hides_diagonal(counts: np.ndarray) -> None:
    m = counts.copy()
    m[2] = 0  # a class with no examples stays all zero
    z = np.asarray(plots.confusion_heatmap(m, NAMES).data[0].z)
    np.testing.assert_allclose(np.delete(z.sum(axis=1), 2), 1.0)
    assert np.all(z[2] == 0)
    fig = plots.confusion_heatmap(m, NAMES, hide_diagonal=True)
    zh = np.asarray(fig.data[0].z, dtype=float)
    assert np.all(np.isnan(np.diag(zh)))
    off = ~np.eye(C, dtype=bool)
    np.testing.assert_allclose(zh[off], z[off])
    assert fig.data[0].zmax == pytest.approx(z[off].max())


def test_confusion_heatmap_outlines_groups(counts: np.ndarray) -> None:
    groups = [[4, 1], [0, 5, 2]]
    order = plots.group_order(groups, C)
    fig = plots.confusion_heatmap(counts, NAMES, order=order, groups=groups, group_names=["g1", "g2"])
    shapes = fig.layout.shapes
    assert len(shapes) == len(groups)
    assert [s.name for s in shapes] == ["group:g1", "group:g2"]
    assert (shapes[0].x0, shapes[0].x1, shapes[0].y0, shapes[0].y1) == (-0.5, 1.5, -0.5, 1.5)
    assert (shapes[1].x0, shapes[1].x1) == (1.5, 4.5)
    split = plots.confusion_heatmap(counts, NAMES, groups=[[0, 2]])  # not contiguous without an order
    assert len(split.layout.shapes) == 2
    with pytest.raises(plots.PlotInputError, match="class indices outside"):
        plots.confusion_heatmap(counts, NAMES, groups=[[0, 6]])


def test_confusion_heatmap_rejects_bad_order_and_names(counts: np.ndarray) -> None:
    with pytest.raises(plots.PlotInputError, match="permutation"):
        plots.confusion_heatmap(counts, NAMES, order=[0, 0, 1, 2, 3, 4])
    with pytest.raises(plots.PlotInputError, match="one name per class"):
        plots.confusion_heatmap(counts, NAMES[:-1])
    with pytest.raises(plots.PlotInputError, match="square"):
        plots.confusion_heatmap(counts[:3], NAMES)


def test_confusion_heatmap_large_c_has_no_cell_annotations(rng: np.random.Generator) -> None:
    c = 150
    names = tuple(f"class_{i}" for i in range(c))
    groups = [list(range(i, i + 15)) for i in range(0, c, 15)]
    fig = plots.confusion_heatmap(rng.integers(0, 5, (c, c)), names, groups=groups)
    assert np.asarray(fig.data[0].z).shape == (c, c)
    assert len(fig.layout.annotations) == 0
    assert len(fig.layout.shapes) == 10
    assert fig.data[0].text is None
    assert 'class="plotly-graph-div"' in fig.to_html(include_plotlyjs=False)


def test_display_names_makes_duplicates_unique(counts: np.ndarray) -> None:
    names = ("crane", "dog", "crane", "eel", "fox", "cat")
    assert plots.display_names(names) == ["crane #0", "dog", "crane #2", "eel", "fox", "cat"]
    assert len(set(plots.confusion_heatmap(counts, names).data[0].x)) == C


def test_covariance_heatmap_is_diverging_and_centred(rng: np.random.Generator) -> None:
    probs = rng.dirichlet(np.ones(C), 50)
    cov = np.cov(probs, rowvar=False)
    order = np.array([5, 4, 3, 2, 1, 0])
    fig = plots.covariance_heatmap(cov, NAMES, order=order, groups=[[0, 1]])
    h = fig.data[0]
    np.testing.assert_allclose(np.asarray(h.z), cov[np.ix_(order, order)])
    assert h.zmid == 0 and h.zmin == -h.zmax
    assert h.zmax == pytest.approx(np.abs(cov[~np.eye(C, dtype=bool)]).max())
    assert h.colorscale[0][1] != h.colorscale[-1][1]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == 3.5


def test_group_order_places_groups_together_then_uncovered() -> None:
    order = plots.group_order([[4, 2], [2, 0]], C)
    assert order.tolist() == [2, 4, 0, 1, 3, 5]
    with pytest.raises(plots.PlotInputError, match="empty"):
        plots.group_order([[]], C)


# ---------------------------------------------------------------- class map, dendrogram


def test_class_map_trace0_holds_all_classes_in_order(rng: np.random.Generator) -> None:
    coords = rng.normal(size=(C, 2))
    labels = np.array([0, 1, 0, -1, 2, 1])
    fig = plots.class_map(coords, NAMES, group_labels=labels, group_names=["a", "b", "c"])
    t0 = fig.data[0]
    assert len(t0.x) == C
    np.testing.assert_allclose(t0.x, coords[:, 0])
    np.testing.assert_allclose(t0.y, coords[:, 1])
    assert list(t0.customdata) == list(range(C))
    assert list(t0.text) == list(NAMES)
    colors = list(t0.marker.color)
    assert colors == plots.group_colors(labels)
    assert colors[0] == colors[2] != colors[1] and colors[3] == plots.UNCOVERED_COLOR
    assert "c" in t0.hovertext[4] and "uncovered" in t0.hovertext[3]
    legend = [t.name for t in fig.data[1:]]
    assert legend == ["a", "b", "c", "uncovered"]
    assert all(t.x == (None,) for t in fig.data[1:])


def test_class_map_without_groups_and_bad_input(rng: np.random.Generator) -> None:
    fig = plots.class_map(rng.normal(size=(C, 2)), NAMES)
    assert len(fig.data) == 1 and set(fig.data[0].marker.color) == {plots.UNCOVERED_COLOR}
    with pytest.raises(plots.PlotInputError, match=r"\(C, 2\)"):
        plots.class_map(np.zeros((C, 3)), NAMES)
    with pytest.raises(plots.PlotInputError, match="group_labels must have shape"):
        plots.class_map(np.zeros((C, 2)), NAMES, group_labels=[0, 1])


def test_dendrogram_leaves_are_class_names_in_cluster_order() -> None:
    pts = np.array([0.0, 0.1, 5.0, 5.2, 10.0, 10.05])
    d = np.abs(pts[:, None] - pts[None, :])
    fig = plots.dendrogram(d, NAMES)
    leaves = fig.layout.meta["leaf_order"]
    assert sorted(leaves) == list(range(C))
    assert leaves == plots.dendrogram_order(d).tolist()
    assert list(fig.layout.yaxis.ticktext) == [NAMES[i] for i in leaves]
    pos = {c: k for k, c in enumerate(leaves)}
    for a, b in ((0, 1), (2, 3), (4, 5)):
        assert abs(pos[a] - pos[b]) == 1
    assert fig.data[-1].name == "leaves" and list(fig.data[-1].customdata) == leaves
    link_heights = [h for t in fig.data[:-1] for h in t.x if h is not None]
    # {5, 5.2} joins {10, 10.05} first (4.925); the root joins {0, 0.1} to those four at mean distance 60.1 / 8
    assert max(link_heights) == pytest.approx(60.1 / 8)
    bottom = plots.dendrogram(d, NAMES, orientation="bottom", linkage="complete")
    assert list(bottom.layout.xaxis.ticktext) == [NAMES[i] for i in bottom.layout.meta["leaf_order"]]


def test_dendrogram_rejects_bad_distances() -> None:
    d = np.ones((C, C)) - np.eye(C)
    asym = d.copy()
    asym[0, 1] = 3.0
    with pytest.raises(plots.PlotInputError, match="symmetric"):
        plots.dendrogram(asym, NAMES)
    with pytest.raises(plots.PlotInputError, match="unknown linkage"):
        plots.dendrogram(d, NAMES, linkage="median-ish")
    with pytest.raises(plots.PlotInputError, match="non-negative"):
        plots.dendrogram(-d, NAMES)


# ---------------------------------------------------------------- tables and comparisons


def test_quality_bars_one_bar_per_method() -> None:
    table = pd.DataFrame(
        {"silhouette": [0.2, 0.5, 0.1], "balance": [1.0, 0.8, 0.9]}, index=["kmeans", "spectral", "agglo"]
    )
    fig = plots.quality_bars(table, metric="silhouette")
    assert list(fig.data[0].x) == ["kmeans", "spectral", "agglo"]
    np.testing.assert_allclose(fig.data[0].y, [0.2, 0.5, 0.1])
    both = plots.quality_bars(table, metric=["silhouette", "balance"])
    assert len(both.data) == 2
    np.testing.assert_allclose(both.data[1].y, [1.0, 0.8, 0.9])
    with pytest.raises(plots.PlotInputError, match="silhouette"):
        plots.quality_bars(table, metric="purity")


def test_accuracy_bars_relative_change_to_baseline() -> None:
    results = {"generalist": 0.25, "kl": 0.261, "moe": 0.24}
    fig = plots.accuracy_bars(results, baseline="generalist")
    bar = fig.data[0]
    assert list(bar.x) == ["generalist", "kl", "moe"]
    np.testing.assert_allclose(bar.y, [0.25, 0.261, 0.24])
    np.testing.assert_allclose(np.asarray(bar.customdata)[:, 1], [0.0, 0.044, -0.04], atol=1e-12)
    assert "+4.4% rel." in bar.text[1] and "-4.0% rel." in bar.text[2] and "baseline" in bar.text[0]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == 0.25
    plain = plots.accuracy_bars(results)
    assert plain.data[0].customdata is None and len(plain.layout.shapes) == 0
    assert "rel." in plots.accuracy_bars(results, baseline=0.2).data[0].text[0]
    with pytest.raises(plots.PlotInputError, match="not a key"):
        plots.accuracy_bars(results, baseline="student")
    with pytest.raises(plots.PlotInputError, match="fractions"):
        plots.accuracy_bars({"a": 43.1})


def test_paper_table4_constant_matches_the_paper_and_is_read_only() -> None:
    assert list(plots.PAPER_TABLE4) == [str(i) for i in range(10)] + ["10+"]
    assert plots.PAPER_TABLE4["1"] == 0.034 and plots.PAPER_TABLE4["9"] == 0.166 and plots.PAPER_TABLE4["10+"] == 0.141
    with pytest.raises(TypeError):
        plots.PAPER_TABLE4["0"] = 1.0  # type: ignore[index]


def test_table4_chart_has_kit_bars_and_paper_series() -> None:
    table = pd.DataFrame(
        {"coverage": [0, 1, 2, "3+"], "n_examples": [100, 40, 12, 0], "relative_gain": [0.0, 0.05, 0.1, None]}
    )
    fig = plots.table4_chart(table)
    assert len(fig.data) == 2
    kit, paper = fig.data
    assert kit.type == "bar" and list(kit.x) == ["0", "1", "2", "3+"]
    np.testing.assert_allclose(kit.y[:3], [0.0, 0.05, 0.1])
    assert np.isnan(kit.y[3])
    np.testing.assert_allclose(kit.customdata, [100, 40, 12, 0])
    assert list(paper.x) == list(plots.PAPER_TABLE4.keys())
    np.testing.assert_allclose(paper.y, list(plots.PAPER_TABLE4.values()))
    cats = list(fig.layout.xaxis.categoryarray)
    assert cats.index("3") < cats.index("3+") < cats.index("4") and cats[-1] == "10+"
    only = plots.table4_chart(table, paper_reference=False)
    assert len(only.data) == 1
    with pytest.raises(plots.PlotInputError, match="relative_gain"):
        plots.table4_chart(table.drop(columns="relative_gain"))


def test_accuracy_vs_cost_points_and_pareto_front() -> None:
    points = pd.DataFrame(
        {"name": ["gen", "ens", "bad", "small"], "accuracy": [0.25, 0.27, 0.24, 0.2], "cost": [1.0, 5.0, 6.0, 0.5]}
    )
    fig = plots.accuracy_vs_cost(points, cost_label="MFLOPs")
    assert list(fig.data[0].text) == ["gen", "ens", "bad", "small"]
    np.testing.assert_allclose(fig.data[0].x, [1.0, 5.0, 6.0, 0.5])
    np.testing.assert_allclose(fig.data[1].x, [0.5, 1.0, 5.0])  # "bad" is dominated
    assert fig.layout.xaxis.title.text == "MFLOPs"
    with pytest.raises(plots.PlotInputError, match="positive"):
        plots.accuracy_vs_cost(points.assign(cost=[0.0, 1, 2, 3]), log_x=True)


def test_per_class_change_from_delta_or_pair() -> None:
    gen = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    ens = np.array([0.6, 0.6, 0.5, 0.9, 0.9, 0.8])
    order = np.array([5, 4, 3, 2, 1, 0])
    fig = plots.per_class_change(np.stack([gen, ens]), NAMES, order=order)
    bar = fig.data[0]
    np.testing.assert_allclose(bar.y, (ens - gen)[order])
    assert list(bar.x) == [NAMES[i] for i in order]
    assert list(bar.customdata) == order.tolist()
    assert bar.marker.color[0] == plots.NEGATIVE_COLOR and bar.marker.color[2] == plots.POSITIVE_COLOR
    assert "generalist 100.0% → ensemble 80.0%" in bar.hovertext[0]
    ranked = plots.per_class_change(ens - gen, NAMES, sort=True, coverage=[0, 1, 2, 0, 1, 2])
    assert np.all(np.diff(np.asarray(ranked.data[0].y)) <= 0)
    assert "covered by" in ranked.data[0].hovertext[0]
    with pytest.raises(plots.PlotInputError, match="not both"):
        plots.per_class_change(ens - gen, NAMES, order=order, sort=True)
    with pytest.raises(plots.PlotInputError, match="pair"):
        plots.per_class_change(np.zeros((3, C)), NAMES)


# ---------------------------------------------------------------- HTML


@pytest.fixture(scope="module")
def all_figures(gray_images: torch.Tensor, counts: np.ndarray) -> dict[str, go.Figure]:
    y = np.arange(10) % C
    rec = [dict(epoch=1, train_loss=1.0, train_acc=0.5, val_loss=1.1, val_acc=0.4, lr=0.1)]
    d = np.abs(np.arange(C)[:, None] - np.arange(C)[None, :]).astype(float)
    return {
        "sample_grid": plots.sample_grid(gray_images, y, NAMES),
        "confused": plots.confused_examples_grid(gray_images, y, (y + 1) % C, NAMES),
        "fixed_broken": plots.fixed_broken_grid(gray_images, y, (y + 1) % C, y, NAMES),
        "curves": plots.training_curves({"m": rec}),
        "confusion": plots.confusion_heatmap(counts, NAMES, groups=[[0, 1]]),
        "covariance": plots.covariance_heatmap(np.cov(counts), NAMES),
        "class_map": plots.class_map(
            np.arange(2 * C, dtype=float).reshape(C, 2), NAMES, group_labels=[0, 0, 1, 1, -1, 0]
        ),
        "dendrogram": plots.dendrogram(d, NAMES),
        "quality": plots.quality_bars(pd.DataFrame({"q": [1.0, 2.0]}, index=["a", "b"]), metric="q"),
        "accuracy": plots.accuracy_bars({"a": 0.5, "b": 0.6}, baseline="a"),
        "table4": plots.table4_chart(
            pd.DataFrame({"coverage": [0, 1], "n_examples": [5, 5], "relative_gain": [0.0, 0.1]})
        ),
        "cost": plots.accuracy_vs_cost(pd.DataFrame({"name": ["a", "b"], "accuracy": [0.5, 0.6], "cost": [1.0, 2.0]})),
        "change": plots.per_class_change(np.linspace(-0.1, 0.1, C), NAMES),
    }


def test_every_figure_renders_to_html_in_one_template(all_figures: dict[str, go.Figure]) -> None:
    for name, fig in all_figures.items():
        assert isinstance(fig, go.Figure), name
        assert fig.layout.template.to_plotly_json() == pio.templates[plots.TEMPLATE].to_plotly_json(), name
        html = fig.to_html(include_plotlyjs=False, full_html=False)
        assert 'class="plotly-graph-div"' in html, name


def test_figures_to_html_fragment_embeds_plotlyjs_once(all_figures: dict[str, go.Figure]) -> None:
    figs = [all_figures["accuracy"], all_figures["table4"], all_figures["change"]]
    frags = plots.figures_to_html_fragment(figs)
    assert len(frags) == 3
    assert all("<html" not in f for f in frags)
    assert len(frags[0]) > 1_000_000  # plotly.js itself, for offline use
    assert all(len(f) < 100_000 for f in frags[1:])
    single = plots.figures_to_html_fragment(figs[0], include_plotlyjs=False)
    assert len(single) == 1 and len(single[0]) < 100_000


def test_save_html_writes_offline_file_atomically(all_figures: dict[str, go.Figure], tmp_path: Path) -> None:
    target = tmp_path / "sub" / "fig.html"
    out = plots.save_html(all_figures["confusion"], target)
    assert out == target and target.is_file()
    text = target.read_text(encoding="utf-8")
    assert "plotly" in text and "<html" in text and "Confusion matrix" in text
    assert 'src="https://cdn.plot.ly' not in text and len(text) > 1_000_000  # plotly.js embedded: works offline
    assert os.listdir(target.parent) == ["fig.html"]
    plots.save_html(all_figures["accuracy"], target)  # overwrite in place
    assert os.listdir(target.parent) == ["fig.html"]
    replaced = target.read_text(encoding="utf-8")
    assert "Test top-1 accuracy" in replaced and "Confusion matrix" not in replaced


def test_save_html_leaves_old_file_and_no_tmp_on_failure(
    all_figures: dict[str, go.Figure], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "fig.html"
    target.write_text("old", encoding="utf-8")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(plots.os, "replace", broken_replace)
    from specialkit.runs import RunFileError

    with pytest.raises(RunFileError, match="disk full"):  # one line naming the file and the reason
        plots.save_html(all_figures["accuracy"], target)
    assert target.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["fig.html"]
