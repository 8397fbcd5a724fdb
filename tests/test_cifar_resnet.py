"""CIFAR ResNets brought as checkpoints of the common public format (a dict with ``state_dict``, keys
prefixed ``module.``, a final layer called ``linear``, no BatchNorm counters), and CIFAR-10 as JPEGs in
the split layout ``root/{train,test}/<class>/*.jpg``: tiny files written here, never real data."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from specialkit import byog, data, models


def _their_format(net: models.CifarResNetNet) -> dict[str, object]:
    """``net``'s weights as the public CIFAR ResNet checkpoints store them."""
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        name = "linear." + key[len("fc.") :] if key.startswith("fc.") else key
        state["module." + name] = value.clone()
    return {"best_prec1": 91.7, "state_dict": state}


@pytest.fixture()
def checkpoint(tmp_path, one_thread):
    torch.manual_seed(0)
    net = models.CifarResNetNet(20, 10)
    for m in net.modules():  # running statistics that are not the defaults, so a skipped load shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net.eval()
    path = tmp_path / "resnet20.th"
    torch.save(_their_format(net), path)
    return net, path


def _load(path, arch: str = "cifar_resnet20", classes: int = 10) -> models.TorchvisionClassifier:
    source = byog.parse_source(f"torchvision:{arch}:{path}")
    config = byog.torchvision_config(
        source, num_classes=classes, in_channels=3, image_size=32, normalize="imagenet", input_size=None
    )
    return byog.load_torchvision(source, config)


def test_resnet_depths_have_the_published_sizes_and_option_a_shortcuts(one_thread):
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M parameters; option A adds none
    sizes = {d: models.count_parameters(models.CifarResNetNet(d, 10)) / 1e6 for d in (20, 32, 44, 56)}
    assert [round(sizes[d], 2) for d in (20, 32, 44, 56)] == [0.27, 0.46, 0.66, 0.85]
    net = models.CifarResNetNet(20, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert net.layer2(net.layer1(torch.relu(net.bn1(net.conv1(x))))).shape == (2, 32, 16, 16)
    assert net(x).shape == (2, 10)
    with pytest.raises(models.ModelError, match="6n\\+2"):
        models.CifarResNetNet(21, 10)


def test_checkpoint_loads_safely_and_reproduces_the_saved_models_outputs(checkpoint):
    net, path = checkpoint
    model = _load(path).eval()
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor(byog.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(byog.IMAGENET_STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((x - mean) / std)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model.head.out_features == 10 and model._head_prefix == "fc."


def test_wrong_depth_class_count_or_a_pickled_object_is_refused_in_one_line(checkpoint, tmp_path):
    _, path = checkpoint
    with pytest.raises(byog.GeneralistSourceError, match="does not fit torchvision 'cifar_resnet32'") as err:
        _load(path, arch="cifar_resnet32")
    assert "\n" not in str(err.value)
    with pytest.raises(byog.GeneralistSourceError, match="10-class classifier.*100 classes"):
        _load(path, classes=100)
    evil = tmp_path / "evil.th"
    with open(evil, "wb") as f:  # an arbitrary object: torch.load(weights_only=True) must refuse to build it
        pickle.dump({"state_dict": {"module.conv1.weight": torch.zeros(1)}, "hook": pytest.Module}, f)
    with pytest.raises(byog.GeneralistSourceError, match="cannot be read with torch.load\\(weights_only=True\\)"):
        _load(evil)


def _jpeg_tree(root, counts: dict[str, dict[str, int]]) -> None:
    rng = np.random.default_rng(0)
    for split, per in counts.items():
        for name, n in per.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    folder / f"{i:04d}.jpg", quality=90
                )


def test_split_layout_keeps_test_folder_as_the_test_split_and_draws_val_from_train(tmp_path, one_thread):
    _jpeg_tree(tmp_path, {"train": {"cat": 10, "dog": 10, "frog": 10}, "test": {"cat": 3, "dog": 4, "frog": 5}})
    ds = data.load("imagefolder", root=tmp_path, per_class=None, val_fraction=0.2, seed=0)
    x_test, y_test = ds.split("test")
    assert ds.class_names == ("cat", "dog", "frog")
    assert np.bincount(y_test.numpy()).tolist() == [3, 4, 5]
    assert tuple(x_test.shape[1:]) == (3, 32, 32)
    n_train, n_val = len(ds.split("train")[1]), len(ds.split("val")[1])
    assert n_train + n_val == 30 and n_val == 6
    first = Image.open(tmp_path / "test" / "cat" / "0000.jpg").convert("RGB")
    assert any(np.array_equal(np.asarray(first).transpose(2, 0, 1), img.numpy()) for img in x_test[:3])


def test_split_layout_refuses_test_fraction_and_mismatched_classes(tmp_path, one_thread):
    _jpeg_tree(tmp_path, {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "emu": 2}})
    with pytest.raises(data.DatasetError, match="drop test_fraction"):
        data.load("imagefolder", root=tmp_path, per_class=None, test_fraction=0.2)
    with pytest.raises(data.DatasetError, match="different class folders"):
        data.load("imagefolder", root=tmp_path, per_class=None)
