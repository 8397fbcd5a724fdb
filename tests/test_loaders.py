"""Loaders read tiny files written in each dataset's official on-disk format (no network)."""

from __future__ import annotations

import pickle
import shutil
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from specialkit import data, loaders
from specialkit.data import DatasetError

# ---------------------------------------------------------------------------------------------
# writers of the official formats
# ---------------------------------------------------------------------------------------------


def _pattern(label: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """A deterministic uint8 image whose pixels encode (label, index)."""
    base = (np.arange(int(np.prod(shape))) * (index + 1) + 37 * label) % 256
    return base.astype(np.uint8).reshape(shape)


def _dump(path: Path, obj: object) -> None:
    """Protocol 2 with NumPy 1's module path, as in the official (Python 2) CIFAR pickles."""
    raw = pickle.dumps(obj, protocol=2)
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _cifar_batch(labels: list[int], start: int, label_key: str, extra: dict | None = None) -> dict:
    x = np.stack([_pattern(c, start + i, (3072,)) for i, c in enumerate(labels)])
    return {"batch_label": "synthetic", "data": x, label_key: list(labels), **(extra or {})}


def write_cifar10(root: Path, *, per_batch_per_class: int = 2) -> Path:
    """``cifar-10-batches-py/``: 5 training batches, test_batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = [c for c in range(10) for _ in range(per_batch_per_class)]
    for b in range(1, 6):
        _dump(folder / f"data_batch_{b}", _cifar_batch(labels, 100 * b, "labels"))
    _dump(folder / "test_batch", _cifar_batch(list(range(10)), 999, "labels"))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": len(labels), "num_vis": 3072})
    return folder


CIFAR100_COARSE_OF = np.arange(100) % 20  # a synthetic fine -> coarse map (the real one differs)


def write_cifar100(root: Path, *, train_per_class: int = 3) -> Path:
    """``cifar-100-python/``: train, test, meta with fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", train_per_class), ("test", 1)):
        fine = [c for c in range(100) for _ in range(n)]
        coarse = [int(CIFAR100_COARSE_OF[c]) for c in fine]
        batch = _cifar_batch(fine, 0 if split == "train" else 500, "fine_labels", {"coarse_labels": coarse})
        _dump(folder / split, batch)
    meta = {
        "fine_label_names": [f"fine{c:02d}" for c in range(100)],
        "coarse_label_names": [f"coarse{c:02d}" for c in range(20)],
    }
    _dump(folder / "meta", meta)
    return folder


def _idx_images(path: Path, images: np.ndarray) -> None:
    path.write_bytes(struct.pack(">IIII", 0x0803, *images.shape) + images.astype(np.uint8).tobytes())


def _idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder_name: str = "MNIST", *, per_class: int = 4) -> Path:
    """``<folder_name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (uncompressed idx files)."""
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", per_class), ("t10k", 1)):
        labels = np.array([c for c in range(10) for _ in range(n)])
        images = np.stack([_pattern(c, i, (28, 28)) for i, c in enumerate(labels)])
        _idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


TINY_WNIDS = ["n02000002", "n01000001", "n03000003"]  # wnids.txt order is not sorted on purpose
TINY_WORDS = {
    "n01000001": "goldfish, Carassius auratus",
    "n02000002": "crane",
    "n03000003": "crane, derrick",
    "n09999999": "unrelated entry",
}


def _save_jpeg(path: Path, arr: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path, quality=95)


def write_tiny_imagenet(root: Path, *, train_per_class: int = 5, val_per_class: int = 2) -> Path:
    """``tiny-imagenet-200/`` with wnids.txt, words.txt, train/<wnid>/images, val/images + annotations."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in TINY_WORDS.items()))
    for k, wnid in enumerate(sorted(TINY_WNIDS)):
        for i in range(train_per_class):
            arr = np.full((64, 64, 3), 40 * k + i, dtype=np.uint8)
            _save_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", arr)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    # one greyscale training image: must come back as RGB
    grey = folder / "train" / TINY_WNIDS[0] / "images" / f"{TINY_WNIDS[0]}_grey.JPEG"
    _save_jpeg(grey, np.full((64, 64), 200, np.uint8), "L")
    lines = []
    for k, wnid in enumerate(sorted(TINY_WNIDS)):
        for i in range(val_per_class):
            name = f"val_{k * val_per_class + i}.JPEG"
            _save_jpeg(folder / "val" / "images" / name, np.full((64, 64, 3), 40 * k + 20, dtype=np.uint8))
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return folder


IMAGEFOLDER_CLASSES = ("bee", "Cat", "dog")


def write_imagefolder(root: Path, *, per_class: int = 10) -> Path:
    """``root/<class>/*.png|JPG`` with one odd-sized image and a non-image file."""
    for k, name in enumerate(IMAGEFOLDER_CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((12, 12, 3), 20 * k + i, dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    Image.fromarray(np.full((20, 16, 3), 250, dtype=np.uint8)).save(root / "dog" / "odd.JPG")
    (root / "Cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar10(root)
    return root


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root)
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_imagenet(root)
    return root


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("folder") / "images")


@pytest.fixture
def no_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the official md5 of every CIFAR file; ``None`` makes it check existence only.

    The parsing code that runs afterwards is torchvision's own, unchanged.
    """
    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


def _check_common(ds: data.Dataset, *, channels: int, size: int, num_classes: int) -> None:
    for split in ("train", "val", "test"):
        x, y = ds.split(split)
        assert x.dtype == torch.uint8 and x.shape[1:] == (channels, size, size)
        assert y.dtype == torch.int64 and len(y) == len(x) > 0
        assert 0 <= int(y.min()) and int(y.max()) < num_classes
    assert ds.num_classes == num_classes


# ---------------------------------------------------------------------------------------------
# torchvision datasets
# ---------------------------------------------------------------------------------------------


def test_cifar10_reads_official_batches(cifar10_root: Path, no_cifar_md5: None) -> None:
    ds = data.load("cifar10", root=cifar10_root, val_fraction=0.2, seed=3)
    _check_common(ds, channels=3, size=32, num_classes=10)
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    assert ds.hflip is True and ds.coarse_names is None
    assert torch.bincount(ds.y_val, minlength=10).tolist() == [2] * 10  # 10 per class, 20 % held out
    assert len(ds.y_train) == 80 and len(ds.y_test) == 10
    # pixel layout: the first test image is channel-major row 0 of test_batch
    expected = torch.from_numpy(_pattern(0, 999, (3072,)).reshape(3, 32, 32))
    assert torch.equal(ds.x_test[0], expected)


def test_cifar10_per_class_image_size_and_seed(cifar10_root: Path, no_cifar_md5: None) -> None:
    a = data.load("cifar10", root=cifar10_root, per_class=5, image_size=16, val_fraction=0.2, seed=1)
    b = data.load("cifar10", root=cifar10_root, per_class=5, image_size=16, val_fraction=0.2, seed=1)
    c = data.load("cifar10", root=cifar10_root, per_class=5, image_size=16, val_fraction=0.2, seed=2)
    _check_common(a, channels=3, size=16, num_classes=10)
    assert torch.bincount(a.y_train, minlength=10).tolist() == [4] * 10
    assert torch.bincount(a.y_val, minlength=10).tolist() == [1] * 10
    assert torch.equal(a.x_train, b.x_train) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.x_train, c.x_train)


def test_cifar10_accepts_the_batches_folder_itself(cifar10_root: Path, no_cifar_md5: None) -> None:
    ds = data.load("cifar10", root=cifar10_root / "cifar-10-batches-py", per_class=2)
    assert len(ds.y_train) + len(ds.y_val) == 20


def test_cifar100_has_fine_and_coarse_labels(cifar100_root: Path, no_cifar_md5: None) -> None:
    ds = data.load("cifar100", root=cifar100_root, val_fraction=0.34, seed=0)
    _check_common(ds, channels=3, size=32, num_classes=100)
    assert ds.class_names[:2] == ("fine00", "fine01")
    assert ds.coarse_names == tuple(f"coarse{c:02d}" for c in range(20))
    assert ds.coarse_of_class is not None and ds.coarse_of_class.dtype == np.int64
    np.testing.assert_array_equal(ds.coarse_of_class, CIFAR100_COARSE_OF)
    assert torch.bincount(ds.y_val, minlength=100).tolist() == [1] * 100
    assert ds.hflip is True


def test_cifar100_inconsistent_coarse_labels_are_an_error(tmp_path: Path, no_cifar_md5: None) -> None:
    folder = write_cifar100(tmp_path, train_per_class=2)
    with open(folder / "test", "rb") as f:
        test = pickle.load(f, encoding="latin1")
    test["fine_labels"][1] = 0  # fine class 0 now in coarse groups 0 and 1; class 1 only in train
    _dump(folder / "test", test)
    with pytest.raises(DatasetError, match="several coarse groups") as err:
        data.load("cifar100", root=tmp_path)
    assert str(folder) in str(err.value) and "official files" in str(err.value)


def test_cifar100_pickle_with_foreign_objects_is_refused(tmp_path: Path, no_cifar_md5: None) -> None:
    folder = write_cifar100(tmp_path, train_per_class=1)
    meta = OrderedDict(fine_label_names=[f"f{c}" for c in range(100)], coarse_label_names=[f"c{c}" for c in range(20)])
    _dump(folder / "meta", meta)
    with pytest.raises(DatasetError, match="refusing to load collections.OrderedDict") as err:
        data.load("cifar100", root=tmp_path)
    assert str(folder / "meta") in str(err.value)


@pytest.mark.parametrize(
    ("name", "folder", "first_class"),
    [("mnist", "MNIST", "0 - zero"), ("fashion_mnist", "FashionMNIST", "T-shirt/top")],
)
def test_mnist_family_reads_idx_files(tmp_path: Path, name: str, folder: str, first_class: str) -> None:
    write_mnist(tmp_path, folder)
    ds = data.load(name, root=tmp_path, val_fraction=0.25, seed=0)
    _check_common(ds, channels=1, size=28, num_classes=10)
    assert ds.class_names[0] == first_class and ds.hflip is False
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [3] * 10
    assert torch.equal(ds.x_test[3, 0], torch.from_numpy(_pattern(3, 3, (28, 28))))
    small = data.load(name, root=tmp_path, per_class=2, image_size=14)
    assert small.x_train.shape[1:] == (1, 14, 14) and len(small.y_train) + len(small.y_val) == 20


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet and imagefolder
# ---------------------------------------------------------------------------------------------


def test_tiny_imagenet_reads_the_official_layout(tiny_root: Path) -> None:
    ds = data.load("tiny_imagenet", root=tiny_root, val_fraction=0.2, seed=0)
    _check_common(ds, channels=3, size=64, num_classes=3)
    # labels follow the sorted wnids; duplicated first names get their wnid
    assert ds.class_names == ("goldfish", "crane (n02000002)", "crane (n03000003)")
    assert ds.hflip is True
    assert torch.bincount(ds.y_test, minlength=3).tolist() == [2, 2, 2]
    for k in range(3):  # the official val images (grey level 40 k + 20) are the test split
        means = ds.x_test[ds.y_test == k].float().mean().item()
        assert means == pytest.approx(40 * k + 20, abs=2)
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_val]), minlength=3).tolist()
    assert counts == [5, 6, 5]  # class n02000002 (label 1) also holds the greyscale image
    x_all = torch.cat([ds.x_train, ds.x_val])
    grey = x_all[(x_all.float().mean(dim=(1, 2, 3)) - 200).abs() < 2]
    assert len(grey) == 1 and torch.equal(grey[0, 0], grey[0, 2])  # converted to 3 equal channels


def test_tiny_imagenet_folder_itself_per_class_and_size(tiny_root: Path) -> None:
    kw = dict(per_class=3, image_size=32, seed=5, val_fraction=0.34)
    a = data.load("tiny_imagenet", root=tiny_root / "tiny-imagenet-200", **kw)
    b = data.load("tiny_imagenet", root=tiny_root, workers=1, **kw)
    _check_common(a, channels=3, size=32, num_classes=3)
    assert torch.bincount(torch.cat([a.y_train, a.y_val]), minlength=3).tolist() == [3, 3, 3]
    assert torch.equal(a.x_train, b.x_train) and a.fingerprint == b.fingerprint


def test_imagefolder_reads_class_folders(folder_root: Path) -> None:
    ds = data.load("imagefolder", root=folder_root, val_fraction=0.25, seed=0)
    assert ds.class_names == tuple(sorted(IMAGEFOLDER_CLASSES))  # "Cat" < "bee" < "dog"
    _check_common(ds, channels=3, size=12, num_classes=3)
    assert torch.bincount(ds.y_test, minlength=3).tolist() == [2, 2, 2]  # test_fraction 0.2 of 10 or 11
    total = torch.bincount(torch.cat([ds.y_train, ds.y_val, ds.y_test]), minlength=3).tolist()
    assert total == [10, 10, 11]  # dog also holds odd.JPG; notes.txt is skipped
    assert ds.hflip is True


def test_imagefolder_options_and_image_size(folder_root: Path) -> None:
    grey = data.load("imagefolder", root=folder_root, channels=1, size=(8, 6), test_fraction=0.5, per_class=2)
    assert grey.x_train.shape[1:] == (1, 8, 6)
    assert torch.bincount(torch.cat([grey.y_train, grey.y_val]), minlength=3).tolist() == [2, 2, 2]
    assert torch.bincount(grey.y_test, minlength=3).tolist() == [5, 5, 6]
    small = data.load("imagefolder", root=folder_root, image_size=6, per_class=3, val_fraction=0.34)
    _check_common(small, channels=3, size=6, num_classes=3)


def test_imagefolder_test_split_ignores_per_class_and_is_seeded(folder_root: Path) -> None:
    a = data.load("imagefolder", root=folder_root, per_class=2, seed=4)
    b = data.load("imagefolder", root=folder_root, seed=4)
    c = data.load("imagefolder", root=folder_root, seed=5)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(b.x_test, c.x_test)
    test_px = {bytes(img.numpy()) for img in b.x_test}
    assert not test_px & {bytes(img.numpy()) for img in torch.cat([b.x_train, b.x_val])}


# ---------------------------------------------------------------------------------------------
# errors: path, expectation and fix in the message
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_missing_torchvision_root_names_path_and_fix(tmp_path: Path, name: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        data.load(name, root=root)
    message = str(err.value)
    assert str(root) in message and "download=True" in message and "Expected the official files" in message


def test_incomplete_cifar_folder_is_an_error(tmp_path: Path, no_cifar_md5: None) -> None:
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3") as err:
        data.load("cifar10", root=tmp_path)
    assert str(folder) in str(err.value) and "download=True" in str(err.value)


def test_truncated_cifar_pickle_is_an_error(tmp_path: Path, no_cifar_md5: None) -> None:
    folder = write_cifar10(tmp_path)
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="download=True") as err:
        data.load("cifar10", root=tmp_path)
    assert str(folder) in str(err.value)


def test_cifar_md5_mismatch_is_an_error(cifar10_root: Path) -> None:
    with pytest.raises(DatasetError, match="corrupted") as err:  # the real md5 check, not patched
        data.load("cifar10", root=cifar10_root)
    assert str(cifar10_root) in str(err.value)


def test_truncated_idx_file_is_an_error(tmp_path: Path) -> None:
    raw = write_mnist(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetError, match="download=True") as err:
        data.load("mnist", root=tmp_path)
    assert str(raw) in str(err.value)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "images", per_class=3)
    bad = root / "bee" / "img01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DatasetError, match="replace the file") as err:
        data.load("imagefolder", root=root)
    assert str(bad) in str(err.value)


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "images", per_class=2)
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images") as err:
        data.load("imagefolder", root=root)
    assert str(root / "empty") in str(err.value) and "add images" in str(err.value)


def test_imagefolder_missing_root_and_bad_options(tmp_path: Path, folder_root: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder") as err:
        data.load("imagefolder", root=tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value) and "Fix" in str(err.value)
    with pytest.raises(DatasetError, match="root is required"):
        data.load("imagefolder")
    with pytest.raises(DatasetError, match="channels must be 1"):
        data.load("imagefolder", root=folder_root, channels=2)
    with pytest.raises(DatasetError, match="unknown option.*colour.*channels"):
        data.load("imagefolder", root=folder_root, colour=True)
    with pytest.raises(DatasetError, match="test_fraction"):
        data.load("imagefolder", root=folder_root, test_fraction=1.5)


def test_unknown_dataset_and_unknown_option() -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'cifar1000'.*tiny_imagenet"):
        data.load("cifar1000")
    with pytest.raises(DatasetError, match="unknown option.*workers.*none"):
        loaders.load_cifar10(root="/nonexistent", workers=2)


def test_tiny_imagenet_without_annotations_or_wnids(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path, train_per_class=1, val_per_class=1)
    (folder / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetError, match="val_annotations.txt is missing") as err:
        data.load("tiny_imagenet", root=tmp_path)
    assert str(folder) in str(err.value) and loaders.TINY_IMAGENET_URL in str(err.value)
    (folder / "wnids.txt").unlink()
    with pytest.raises(DatasetError, match="wnids.txt is missing"):
        data.load("tiny_imagenet", root=folder)


def test_tiny_imagenet_missing_root_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not fetched automatically") as err:
        data.load("tiny_imagenet", root=tmp_path, download=True)
    assert str(tmp_path) in str(err.value) and loaders.TINY_IMAGENET_URL in str(err.value)


def test_tiny_imagenet_bad_annotation_and_missing_class(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path, train_per_class=1, val_per_class=1)
    with open(folder / "val" / "val_annotations.txt", "a") as f:
        f.write("val_99.JPEG\tn07777777\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="line 4.*wnid from wnids.txt"):
        data.load("tiny_imagenet", root=tmp_path)
    for p in (folder / "train" / "n01000001" / "images").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="holds no images") as err:
        data.load("tiny_imagenet", root=tmp_path)
    assert "n01000001" in str(err.value)


def test_imagefolder_with_train_and_test_folders_keeps_the_given_test_split(tmp_path: Path) -> None:
    """CIFAR-10 as JPEG files: root/train/<class>/ and root/test/<class>/; test/ is held out as given."""
    root = tmp_path / "cifar"
    write_imagefolder(root / "train", per_class=10)
    write_imagefolder(root / "test", per_class=4)
    ds = data.load("imagefolder", root=root, per_class=6, val_fraction=0.5, seed=0)
    n_classes = len(IMAGEFOLDER_CLASSES)
    assert ds.num_classes == n_classes and len(ds.y_test) == 4 * n_classes + 1  # write_imagefolder adds one odd image
    assert len(ds.y_train) + len(ds.y_val) == 6 * n_classes
    with pytest.raises(DatasetError, match="drop test_fraction"):
        data.load("imagefolder", root=root, test_fraction=0.3)
    shutil.rmtree(root / "test" / IMAGEFOLDER_CLASSES[0])
    with pytest.raises(DatasetError, match="give both the same class folders"):
        data.load("imagefolder", root=root)
