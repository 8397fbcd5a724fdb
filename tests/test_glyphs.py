import numpy as np
import pytest
import torch

from specialkit import data, glyphs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("glyphs")
    return root, data.load("glyphs", root=root, per_class=9, val_fraction=0.25, seed=3)


def test_glyphs_shape_classes_and_split_sizes(small):
    _, ds = small
    assert ds.num_classes == 62 and ds.class_names[:3] == ("0", "1", "2") and ds.class_names[-1] == "z"
    assert ds.x_train.shape == (62 * 9, 1, 32, 32) and ds.x_train.dtype == torch.uint8
    assert torch.bincount(ds.y_train).tolist() == [9] * 62
    assert torch.bincount(ds.y_val).tolist() == [3] * 62
    assert len(ds.y_test) == 62 * 3
    assert ds.hflip is False
    assert ds.coarse_names == ("digit", "uppercase", "lowercase")
    assert np.bincount(ds.coarse_of_class).tolist() == [10, 26, 26]


def test_glyphs_are_drawn_not_blank_and_splits_differ(small):
    _, ds = small
    per_image_max = ds.x_train.flatten(1).max(dim=1).values
    assert per_image_max.min().item() > 128
    assert not torch.equal(ds.x_train[: 62 * 3], ds.x_val)


def test_glyphs_deterministic_and_cached(small, tmp_path):
    root, ds = small
    files = list(root.glob("glyphs-*.npz"))
    assert len(files) == 1
    again = data.load("glyphs", root=tmp_path, per_class=9, val_fraction=0.25, seed=3, cache=False)
    assert torch.equal(again.x_train, ds.x_train) and again.fingerprint == ds.fingerprint
    other = data.load("glyphs", root=tmp_path, per_class=9, val_fraction=0.25, seed=4, cache=False)
    assert not torch.equal(other.x_train, ds.x_train)


def test_corrupt_cache_names_the_file_and_the_fix(small, tmp_path):
    root, _ = small
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    (bad_root / next(root.glob("glyphs-*.npz")).name).write_bytes(b"not an npz")
    with pytest.raises(data.DatasetError, match="corrupt.*delete it"):
        data.load("glyphs", root=bad_root, per_class=9, val_fraction=0.25, seed=3)


def test_look_alikes_are_closer_than_unrelated_glyphs():
    x, y = glyphs.render_split("val", 30, seed=0)
    means = x.reshape(62, 30, -1).astype(np.float64).mean(axis=1)
    idx = {c: i for i, c in enumerate(glyphs.CLASS_NAMES)}

    def dist(a: str, b: str) -> float:
        return float(np.linalg.norm(means[idx[a]] - means[idx[b]]))

    assert dist("o", "0") < dist("o", "T")
    assert dist("l", "I") < dist("l", "W")


def test_resize_option_through_load(tmp_path):
    ds = data.load("glyphs", root=tmp_path, per_class=2, val_fraction=0.5, image_size=16)
    assert ds.x_train.shape[1:] == (1, 16, 16)


def test_glyphs_hard_is_a_harder_built_in_regime(tmp_path):
    """The second built-in regime: 16 px and heavy distortion, so a small generalist stays far from perfect
    (measured: 79.7% test top-1 with the demo settings, against 98% on `glyphs`)."""
    hard = data.load("glyphs_hard", root=tmp_path, per_class=6, val_fraction=0.25)
    easy = data.load("glyphs", root=tmp_path, per_class=6, val_fraction=0.25)
    assert hard.name == "glyphs_hard" and hard.image_size == 16 and hard.class_names == easy.class_names
    again = data.load("glyphs_hard", root=tmp_path, per_class=6, val_fraction=0.25, cache=False)
    assert torch.equal(again.x_train, hard.x_train) and hard.fingerprint != easy.fingerprint  # deterministic, distinct

    # heavier distortion: two renderings of one class differ more than on `glyphs` (mean pixel distance)
    def spread(ds):
        x = ds.x_train.float()
        return float(
            torch.stack([(x[ds.y_train == c][0] - x[ds.y_train == c][1]).abs().mean() for c in range(62)]).mean()
        )

    assert spread(hard) > spread(easy)
