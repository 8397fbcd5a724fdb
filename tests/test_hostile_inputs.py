"""The last hostile inputs (issue 19), each through the command line: brought programs are trusted on purpose
(and said to run their own code), bad brought models and prediction files are refused before anything is saved,
a data root is not left through a link, an ImageNet test split does not shrink silently, an unfinished run is one
line naming the stage and its command, and too few classes name the settings that fix it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_streaming import write_imagenet

from specialkit import cli, study
from specialkit.config import PipelineConfig

TINY = [
    "--quick",
    "--no-progress",
    "--per-class",
    "4",
    "--epochs",
    "1",
    "--specialist-epochs",
    "1",
    "--student-epochs",
    "1",
    "--k",
    "2",
    "--width",
    "4",
    "--depth",
    "1",
    "--image-size",
    "16",
]


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class _Nan(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 62), float("nan"))


class _Cnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16 * 16, 62)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


# ------------------------------------------------------------------------------------------- brought models
def test_a_torchscript_generalist_is_said_to_run_its_own_code(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(_Cnn().eval()), path)
    rc, out, _ = _cli(
        capsys,
        "run",
        *TINY,
        "--out",
        tmp_path / "runs",
        "--generalist-from",
        f"torchscript:{path}",
        "--generalist-normalize",
        "none",
    )
    assert rc == 0
    warning = [ln for ln in out.splitlines() if "runs the code it holds" in ln]
    assert warning and str(path) in warning[0] and "bring only files you trust" in warning[0]
    assert "torchvision:" in warning[0]  # the weights-only alternative is named
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "programs that run their own code" in " ".join(capsys.readouterr().out.split())


def test_a_brought_model_that_outputs_nan_is_refused_and_nothing_is_saved(tmp_path, capsys):
    path = tmp_path / "nan.pt"
    torch.jit.save(torch.jit.script(_Nan()), path)
    rc, _, err = _cli(
        capsys,
        "run",
        *TINY,
        "--out",
        tmp_path / "runs",
        "--generalist-from",
        f"torchscript:{path}",
        "--generalist-normalize",
        "none",
    )
    assert rc == 2
    line = _one_line(err)
    assert (
        re.search(r"nan.pt gives NaN or infinite outputs for (\d+) of \1 images", line) and "nothing was saved" in line
    )
    folder = tmp_path / "runs" / "quick" / "generalist"
    assert not (folder / "done.json").exists() and not list(folder.glob("logits_*")) if folder.exists() else True


def _predictions(tmp_path: Path, **change) -> Path:
    """A predictions file over the quick glyphs run's val/test splits (labels from the dataset itself)."""
    from specialkit import data

    cfg = PipelineConfig.quick(per_class=4, image_size=16)
    ds = data.load(
        cfg.dataset, per_class=cfg.per_class, image_size=cfg.image_size, seed=cfg.seed, val_fraction=cfg.val_fraction
    )
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("val", "test"):
        y = ds.split(split)[1].numpy()
        arrays[f"{split}_probs"] = rng.dirichlet(np.ones(62), len(y))
        arrays[f"{split}_labels"] = y
    arrays.update(change)
    path = tmp_path / "preds.npz"
    np.savez(path, **arrays)
    return path


def test_a_predictions_file_with_object_arrays_is_refused_without_unpickling(tmp_path, capsys):
    path = _predictions(tmp_path, val_probs=np.array([{"x": 1}, None], dtype=object))
    rc, _, err = _cli(capsys, "run", *TINY, "--out", tmp_path / "runs", "--generalist-from", f"predictions:{path}")
    assert rc == 2
    line = _one_line(err)
    assert "val_probs holds Python objects" in line and "never unpickles" in line and str(path) in line


def test_labels_that_are_not_whole_numbers_are_refused_not_truncated(tmp_path, capsys):
    good = _predictions(tmp_path)
    with np.load(good) as z:
        y = z["val_labels"].astype(np.float64)
    y[3] += 0.4
    path = _predictions(tmp_path, val_labels=y)
    rc, _, err = _cli(capsys, "run", *TINY, "--out", tmp_path / "runs", "--generalist-from", f"predictions:{path}")
    assert rc == 2
    line = _one_line(err)
    assert (
        "val_labels holds values that are not whole numbers (1 of them; row 3:" in line
        and "save them as integers" in line
    )
    whole = _predictions(tmp_path, val_labels=np.floor(y))  # 3.0 is 3: whole floats are accepted
    rc, _, err = _cli(capsys, "generalist", "--run", tmp_path / "none")
    assert rc == 2 and "no such run folder" in err
    from specialkit import byog

    with np.load(whole) as z:
        labels = {"val": z["val_labels"].astype(np.int64), "test": z["test_labels"]}
    assert set(byog.load_predictions(whole, labels=labels, class_names=tuple(str(i) for i in range(62)))) == {
        "val",
        "test",
    }


# ------------------------------------------------------------------------------------------- data roots
def _folder(root: Path, classes: int = 5, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_links_out_of_the_data_root_are_refused_naming_link_and_target(tmp_path, capsys, streaming):
    root = _folder(tmp_path / "data")
    outside = _folder(tmp_path / "elsewhere", classes=1)
    (root / "c0" / "linked.png").symlink_to(outside / "c0" / "0.png")
    budget = ["--memory-budget-gb", "0.000001"] if streaming else []
    args = ["run", "--dataset", "imagefolder", "--root", root, "--no-progress", "--out", tmp_path / "runs", *budget]
    rc, _, err = _cli(capsys, *args)
    assert rc == 2
    line = _one_line(err)
    assert (
        f"{root / 'c0' / 'linked.png'} is a symbolic link to {outside / 'c0' / '0.png'}" in line
        and "outside the data root" in line
    )
    (root / "c0" / "linked.png").unlink()
    (root / "c9").symlink_to(outside / "c0", target_is_directory=True)  # a linked class folder too
    rc, _, err = _cli(capsys, *args)
    assert rc == 2 and f"{root / 'c9'} is a symbolic link to {outside / 'c0'}" in _one_line(err)
    (root / "c9").unlink()
    inside = tmp_path / "data" / "c1" / "again.png"  # a link that stays inside the root is fine
    inside.symlink_to(root / "c1" / "0.png")
    from specialkit import loaders

    loaders.check_inside_root("imagefolder", root, {"all": ([inside], torch.zeros(1))})


def test_an_imagenet_test_split_that_would_shrink_is_refused_with_counts(tmp_path, capsys):
    root = write_imagenet(tmp_path / "in", per_class=2)
    csv = root / "LOC_val_solution.csv"
    rows = csv.read_text().splitlines()
    csv.write_text("\n".join(rows[:5]) + "\n")  # 4 of the val images listed
    n_val = len(list((root / "val").glob("*.JPEG")))
    rc, _, err = _cli(
        capsys, "run", "--dataset", "imagenet", "--root", root, "--no-progress", "--out", tmp_path / "runs"
    )
    assert rc == 2
    line = _one_line(err)
    assert f"holds {n_val} images but {csv} lists only 4 of them" in line and f"lose {n_val - 4}" in line


def test_too_few_classes_name_the_settings_that_fix_it(tmp_path, capsys):
    root = _folder(tmp_path / "five")
    base = [
        "run",
        "--dataset",
        "imagefolder",
        "--root",
        root,
        "--no-progress",
        "--epochs",
        "1",
        "--width",
        "4",
        "--depth",
        "1",
        "--specialist-epochs",
        "1",
        "--student-epochs",
        "1",
        "--image-size",
        "16",
    ]
    rc, _, err = _cli(capsys, *base, "--out", tmp_path / "a")
    assert rc == 2 and "k=8 groups is too many for 5 classes" in _one_line(err) and "use k <= 2" in err
    rc, _, err = _cli(capsys, *base, "--out", tmp_path / "b", "--k", "2")
    assert rc == 2
    line = _one_line(err)
    assert "hold all 5 classes" in line and "overlap=none (now top_r; --overlap none)" in line
    assert not (tmp_path / "b" / "quick" / "clusters.json").exists()  # nothing half-made is kept as done
    rc, _, _ = _cli(capsys, *base, "--out", tmp_path / "c", "--k", "2", "--overlap", "none")
    assert rc == 0


# ------------------------------------------------------------------------------------------- unfinished runs
def test_report_of_an_unfinished_run_is_one_line_and_the_stage_command_retrains(tmp_path, capsys):
    assert _cli(capsys, "run", *TINY, "--out", tmp_path)[0] == 0
    run = tmp_path / "quick"
    model = run / "generalist" / "model.pt"
    model.write_bytes(bytes(model.stat().st_size))  # a corrupt checkpoint of the right size: its error gives the advice
    rc, _, err = _cli(capsys, "report", "--run", run)
    line = _one_line(err)
    assert rc == 2 and f"delete {model} and run `specialkit generalist --run {run}`" in line
    model.unlink()  # following the advice
    rc, _, err = _cli(capsys, "report", "--run", run)
    line = _one_line(err)
    assert rc == 2 and "no finished 'generalist' stage" in line and f"`specialkit generalist --run {run}`" in line
    spec_model = next((run / "specialists").glob("*/model.pt"))
    spec_model.unlink()
    assert _cli(capsys, "distill", "--run", run)[0] == 0  # the stages up to distill: the deleted ones are trained again
    assert model.is_file() and spec_model.is_file()
    rc, out, _ = _cli(capsys, "report", "--run", run)
    assert rc == 0 and "report:" in out


# ------------------------------------------------------------------------------------------- studies
def test_a_study_never_suggests_an_overwrite_it_does_not_have(tmp_path, capsys):
    base = tmp_path / "base.json"
    PipelineConfig.from_dict(study.quick_spec().base).save(base)
    point = tmp_path / "s" / "k-2" / "seed-0"
    point.mkdir(parents=True)
    other = {**json.loads(base.read_text()), "epochs": 7}
    (point / "config.json").write_text(json.dumps(other))
    rc, _, err = _cli(
        capsys,
        "study",
        "--base",
        base,
        "--grid",
        "k=2",
        "--seeds",
        "0",
        "--name",
        "s",
        "--out",
        tmp_path,
        "--threads",
        "1",
    )
    line = [ln for ln in err.splitlines() if ln.startswith("specialkit: error")]
    assert rc == 2 and len(line) == 1 and "Traceback" not in err
    assert f"{point} holds a run with other settings (" in line[0] and "epochs" in line[0] and "--overwrite" not in err
    assert json.loads((point / "config.json").read_text())["epochs"] == 7  # nothing of it was touched
