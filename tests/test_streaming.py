"""The streaming path: ImageNet-layout folders read from disk batch by batch give the in-memory numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from specialkit import data, models, pipeline, plots, streaming, training
from specialkit.config import ConfigError, PipelineConfig
from specialkit.data import DatasetError
from specialkit.metrics import compute_metrics

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")


def _image(label: int, index: int, rng: np.random.Generator) -> Image.Image:
    """A small non-square RGB image whose colour depends on its class (so a model can learn it)."""
    h, w = 20 + index % 3, 24
    base = np.array([60 * label, 255 - 50 * label, 40 + 30 * (label % 2)], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def write_imagenet(root: Path, *, per_class: int = 7, val_per_class: int = 2, val_layout: str = "csv") -> Path:
    """ILSVRC CLS-LOC layout: train/<wnid>/*.JPEG; val/*.JPEG + LOC_val_solution.csv (or val/<wnid>/); the
    synset mapping. As in the real ImageNet, a few files are CMYK, greyscale, or a PNG named .JPEG."""
    rng = np.random.default_rng(0)
    for label, wnid in enumerate(WNIDS):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = _image(label, i, rng)
            path = folder / f"{wnid}_{i}.JPEG"
            if (label, i) == (1, 0):
                img.convert("CMYK").save(path, format="JPEG", quality=95)
            elif (label, i) == (2, 1):
                img.convert("L").save(path, format="JPEG", quality=95)
            elif (label, i) == (3, 2):
                img.convert("RGBA").save(path, format="PNG")  # ImageNet holds a PNG named .JPEG
            else:
                img.save(path, format="JPEG", quality=95)
    (root / "train" / WNIDS[0] / "notes.txt").write_text("not an image: skipped by its suffix")
    rows = ["ImageId,PredictionString"]
    for label, wnid in enumerate(WNIDS):
        for i in range(val_per_class):
            image_id = f"ILSVRC2012_val_{label * val_per_class + i + 1:08d}"
            folder = root / "val" / (wnid if val_layout == "folders" else "")
            folder.mkdir(parents=True, exist_ok=True)
            _image(label, i, rng).save(folder / f"{image_id}.JPEG", format="JPEG", quality=95)
            rows.append(f"{image_id},{wnid} 1 2 10 12 {wnid} 3 4 8 9")
    if val_layout == "csv":
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "LOC_synset_mapping.txt").write_text(
        "\n".join(f"{w} class{i}, other name" for i, w in enumerate(WNIDS)) + "\n"
    )
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


def _load(root: Path, in_memory: bool, **kw: object) -> data.Dataset:
    return data.load("imagenet", root=root, per_class=6, val_fraction=0.34, seed=0, in_memory=in_memory, size=16, **kw)


def test_imagenet_layout_both_paths_same_images(imagenet_root: Path) -> None:
    mem, disk = _load(imagenet_root, True), _load(imagenet_root, False, stream_workers=2)
    assert isinstance(mem.x_train, torch.Tensor) and isinstance(disk.x_train, streaming.ImageFiles)
    assert mem.class_names == ("class0", "class1", "class2", "class3")
    assert torch.bincount(mem.y_test, minlength=4).tolist() == [2, 2, 2, 2]  # the CSV's labels
    assert mem.fingerprint == disk.fingerprint and "streamed from disk" in disk.summary()
    for split in ("train", "val", "test"):
        x_mem, y_mem = mem.split(split)
        x_disk, y_disk = disk.split(split)
        assert torch.equal(y_mem, y_disk) and x_disk.shape == x_mem.shape == (len(y_mem), 3, 16, 16)
        assert torch.equal(x_disk[:], x_mem)
        chunks = [torch.arange(len(y_mem)).flip(0)[i : i + 3] for i in range(0, len(y_mem), 3)]
        assert torch.equal(torch.cat(list(streaming.batches(x_disk, chunks))), x_mem.flip(0))  # worker processes
    # mixed modes (CMYK, grey, a PNG with alpha named .JPEG) become 3 channels on both paths
    grey = mem.x_train[(mem.x_train[:, 0] == mem.x_train[:, 1]).flatten(1).all(1)]
    assert len(grey) == 1
    resized = _load(imagenet_root, False).x_train.resized(8)
    assert torch.equal(resized[:4], data.resize_images(mem.x_train[:4], 8))


def test_val_folders_layout_and_budget_choice(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path / "in", per_class=3, val_layout="folders")
    auto_small = data.load("imagenet", root=root, size=8, memory_budget_gb=1e-6)
    auto_big = data.load("imagenet", root=root, size=8, memory_budget_gb=1.0)
    assert isinstance(auto_small.x_train, streaming.ImageFiles) and isinstance(auto_big.x_train, torch.Tensor)
    assert torch.equal(auto_small.y_test, auto_big.y_test) and auto_small.fingerprint == auto_big.fingerprint
    assert streaming.choose_in_memory(10**12, in_memory=None, memory_budget_gb=None) is False
    assert streaming.choose_in_memory(10**12, in_memory=True, memory_budget_gb=1.0) is True


@pytest.mark.slow
def test_fit_and_predictions_identical_on_both_paths(imagenet_root: Path, one_thread: None) -> None:
    """Augmentation (shift + flip) draws from the run's generator in the main process, so it matches exactly."""
    mem, disk = _load(imagenet_root, True), _load(imagenet_root, False, stream_workers=2)
    cfg = training.TrainConfig(epochs=2, batch_size=5, progress=False, device="cpu", seed=3, crop_padding=2)
    out = []
    for ds in (mem, disk):
        torch.manual_seed(0)
        model = models.build_model(models.ModelConfig(num_classes=4, in_channels=3, image_size=16, width=4, depth=1))
        history = training.fit(model, ds.x_train, ds.y_train, config=cfg, x_val=ds.x_val, y_val=ds.y_val, hflip=True)
        out.append(
            (
                history.column("train_loss"),
                history.column("val_acc"),
                training.predict_logits(model, ds.x_test, batch_size=3),
            )
        )
    assert out[0][0] == out[1][0] and out[0][1] == out[1][1]
    assert torch.equal(out[0][2], out[1][2])


@pytest.fixture(scope="module")
def two_runs(imagenet_root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> list[pipeline.Run]:
    """The same quick run on both paths: generalist, specialists (enriched sampling), compute-matched, student."""
    out = []
    for in_memory in (True, False):
        cfg = PipelineConfig.quick(
            dataset="imagenet",
            root=str(imagenet_root),
            image_size=12,
            per_class=6,
            val_fraction=0.34,
            epochs=1,
            specialist_epochs=1,
            student_epochs=1,
            k=2,
            width=4,
            depth=1,
            batch_size=8,
            rules=("generalist", "kl"),
            overlap="none",
            in_memory=in_memory,
            stream_workers=1,
            device="cpu",
        )
        run = pipeline.Run(tmp_path_factory.mktemp("runs") / f"mem{in_memory}", cfg, log=lambda s: None)
        run.distill()
        run.compute_matched()
        out.append(run)
    return out


@pytest.mark.slow
def test_every_stage_gives_the_same_numbers_on_both_paths(two_runs: list[pipeline.Run]) -> None:
    mem, disk = two_runs
    assert isinstance(disk.dataset().x_train, streaming.ImageFiles) and isinstance(mem.dataset().x_train, torch.Tensor)
    assert mem.key("distill") == disk.key("distill")  # the path is in no cache key
    for stage in ("generalist", "compute_matched", "distill"):
        for split in ("val", "test"):
            a, b = getattr(mem, stage)().logits[split], getattr(disk, stage)().logits[split]
            np.testing.assert_array_equal(a, b, err_msg=f"{stage} {split}")
    for a, b in zip(mem.specialist_probs("test"), disk.specialist_probs("test")):
        np.testing.assert_array_equal(a, b)
    no_time = [
        [{k: v for k, v in r.items() if k != "seconds"} for r in s.history]
        for run in two_runs
        for s in run.specialists()
    ]
    assert no_time[: len(no_time) // 2] == no_time[len(no_time) // 2 :] and len(no_time) == 4
    np.testing.assert_array_equal(mem.ensembles()["kl"], disk.ensembles()["kl"])
    rows = [
        [(r["name"], r["top1"], r["top1_ci"]) for r in compute_metrics(run, measure_latency=False)["comparison"]]
        for run in two_runs
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 4  # generalist, compute_matched, kl, student


def test_fixed_broken_grid_decodes_only_the_images_it_shows(
    imagenet_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mem, disk = _load(imagenet_root, True), _load(imagenet_root, False)
    y = mem.y_test.numpy()
    gen, ens = (y + 1) % 4, y.copy()
    gen[1], ens[1] = y[1], (y[1] + 2) % 4  # one image broken, the other 7 fixed
    decoded: list[int] = []
    real = streaming.ImageFiles.decode
    monkeypatch.setattr(streaming.ImageFiles, "decode", lambda self, idx: decoded.append(len(idx)) or real(self, idx))
    figs = [plots.fixed_broken_grid(x, y, gen, ens, mem.class_names, max_images=2) for x in (mem.x_test, disk.x_test)]
    assert figs[0].to_dict() == figs[1].to_dict() and figs[1].layout.meta == {"n_fixed": 7, "n_broken": 1}
    assert sum(decoded) == 1 + 2 + 1  # a first image for the size, then the 2 fixed and the 1 broken shown


# ------------------------------------------------------------------------------------------ bad input


def _rewrite_csv(root: Path, line: str) -> None:
    path = root / "LOC_val_solution.csv"
    path.write_text(path.read_text() + line + "\n")


@pytest.mark.parametrize(
    "line, message",
    [
        ("ILSVRC2012_val_00000099,n09999999 1 2 3 4", "line 10 .* with a wnid of train/"),
        ("ILSVRC2012_val_00000099,", "line 10"),
        ("ILSVRC2012_val_00000077,n01440764 1 2 3 4", "ILSVRC2012_val_00000077 but .* is missing"),
        ("ILSVRC2012_val_00000001,n01440764 1 2 3 4", "a second time"),
    ],
)
def test_bad_val_solution_rows_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    root = write_imagenet(tmp_path / "in", per_class=2)
    _rewrite_csv(root, line)
    with pytest.raises(DatasetError, match=message) as err:
        data.load("imagenet", root=root, size=8)
    assert "LOC_val_solution.csv" in str(err.value) and "Fix" in str(err.value)


def test_bad_layouts_are_clear_errors(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path / "in", per_class=2)
    (root / "LOC_val_solution.csv").write_text("id,label\nx,y\n")
    with pytest.raises(DatasetError, match="header ImageId,PredictionString"):
        data.load("imagenet", root=root, size=8)
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(DatasetError, match="no validation images"):
        data.load("imagenet", root=root, size=8)
    with pytest.raises(DatasetError, match="no train/ folder"):
        data.load("imagenet", root=tmp_path)
    (root / "train" / "n09999999").mkdir()
    with pytest.raises(DatasetError, match="n09999999 holds no images.*add images"):
        data.load("imagenet", root=root, size=8)
    with pytest.raises(DatasetError, match="in_memory=False streams only"):
        data.load("glyphs", per_class=2, in_memory=False)
    with pytest.raises(ConfigError, match="memory_budget_gb"):
        PipelineConfig(memory_budget_gb=0.0)


def test_corrupt_file_met_while_streaming_names_it_in_one_line(tmp_path: Path) -> None:
    """A streamed dataset decodes only a sample when loaded; a corrupt file met later is one clear error,
    raised in the main process, and training writes nothing for the epoch it broke."""
    root = write_imagenet(tmp_path / "in", per_class=6)
    ds = data.load("imagenet", root=root, size=8, in_memory=False, stream_workers=2, per_class=6, val_fraction=0.34)
    bad = Path(ds.x_train.paths[1])
    bad.write_bytes(b"\xff\xd8\xff not really a JPEG")
    with pytest.raises(DatasetError) as err:
        torch.cat(list(streaming.batches(ds.x_train, [torch.arange(0, 3), torch.arange(3, 6)])))
    message = str(err.value)
    assert str(bad) in message and "replace the file or delete it" in message and "\n" not in message
    state = tmp_path / "state.pt"
    model = models.build_model(models.ModelConfig(num_classes=4, in_channels=3, image_size=8, width=4, depth=1))
    with pytest.raises(DatasetError, match="replace the file"):
        training.fit(
            model,
            ds.x_train,
            ds.y_train,
            config=training.TrainConfig(epochs=1, batch_size=4, progress=False),
            state_path=state,
        )
    assert not state.exists()


def test_imagefolder_streams_with_the_same_resize(imagenet_root: Path) -> None:
    """``imagefolder`` (any ``root/<class>/``) streams too; ``image_size`` resizes batch by batch exactly as in memory."""
    kw = dict(root=imagenet_root / "train", image_size=8, per_class=4, seed=1)
    mem, disk = data.load("imagefolder", in_memory=True, **kw), data.load("imagefolder", in_memory=False, **kw)
    assert isinstance(disk.x_test, streaming.ImageFiles) and disk.x_test.resize_to == 8
    assert torch.equal(disk.x_test[:], mem.x_test) and mem.fingerprint == disk.fingerprint
