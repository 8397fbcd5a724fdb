"""Model registry: shapes, normalisation, knobs, parameter/FLOP counts, head surgery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specialkit import models
from specialkit.models import ModelConfig, ModelError, build_model, count_flops, count_parameters, replace_head

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_config(**kw) -> ModelConfig:
    base = dict(num_classes=3, in_channels=1, image_size=4, width=2, depth=1, blocks_per_stage=1)
    return ModelConfig(**{**base, **kw})


def test_registry_names():
    assert {"cnn", "resnet18"} <= set(models.available_models())
    with pytest.raises(ModelError, match="unknown model 'vgg'.*choose one of"):
        build_model(ModelConfig(name="vgg", num_classes=3))


def test_param_and_flop_counts_of_a_tiny_cnn_equal_hand_values():
    model = build_model(_tiny_config())
    # conv 3x3 1->2 without bias: 18; BN(2): 4; Linear(2, 3): 6 + 3.
    assert count_parameters(model) == 18 + 4 + 9
    # conv: 2 out channels x 16 positions x 9 MACs = 288 MACs; linear 2 x 3 = 6 MACs; 2 FLOPs per MAC.
    assert count_flops(model) == 2 * (288 + 6)
    assert count_flops(model, (4, 1, 4, 4)) == 2 * (288 + 6)
    assert model.training


def test_default_cnn_is_small_and_knobs_shrink_it():
    default = build_model(ModelConfig(num_classes=10, in_channels=3))
    n = count_parameters(default)
    assert 100_000 <= n <= 500_000
    assert count_parameters(build_model(ModelConfig(num_classes=10, width=16))) < n / 3
    assert count_parameters(build_model(ModelConfig(num_classes=10, depth=2))) < n / 3
    assert count_flops(build_model(ModelConfig(num_classes=10, width=16))) < count_flops(default) / 3


def test_features_head_and_forward_agree():
    model = build_model(ModelConfig(num_classes=5, in_channels=3, width=8)).eval()
    x = torch.rand(2, 3, 32, 32)
    f = model.features(x)
    assert f.shape == (2, 8 * 4) == (2, model.feature_dim)
    assert isinstance(model.head, nn.Linear)
    assert torch.allclose(model(x), model.head(f))
    assert model.num_outputs == 5


def test_model_normalises_its_input_with_config_mean_std():
    model = build_model(_tiny_config(in_channels=2, mean=(0.2, 0.4), std=(0.1, 0.5)))
    x = torch.rand(3, 2, 4, 4)
    expected = (x - torch.tensor([0.2, 0.4]).view(1, 2, 1, 1)) / torch.tensor([0.1, 0.5]).view(1, 2, 1, 1)
    assert torch.allclose(model.normalize(x), expected, atol=1e-6)
    default = build_model(_tiny_config())
    assert torch.allclose(default.normalize(torch.full((1, 1, 4, 4), 0.75)), torch.full((1, 1, 4, 4), 0.5))
    assert "input_scale" in default.state_dict()


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_on_32px_input(channels):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", num_classes=7, in_channels=channels)).eval()
    stem = model.body[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.in_channels == channels
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    x = torch.rand(2, channels, 32, 32)
    with torch.no_grad():
        assert model.features(x).shape == (2, 512)
        assert model(x).shape == (2, 7)
    assert 11_000_000 < count_parameters(model) < 11_300_000


def test_config_round_trip_and_validation():
    cfg = ModelConfig(name="cnn", num_classes=4, in_channels=3, width=8, mean=(0.1, 0.2, 0.3), std=[0.5])
    assert cfg.std == (0.5,)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert build_model(cfg.to_dict()).config == cfg
    with pytest.raises(ModelError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ModelError, match="mean has 2 values but in_channels=3"):
        ModelConfig(num_classes=4, mean=(0.1, 0.2))
    with pytest.raises(ModelError, match="depth"):
        build_model(ModelConfig(num_classes=4, image_size=4, depth=5))
    model = models.build_model_by_name("cnn", 6, in_channels=1, width=4)
    assert model.config.num_classes == 6 and model.config.in_channels == 1


def test_replace_head_keeps_features_and_updates_config():
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=10, in_channels=1, width=4, depth=2)).eval()
    x = torch.rand(3, 1, 32, 32)
    feats = model.features(x).detach()
    w, b = torch.randn(4, model.feature_dim), torch.randn(4)
    assert replace_head(model, w.numpy(), b) is model
    assert model.head.out_features == 4 and model.config.num_classes == 4
    assert torch.allclose(model(x), feats @ w.T + b, atol=1e-5)
    with pytest.raises(ModelError, match=r"shape \(K', 8\)"):
        replace_head(model, torch.zeros(4, 5), torch.zeros(4))
    with pytest.raises(ModelError, match="bias must have shape"):
        replace_head(model, torch.zeros(4, 8), torch.zeros(3))
