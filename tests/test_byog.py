"""Bring your own generalist (``generalist_from``): torchvision weights, TorchScript / torch.export files and
predictions only, each driving a real run on tiny settings; bad files fail with errors naming the file and fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from specialkit import byog, metrics, models, pipeline, specialists, training
from specialkit.config import ConfigError, PipelineConfig

QUIET = dict(
    per_class=4,
    epochs=1,
    specialist_epochs=1,
    student_epochs=1,
    k=2,
    width=4,
    depth=1,
    image_size=16,
    rules=("generalist", "kl"),
    progress=False,
)
ARCH = "mobilenet_v3_small"


def _cfg(source: str, **kw) -> PipelineConfig:
    return PipelineConfig.quick(**{**QUIET, "generalist_from": source, **kw})


@pytest.fixture(scope="module")
def weights(tmp_path_factory, one_thread):
    """A torchvision classifier over the 62 glyph classes (random weights: the pipeline, not accuracy, is tested)."""
    torch.manual_seed(0)
    net = torchvision.models.get_model(ARCH, weights=None, num_classes=62).eval()
    path = tmp_path_factory.mktemp("w") / "mobilenet.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def torchvision_run(weights, tmp_path_factory):
    run = pipeline.Run(tmp_path_factory.mktemp("a") / "a", _cfg(f"torchvision:{ARCH}:{weights[1]}"), log=lambda s: None)
    run.specialists()
    return run


def test_torchvision_weights_are_the_generalist_with_imagenet_preprocessing(torchvision_run, weights):
    net, _ = weights
    run, ds = torchvision_run, torchvision_run.dataset()
    gen = run.generalist()
    assert gen.examples_seen == 0 and gen.history == [] and isinstance(gen.model, models.TorchvisionClassifier)
    x = ds.x_val.float() / 255
    x3 = (x.expand(-1, 3, -1, -1) - torch.tensor(byog.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        byog.IMAGENET_STD
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net(x3).numpy()
    np.testing.assert_allclose(gen.logits["val"], expected, atol=1e-4)
    assert {"train", "val", "test"} <= set(gen.logits)


def test_specialists_start_as_the_given_model_and_compute_matched_fine_tunes_it(torchvision_run):
    run = torchvision_run
    gen, sps = run.generalist(), run.specialists()
    assert all(s.initialised_from == "generalist" for s in sps) and run.scratch_reason() is None
    rows = metrics.init_check(run)  # a fresh specialist reproduces the given model exactly (DustbinHead)
    assert len(rows) == len(sps) and max(r["dustbin_gap"] for r in rows) < 1e-5
    assert run.skip_reason("compute_matched") is None and run.skip_reason("distill") is None
    cm = run.compute_matched()
    assert cm.examples_seen > 0 and not np.array_equal(cm.logits["test"], gen.logits["test"])
    assert isinstance(cm.model, models.TorchvisionClassifier)


def test_a_changed_weights_file_reruns_the_generalist(torchvision_run, weights, tmp_path):
    net, path = weights
    key = torchvision_run.key("generalist")
    other = tmp_path / "w.pth"
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["classifier.3.bias"] += 1.0
    torch.save(state, other)
    same_file_elsewhere = pipeline.Run(tmp_path / "r", torchvision_run.config, log=lambda s: None)
    assert same_file_elsewhere.key("generalist") == key
    changed = pipeline.Run(
        tmp_path / "r2",
        torchvision_run.config.replace(generalist_from=f"torchvision:{ARCH}:{other}"),
        log=lambda s: None,
    )
    assert changed.key("generalist") != key


@pytest.fixture(scope="module")
def small_cnn(one_thread):
    torch.manual_seed(1)
    ds_cfg = models.ModelConfig(num_classes=62, in_channels=1, image_size=16, width=4, depth=1)
    return models.build_model(ds_cfg).eval()


def test_torchscript_generalist_run_trains_specialists_from_scratch_and_distils(small_cnn, tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(small_cnn, torch.rand(2, 1, 16, 16)), path)
    logs: list[str] = []
    run = pipeline.Run(tmp_path / "b", _cfg(f"torchscript:{path}", generalist_normalize="none"), log=logs.append)
    ds = run.dataset()
    gen = run.generalist()
    with torch.no_grad():
        np.testing.assert_allclose(gen.logits["test"], small_cnn(ds.x_test.float() / 255).numpy(), atol=1e-5)
    assert (run.stage_dir("generalist") / "model.torchscript").is_file()  # the run keeps its own copy
    sps = run.specialists()
    assert all(s.initialised_from == "scratch" for s in sps)
    assert any("specialists train from scratch" in line for line in logs)
    assert "cannot fine-tune" in run.skip_reason("compute_matched")
    with pytest.raises(ConfigError, match="compute_matched=false"):
        run.compute_matched()
    assert run.skip_reason("student_matched") == run.skip_reason("compute_matched")  # nothing to train further
    with pytest.raises(ConfigError, match="student_matched=false"):
        run.student_matched()
    student = run.distill()  # the scripted model teaches on every batch; the student starts from scratch
    assert student.examples_seen > 0 and student.logits["test"].shape == (len(ds.y_test), 62)
    reopened = pipeline.Run.open(run.folder, log=lambda s: None)
    np.testing.assert_array_equal(reopened.generalist().logits["val"], gen.logits["val"])


def test_torch_export_generalist_gives_the_programs_outputs(small_cnn, tmp_path):
    path = tmp_path / "m.pt2"
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(small_cnn, (torch.rand(4, 1, 16, 16),), dynamic_shapes=({0: batch},)), path)
    run = pipeline.Run(tmp_path / "e", _cfg(f"export:{path}", generalist_normalize="none"), log=lambda s: None)
    gen = run.generalist()
    with torch.no_grad():
        np.testing.assert_allclose(gen.logits["val"], small_cnn(run.dataset().x_val.float() / 255).numpy(), atol=1e-5)


def test_predictions_only_run_gives_clusters_ensembles_and_metrics(tiny, tmp_path):
    ds, gen = tiny.dataset(), tiny.generalist()
    labels = {s: ds.split(s)[1].numpy() for s in ("val", "test")}
    path = byog.save_predictions(
        tmp_path / "p.npz", probs={s: gen.probs(s) for s in ("val", "test")}, labels=labels, class_names=ds.class_names
    )
    cfg = tiny.config.replace(generalist_from=f"predictions:{path}", name="p")
    run = pipeline.Run(tmp_path / "p", cfg, log=lambda s: None)
    np.testing.assert_allclose(run.generalist().val_probs, gen.val_probs, atol=1e-5)
    assert run.generalist().model is None and run.clusters().to_json() == tiny.clusters().to_json()
    assert "predictions only" in run.skip_reason("distill") and run.skip_reason("compute_matched")
    m = run.run_all()
    assert {r["name"] for r in m["comparison"]} == {"generalist", "kl"} and m["student"] is None
    assert set(m["skipped"]) == {"compute_matched", "distill"} and m["cost"]["flops"] is None
    assert all(s.initialised_from == "scratch" for s in run.specialists())
    assert json.loads((run.folder / "metrics.json").read_text())["skipped"]["distill"].startswith("generalist_from=")
    assert "No student: generalist_from=" in (run.folder / "report.html").read_text()


# ------------------------------------------------------------------------------------------- bad input


def _no_generalist_written(run: pipeline.Run) -> bool:
    return not (run.stage_dir("generalist") / "done.json").exists() and not list(
        run.stage_dir("generalist").glob("logits_*")
    )


def test_weights_for_another_architecture_or_class_count_name_the_file_and_the_fix(tmp_path, one_thread):
    other = tmp_path / "r18.pth"
    torch.save(torchvision.models.get_model("resnet18", weights=None, num_classes=62).state_dict(), other)
    run = pipeline.Run(tmp_path / "x", _cfg(f"torchvision:{ARCH}:{other}"), log=lambda s: None)
    with pytest.raises(
        byog.GeneralistSourceError, match=rf"weights file {other} does not fit torchvision '{ARCH}'.*torchvision:<arch>"
    ):
        run.generalist()
    assert _no_generalist_written(run)
    ten = tmp_path / "ten.pth"
    torch.save(torchvision.models.get_model(ARCH, weights=None, num_classes=10).state_dict(), ten)
    run = pipeline.Run(tmp_path / "y", _cfg(f"torchvision:{ARCH}:{ten}"), log=lambda s: None)
    with pytest.raises(
        byog.GeneralistSourceError, match=rf"{ten} has a 10-class classifier.*the dataset has 62 classes"
    ):
        run.generalist()
    assert _no_generalist_written(run)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(byog.GeneralistSourceError, match="weights_only=True"):
        pipeline.Run(tmp_path / "z", _cfg(f"torchvision:{ARCH}:{junk}"), log=lambda s: None).generalist()


def test_bad_generalist_from_values_fail_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="is not understood; write torchvision:<arch>"):
        _cfg("resnet18.pth")
    with pytest.raises(ConfigError, match="torchvision:<arch>:<weights file>"):
        _cfg("torchvision:/w.pth")
    run = pipeline.Run(tmp_path / "m", _cfg(f"predictions:{tmp_path / 'missing.npz'}"), log=lambda s: None)
    with pytest.raises(ConfigError, match="missing.npz does not exist"):
        run.generalist()


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return {"val": rng.integers(0, 5, 12), "test": rng.integers(0, 5, 9)}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("test_probs"), r"lacks test_probs \(or test_logits\) and test_labels"),
        (
            lambda a: a.update(val_probs=a["val_probs"][:, :4] / a["val_probs"][:, :4].sum(1, keepdims=True)),
            r"val_probs has shape \(12, 4\), i.e. 4 classes, the dataset has 5 classes",
        ),
        (
            lambda a: a.update(val_labels=a["val_labels"][::-1].copy()),
            r"val_labels differ from the dataset's val labels \(row \d+",
        ),
        (
            lambda a: a.update(test_probs=a["test_probs"][:-1], test_labels=a["test_labels"][:-1]),
            r"test_probs has 8 rows, test_labels 8, the dataset's test split 9 images",
        ),
        (lambda a: a.update(val_probs=a["val_probs"] * 3), r"rows of val_probs do not sum to 1.*val_logits"),
        (
            lambda a: a.update(class_names=np.array(["e", "d", "c", "b", "a"])),
            r"class_names .* differ from the dataset's",
        ),
    ],
)
def test_predictions_file_mismatches_name_the_file_both_counts_and_the_fix(tmp_path, labels, change, message):
    rng = np.random.default_rng(1)
    arrays = {f"{s}_probs": rng.dirichlet(np.ones(5), len(y)) for s, y in labels.items()}
    arrays.update({f"{s}_labels": y for s, y in labels.items()}, class_names=np.array(list("abcde")))
    change(arrays)
    path = tmp_path / "p.npz"
    np.savez(path, **arrays)
    with pytest.raises(byog.GeneralistSourceError, match=message) as err:
        byog.load_predictions(path, labels=labels, class_names=tuple("abcde"))
    assert str(path) in str(err.value)


def test_logits_file_round_trips_and_predictions_forbid_soft_targets(tmp_path, labels):
    z = {s: np.random.default_rng(2).normal(size=(len(y), 5)) for s, y in labels.items()}
    path = byog.save_predictions(tmp_path / "l.npz", probs=z, labels=labels, logits=True)
    out = byog.load_predictions(path, labels=labels, class_names=tuple("abcde"))
    np.testing.assert_allclose(pipeline.softmax(out["val"]), pipeline.softmax(z["val"]), atol=1e-6)
    run = pipeline.Run(
        tmp_path / "s",
        PipelineConfig.quick(**{**QUIET, "generalist_from": f"predictions:{path}", "specialist_soft_weight": 0.5}),
        log=lambda s: None,
    )
    with pytest.raises(
        ConfigError, match="specialist_soft_weight=0.5 needs the generalist's soft targets.*set it to 0"
    ):
        pipeline.preflight(run)


def test_torchvision_classifier_head_surgery_on_each_final_layer_kind(one_thread):
    for arch, prefix in (("resnet18", "fc."), (ARCH, "classifier.3.")):
        net = torchvision.models.get_model(arch, weights=None, num_classes=6).eval()
        m = models.build_model(
            models.ModelConfig(name=f"torchvision:{arch}", num_classes=6, in_channels=3, image_size=16)
        )
        m.load_torchvision_state(net.state_dict())
        assert m._head_prefix == prefix and isinstance(m.head, torch.nn.Linear)
        x = torch.rand(2, 3, 16, 16)
        spec = specialists.init_from_generalist(m.eval(), [1, 4])
        with torch.no_grad():
            p = torch.softmax(net((x - 0.5) / 0.5), 1).numpy()
            q = torch.softmax(spec.eval()(x), 1).numpy()
        np.testing.assert_allclose(q, specialists.collapse_probs(p, [1, 4]), atol=1e-5)
        assert training.predict_logits(m, x).shape == (2, 6)


def test_a_scripted_model_over_another_class_count_names_the_file_and_both_counts(tmp_path, one_thread):
    ten = models.build_model(models.ModelConfig(num_classes=10, in_channels=1, image_size=16, width=4, depth=1)).eval()
    path = tmp_path / "ten.pt"
    torch.jit.save(torch.jit.trace(ten, torch.rand(2, 1, 16, 16)), path)
    run = pipeline.Run(tmp_path / "t", _cfg(f"torchscript:{path}", generalist_normalize="none"), log=lambda s: None)
    with pytest.raises(
        byog.GeneralistSourceError, match=rf"{path} gives outputs of shape \(\d+, 10\) .* expected \(\d+, 62\)"
    ):
        run.generalist()
    assert _no_generalist_written(run)
