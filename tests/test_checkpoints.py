"""Checkpoints (self-describing, atomic, checked on load) and run-folder file helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specialkit import runs
from specialkit.checkpoints import CheckpointError, load_checkpoint, read_info, save_checkpoint
from specialkit.models import ModelConfig, build_model, replace_head
from specialkit.training import EpochRecord, History, predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")


NAMES = tuple("abcd")
FP = "0123456789abcdef"


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=4, in_channels=1, image_size=8, width=4, depth=2, blocks_per_stage=1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    history = History([EpochRecord(1, 1.2, 0.5, 1.1, 0.55, 0.05, 0.3, 40)])
    return model, x, history


def test_round_trip_predicts_identically(trained, tmp_path):
    model, x, history = trained
    path = tmp_path / "sub" / "model.pt"
    extra = {"classes": [1, 3], "dustbin_log_correction": 0.69, "note": None}
    assert (
        save_checkpoint(
            path,
            model,
            model_config=model.config,
            class_names=NAMES,
            dataset_fingerprint=FP,
            history=history,
            extra=extra,
        )
        == path
    )
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]
    loaded, info = load_checkpoint(path, class_names=list(NAMES), dataset_fingerprint=FP)
    assert not loaded.training
    assert torch.equal(predict_logits(model, x, device="cpu"), predict_logits(loaded, x, device="cpu"))
    assert info.model_config == model.config and info.class_names == NAMES and info.num_classes == 4
    assert info.dataset_fingerprint == FP and info.extra == extra and info.format_version == 1
    assert info.history.records == history.records
    assert read_info(path).extra == extra
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "specialkit.checkpoint" and set(raw["state_dict"]) == set(model.state_dict())


def test_round_trip_after_head_surgery(trained, tmp_path):
    model, x, _ = trained
    torch.manual_seed(1)
    special = build_model(model.config)
    special.load_state_dict(model.state_dict())
    replace_head(special, torch.randn(3, special.feature_dim), torch.randn(3))
    path = save_checkpoint(tmp_path / "spec.pt", special, class_names=NAMES, dataset_fingerprint=FP)
    loaded, info = load_checkpoint(path)
    assert info.model_config.num_classes == 3 and info.history is None and info.extra == {}
    assert torch.equal(predict_logits(special, x, device="cpu"), predict_logits(loaded, x, device="cpu"))
    with pytest.raises(CheckpointError, match="head has 3 outputs; pass model_config=model.config"):
        save_checkpoint(
            tmp_path / "bad.pt",
            special,
            model_config=model.config.to_dict() | {"num_classes": 4},
            class_names=NAMES,
            dataset_fingerprint=FP,
        )


def test_wrong_classes_and_fingerprint_are_clear_errors(trained, tmp_path):
    model, _, _ = trained
    path = save_checkpoint(tmp_path / "m.pt", model, class_names=NAMES, dataset_fingerprint=FP)
    with pytest.raises(
        CheckpointError,
        match=r"m\.pt was trained on 4 classes, this dataset has 62: retrain or pass the matching dataset",
    ):
        load_checkpoint(path, class_names=[str(i) for i in range(62)])
    with pytest.raises(
        CheckpointError, match=r"class 2 is 'c' there, 'x' in this dataset.*retrain or pass the matching"
    ):
        load_checkpoint(path, class_names=("a", "b", "x", "d"))
    with pytest.raises(
        CheckpointError, match=f"fingerprint {FP}, this dataset has ffff.*settings used for training, or retrain"
    ):
        load_checkpoint(path, class_names=NAMES, dataset_fingerprint="ffff")
    assert issubclass(CheckpointError, ValueError)


def test_missing_corrupt_and_foreign_files(trained, tmp_path):
    model, _, _ = trained
    with pytest.raises(CheckpointError, match=r"nope\.pt not found: run the stage that trains it"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(tmp_path / "m.pt", model, class_names=NAMES, dataset_fingerprint=FP)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"m\.pt is corrupt or truncated.*delete \S*m\.pt and rerun the command that wrote it"
    ):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a specialkit checkpoint"):
        load_checkpoint(path)


def test_extra_must_be_json_able(trained, tmp_path):
    model, _, _ = trained
    with pytest.raises(CheckpointError, match="must be JSON-able.*tolist"):
        save_checkpoint(tmp_path / "m.pt", model, class_names=NAMES, dataset_fingerprint=FP, extra={"a": np.arange(3)})
    assert not any(tmp_path.iterdir())


def test_failed_save_keeps_the_previous_file(trained, tmp_path, monkeypatch):
    model, _, _ = trained
    path = save_checkpoint(tmp_path / "m.pt", model, class_names=NAMES, dataset_fingerprint=FP)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(runs.RunFileError, match=r"cannot write \S*m\.pt: disk full"):  # one line: path and reason
        save_checkpoint(path, model, class_names=NAMES, dataset_fingerprint="other")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


# runs.py


def test_atomic_writes_and_json(tmp_path):
    p = runs.atomic_write_json(
        tmp_path / "a" / "metrics.json", {"acc": np.float32(0.5), "n": np.int64(3), "v": np.arange(2)}
    )
    assert runs.read_json(p) == {"acc": 0.5, "n": 3, "v": [0, 1]}
    assert runs.atomic_write_text(tmp_path / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert runs.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    with pytest.raises(runs.RunFileError, match="replace NaN"):
        runs.atomic_write_json(tmp_path / "nan.json", {"x": float("nan")})
    with pytest.raises(RuntimeError):
        with runs.atomic_open(tmp_path / "t.txt", "w") as f:
            f.write("partial")
            raise RuntimeError("interrupted")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "t.txt"]


def test_read_json_errors(tmp_path):
    with pytest.raises(runs.RunFileError, match=r"missing\.json not found: run the stage that writes it"):
        runs.read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": 1,')
    with pytest.raises(runs.RunFileError, match=r"bad\.json is not valid JSON.*delete it and re-run"):
        runs.read_json(tmp_path / "bad.json")
    assert issubclass(runs.RunFileError, ValueError)


def test_arrays(tmp_path):
    probs = np.random.default_rng(0).dirichlet(np.ones(5), size=7)
    path = runs.save_array(tmp_path / "probs_val.npy", probs)
    back = runs.load_array(path)
    assert back.dtype == probs.dtype and np.array_equal(back, probs)
    with pytest.raises(runs.RunFileError, match="object array"):
        runs.save_array(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(runs.RunFileError, match=r"name the file 'probs\.npy'"):
        runs.save_array(tmp_path / "probs.txt", probs)
    with pytest.raises(runs.RunFileError, match="not found"):
        runs.load_array(tmp_path / "none.npy")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(runs.RunFileError, match="not a readable .npy"):
        runs.load_array(path)
    assert json.loads(json.dumps(runs.read_json(runs.atomic_write_json(tmp_path / "x.json", [1])))) == [1]
