import pytest
import torch

from specialkit import data
from specialkit.data import DatasetError


def _toy(name: str = "toy", n: int = 10) -> data.Dataset:
    x = torch.arange(n * 4 * 4, dtype=torch.int64).reshape(n, 1, 4, 4).remainder(256).to(torch.uint8)
    y = torch.arange(n) % 2
    return data.Dataset(name, ("a", "b"), x, y, x[:4], y[:4], x[:2], y[:2])


def test_dataset_validates_dtypes_and_shapes():
    x = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DatasetError, match="x_train must be uint8"):
        y3 = torch.zeros(3, dtype=torch.int64)
        data.Dataset("t", ("a",), x.float(), y3, x, y3, x, y3)
    with pytest.raises(DatasetError, match="y_val must be int64"):
        y3, y2 = torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        data.Dataset("t", ("a",), x, y3, x, y2, x, y3)


def test_properties_and_fingerprint_changes_with_content():
    ds = _toy()
    assert (ds.num_classes, ds.channels, ds.image_size) == (2, 1, 4)
    assert len(ds.fingerprint) == 16
    other = _toy(name="toy2")
    assert other.fingerprint != ds.fingerprint
    assert _toy().fingerprint == ds.fingerprint
    assert "train 10 / val 4 / test 2" in ds.summary()
    with pytest.raises(ValueError, match="unknown split"):
        ds.split("dev")


def test_unknown_dataset_names_the_choices():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet21k'.*glyphs"):
        data.load("imagenet21k")


def test_take_per_class_and_stratified_split_are_deterministic():
    y = torch.tensor([0] * 20 + [1] * 5 + [2] * 1)
    keep = data.take_per_class(y, 4, seed=1)
    assert torch.bincount(y[keep]).tolist() == [4, 4, 1]
    assert torch.equal(keep, data.take_per_class(y, 4, seed=1))
    tr, va = data.split_train_val(y, 0.2, seed=0)
    assert torch.bincount(y[va], minlength=3).tolist() == [4, 1, 0]
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == len(y)
    with pytest.raises(DatasetError, match="per_class must be at least 1"):
        data.take_per_class(y, 0, seed=0)


def test_resize_images_keeps_dtype_and_constant_images():
    x = torch.full((3, 2, 8, 8), 77, dtype=torch.uint8)
    out = data.resize_images(x, 4)
    assert out.shape == (3, 2, 4, 4) and out.dtype == torch.uint8
    assert torch.all(out == 77)
    assert data.to_float(x).max().item() == pytest.approx(77 / 255)
