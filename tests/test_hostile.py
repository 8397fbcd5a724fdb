"""Hostile input and hostile storage (issue 11): every case ends in one line naming the problem and the
fix, a non-zero exit code, and nothing half-written trusted later.

Full and read-only storage use a real tmpfs mount where this machine allows ``mount`` (root in a
container with the capability); elsewhere the same tests simulate the failing system calls with
``OSError(ENOSPC)`` / ``OSError(EROFS)``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specialkit import cli, clusters, data, pipeline, runs
from specialkit.config import ConfigError, PipelineConfig

TINY = dict(
    per_class=4,
    epochs=1,
    specialist_epochs=1,
    student_epochs=1,
    k=2,
    width=4,
    depth=1,
    compute_matched=False,
    student_matched=False,
    rules=("generalist", "kl"),
    progress=False,
)
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def _can_mount() -> bool:
    d = tempfile.mkdtemp()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", d], check=True)
        return ok
    except FileNotFoundError:
        return False
    finally:
        os.rmdir(d)


MOUNT = os.environ.get("SPECIALKIT_TEST_SIMULATE_FS") != "1" and _can_mount()  # set it to test the simulated path


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr": "0.1"}, "lr='0.1' must be a number, not str '0.1'; write 0.1 without quotes"),
        ({"lr": float("nan")}, "lr=nan must be a finite number"),
        ({"specialist_temperature": float("inf")}, "specialist_temperature=inf must be a finite number"),
        ({"per_class": 2.5}, "per_class=2.5 must be a whole number"),
        ({"epochs": 3.0}, "epochs=3.0 must be a whole number; write 3 instead of 3.0"),
        ({"k": True}, "k=True must be a whole number"),
        ({"progress": "no"}, "progress='no' must be true or false"),
        ({"rules": "kl"}, "rules='kl' must be a list of strings, not str; write [\"kl\"]"),
        ({"rules": ("generalist", 3)}, "element 3 must be a string"),
        ({"image_size": 0}, "image_size=0 must be >= 1"),
        ({"seed": -1}, "seeds must lie in 0.."),
        ({"seed": 2**40}, "seeds must lie in 0.."),
        ({"name": 7}, "name=7 must be a string"),
        ({"extra": []}, "extra=[] must be an object"),
    ],
)
def test_config_values_are_checked_against_their_types(changes, message):
    with pytest.raises(ConfigError) as err:
        PipelineConfig().replace(**changes)
    assert message in str(err.value)


def test_nan_in_a_config_file_is_rejected_naming_the_key(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text('{"lr": NaN, "k": 3}')  # Python's json reads NaN; strict writing would fail much later
    with pytest.raises(ConfigError, match="lr=nan must be a finite number"):
        PipelineConfig.load(path)
    path.write_text('{"per_class": 2.5}')
    assert cli.main(["run", "--config", str(path), "--write-config", str(tmp_path / "o.json")]) == 2
    assert "per_class=2.5 must be a whole number" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o.json").exists()


def test_one_class_dataset_needs_at_least_two_classes(tmp_path, capsys):
    root = tmp_path / "images"
    (root / "only").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(root / "only" / f"{i}.png")
    with pytest.raises(ConfigError, match="has 1 class; a run needs at least 2 classes"):
        pipeline.Run(
            tmp_path / "r", PipelineConfig.quick(dataset="imagefolder", root=str(root), **TINY), log=lambda s: None
        ).dataset()
    code = cli.main(
        ["run", "--quick", "--dataset", "imagefolder", "--root", str(root), "--out", str(tmp_path / "runs"), "--k", "1"]
    )
    assert code == 2 and "a run needs at least 2 classes" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs" / "quick" / "generalist").exists()


# ------------------------------------------------------------------------------------------- clusters
def test_single_class_group_is_rejected_and_sparse_coverage_warned():
    names = tuple("abcdefgh")
    single = clusters.ClusterSpec({"g0": ("a", "b"), "lonely": ("c",)}, names)
    with pytest.raises(
        clusters.ClusterSpecError, match=r"'lonely' \(\['c'\]\) have fewer than 2 classes.*add a confusable class"
    ):
        clusters.check_trainable(single)
    sparse = clusters.ClusterSpec({"g0": ("a", "b"), "g1": ("c", "d", "e")}, names)
    assert clusters.check_trainable(sparse) is sparse and clusters.coverage_warning(sparse) is None  # 3 of 8 uncovered
    sparser = clusters.ClusterSpec({"g0": ("a", "b"), "g1": ("c", "d")}, names)
    assert "4 of 8 classes" not in (clusters.coverage_warning(sparser) or "")  # exactly half: no warning
    tiny = clusters.ClusterSpec({"g0": ("a", "b")}, names)
    warning = clusters.coverage_warning(tiny)
    assert warning and "6 of 8 classes are in no group" in warning


def test_single_class_group_is_refused_by_a_run_and_a_sparse_spec_logged(tiny, tmp_path):
    said: list[str] = []
    shutil.copytree(tiny.folder, tmp_path / "r")
    run = pipeline.Run.open(tmp_path / "r", log=said.append)
    names = run.dataset().class_names
    bad = clusters.ClusterSpec({"pair": names[:2], "one": names[2:3]}, names)
    with pytest.raises(clusters.ClusterSpecError, match="fewer than 2 classes"):
        run.save_clusters(bad)
    path = run.folder / "clusters.json"
    path.write_text(bad.to_json())  # edited by hand: refused when the run reads it
    with pytest.raises(clusters.ClusterSpecError, match=r"clusters\.json: group\(s\) 'one'"):
        pipeline.Run.open(run.folder, log=said.append).clusters()
    run.save_clusters(clusters.ClusterSpec({"a": names[:2], "b": names[2:4]}, names))
    assert any("58 of 62 classes are in no group" in s for s in said)


# ------------------------------------------------------------------------------------------- images
def test_mixed_size_and_mode_folder_comes_out_square_and_true(tmp_path):
    root = tmp_path / "mixed"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    Image.fromarray(np.full((12, 24, 3), 100, np.uint8)).save(root / "a" / "0_wide.png")  # first file: 12 x 24
    Image.fromarray(np.full((30, 30), 30000, np.uint16)).save(root / "a" / "1_deep.png")  # 16-bit grey
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: composited over white, not black garbage
    Image.fromarray(rgba, "RGBA").save(root / "a" / "2_clear.png")
    Image.fromarray(np.full((24, 24), 50, np.uint8), "L").save(root / "b" / "0_grey.png")
    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).convert("P").save(root / "b" / "1_pal.png")
    Image.fromarray(np.full((24, 24, 3), 70, np.uint8)).convert("CMYK").save(root / "b" / "2_cmyk.jpg")
    ds = data.load("imagefolder", root=root, val_fraction=0.34, test_fraction=0.34, seed=0)
    x = np.concatenate([ds.x_train.numpy(), ds.x_val.numpy(), ds.x_test.numpy()])
    assert x.shape[1:] == (3, 24, 24)  # a square of the first image's longer side, not 12 x 24
    assert "3x24x24 px" in ds.summary()
    means = sorted(round(float(img.mean())) for img in x)
    assert 117 in means or 116 in means  # 30000 / 257 = 116.7, not clipped to 255
    assert 255 in means  # the transparent image: white
    assert all(0 < m <= 255 for m in means)
    grey = data.load("imagefolder", root=root, channels=1, size=(8, 6), val_fraction=0.34, test_fraction=0.34)
    assert grey.x_train.shape[1:] == (1, 8, 6) and "1x8x6 px" in grey.summary()


# ------------------------------------------------------------------------------------------- storage
def test_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    args = [
        "run",
        "--quick",
        "--no-progress",
        "--per-class",
        "4",
        "--epochs",
        "1",
        "--width",
        "4",
        "--depth",
        "1",
        "--k",
        "2",
    ]
    if MOUNT:
        with _tmpfs(tmp_path / "small", "40k") as out:  # room for config.json, not for the generalist's files
            proc = subprocess.run(
                [sys.executable, "-m", "specialkit.cli", *args, "--out", str(out)],
                capture_output=True,
                text=True,
                env=ENV,
                timeout=300,
            )
            line = _one_line(proc.stderr)
            folder = out / "quick"
            assert proc.returncode == 1
            assert not list(folder.rglob("*.tmp")) and not list(folder.rglob(".*.tmp"))
            assert not pipeline.Run.open(folder, log=lambda s: None).is_done("generalist")
    else:
        real_fsync = os.fsync

        def full(fd):
            if os.fstat(fd).st_size > 20_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", full)
        assert cli.main([*args, "--out", str(tmp_path / "runs")]) == 1
        line = _one_line(capsys.readouterr().err)
        assert not list((tmp_path / "runs").rglob("*.tmp"))
    assert "No space left on device" in line and "generalist" in line and "free some space" in line


@contextlib.contextmanager
def _read_only(folder: Path, monkeypatch):
    """``folder`` on read-only storage: a read-only tmpfs when mount works, else EROFS from the system calls."""
    if MOUNT:
        shutil.move(str(folder), str(folder) + ".src")
        with _tmpfs(folder, "20m"):
            for p in Path(str(folder) + ".src").iterdir():
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, folder / p.name)
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            yield
        return

    def refuse(name: str, real):
        def wrapped(path, *a, **kw):
            flags = a[0] if a and name == "open" else kw.get("flags", os.O_WRONLY)
            if str(path).startswith(str(folder)) and (name != "open" or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *a, **kw)

        return wrapped

    for name in ("open", "mkdir", "unlink", "rename", "replace", "rmdir"):
        monkeypatch.setattr(os, name, refuse(name, getattr(os, name)))
    yield
    monkeypatch.undo()


def test_read_only_run_folder(tiny, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny.folder, tmp_path / "r")
    folder = tmp_path / "r"
    run = pipeline.Run.open(folder, log=lambda s: None)
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    with _read_only(folder, monkeypatch):
        with pytest.raises(runs.RunFileError, match="Read-only file system"):
            runs.atomic_write_text(folder / "probe", "x")  # the storage really refuses writes
        with runs.RunLock(folder) as lock:
            assert not lock.held  # nobody can write here, so nothing to guard
        fresh = pipeline.Run.__new__(pipeline.Run)  # reading a finished run writes nothing
        fresh.__dict__.update(run.__dict__, _memo={})
        assert fresh.generalist().test_probs.shape[1] == 62
        assert len(fresh.specialists()) == 2 and fresh.is_done("specialists")
        assert cli.main(["ensembles", "--run", str(folder)]) == 1  # it must write: one line, path and reason
        line = _one_line(capsys.readouterr().err)
        assert "Read-only file system" in line and str(folder) in line
        after = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    assert after == before


def test_permission_denied_keeps_the_previous_file(tmp_path, monkeypatch):
    path = runs.atomic_write_json(tmp_path / "metrics.json", {"a": 1})

    def denied(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(
        runs.RunFileError, match=r"cannot write \S*metrics\.json: Permission denied \(permission denied; make"
    ):
        runs.atomic_write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_file_name_too_long_and_out_pointing_at_a_file(tmp_path, capsys):
    with pytest.raises(runs.RunFileError, match="File name too long.*use shorter names"):
        runs.atomic_write_text(tmp_path / ("g" * 300 + ".json"), "{}")
    (tmp_path / "afile").write_text("")
    assert cli.main(["run", "--quick", "--out", str(tmp_path / "afile")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--out {tmp_path / 'afile'} is a file, not a folder" in line


# ------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path):
    out = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "specialkit.cli",
        "run",
        "--quick",
        "--no-progress",
        "--out",
        str(out),
        "--per-class",
        "4",
        "--epochs",
        "20000",  # far longer than the test waits: the run cannot finish before the signal, even on a loaded machine
        "--width",
        "4",
        "--depth",
        "1",
        "--k",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not (out / "quick" / "generalist" / "key.txt").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    assert _one_line(err) == "specialkit: interrupted — rerun the same command to resume"
    with runs.RunLock(out / "quick") as lock:  # the lock went with the process
        assert lock.held
    assert not (out / "quick" / "generalist" / "done.json").exists()


# ------------------------------------------------------------------------------------------- predictions labels
@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([0.0, np.inf]), r"val_labels holds values that are not whole numbers \(1 of them; row 1: [^)]*inf"),
        (np.array([np.nan, 1.0]), r"val_labels holds values that are not whole numbers \(1 of them; row 0: [^)]*nan"),
        (np.array(["0", "1"]), r"val_labels holds <U1 values, not numbers"),
    ],
)
def test_predictions_labels_that_are_not_class_indices_are_refused(tmp_path, labels, message):
    """Infinite, NaN and text labels are refused naming key and row (an infinity once became int64's minimum)."""
    from specialkit import byog

    probs = np.full((2, 2), 0.5)
    path = tmp_path / "p.npz"
    np.savez(path, val_probs=probs, val_labels=labels, test_probs=probs, test_labels=np.array([0, 1]))
    with pytest.raises(byog.GeneralistSourceError, match=message):
        byog.load_predictions(path, labels={"val": np.array([0, 1]), "test": np.array([0, 1])}, class_names=("a", "b"))


def test_class_names_saved_as_an_object_array_are_refused_without_unpickling(tmp_path, capsys):
    """class_names built from Python objects (e.g. a pandas column) would need pickle: one line naming the key."""
    probs, y = np.full((2, 2), 0.5), np.array([0, 1])
    path = tmp_path / "p.npz"
    np.savez(
        path,
        val_probs=probs,
        val_labels=y,
        test_probs=probs,
        test_labels=y,
        class_names=np.array(["a", None], dtype=object),
    )
    assert (
        cli.main(
            [
                "run",
                "--quick",
                "--no-progress",
                "--per-class",
                "4",
                "--out",
                str(tmp_path / "runs"),
                "--generalist-from",
                f"predictions:{path}",
            ]
        )
        == 2
    )
    line = _one_line(capsys.readouterr().err)
    assert (
        "class_names holds Python objects (an object array), which the kit never unpickles" in line
        and "dtype=str" in line
    )
    assert "allow_pickle" not in line and not (tmp_path / "runs" / "quick" / "generalist" / "done.json").exists()
