"""A run's config.json: written once, never silently replaced; notebooks 02-06 open the run notebook 01 made."""

from __future__ import annotations

import json

import numpy as np
import pytest

from specialkit import cli, pipeline
from specialkit.config import SMOKE_ENV, ConfigError, PipelineConfig

TINY = {
    "per_class": 12,
    "epochs": 1,
    "specialist_epochs": 1,
    "student_epochs": 1,
    "k": 4,
    "compute_matched": False,
    "student_matched": False,
}


def _quiet(s: str) -> None:
    pass


def test_config_json_is_written_once_and_equal_settings_write_nothing(tmp_path):
    folder = tmp_path / "r"
    pipeline.Run(folder, PipelineConfig.quick(**TINY), log=_quiet)
    path = folder / "config.json"
    assert PipelineConfig.load(path) == PipelineConfig.quick(**TINY)
    before = path.stat()
    pipeline.Run(folder, PipelineConfig.quick(**TINY), log=_quiet)
    run = pipeline.Run.open(folder, log=_quiet)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # atomic writes replace the inode
    assert run.config == PipelineConfig.quick(**TINY)


def test_different_settings_raise_naming_the_keys_unless_overwrite(tmp_path):
    folder = tmp_path / "r"
    pipeline.Run(folder, PipelineConfig.quick(**TINY), log=_quiet)
    changed = PipelineConfig.quick(**{**TINY, "k": 5, "seed": 3})
    with pytest.raises(
        ConfigError, match=r"records other settings \(k: 4 there, 5 here, seed: 0 there, 3 here\).*overwrite=True"
    ):
        pipeline.Run(folder, changed, log=_quiet)
    assert PipelineConfig.load(folder / "config.json").k == 4
    pipeline.Run(folder, changed, overwrite=True, log=_quiet)
    assert PipelineConfig.load(folder / "config.json") == changed


def test_a_run_written_before_a_setting_existed_opens_without_overwrite(tmp_path):
    """A setting added later is missing from an old config.json: at its default it is no difference (an upgrade of
    the kit keeps old runs usable); at another value it is one, naming the key."""
    import json

    folder = tmp_path / "old"
    pipeline.Run(folder, PipelineConfig.quick(**TINY), log=_quiet)
    recorded = json.loads((folder / "config.json").read_text())
    for key in ("calibrate_specialists", "hard_label_control"):
        del recorded[key]
    (folder / "config.json").write_text(json.dumps(recorded))
    pipeline.Run(folder, PipelineConfig.quick(**TINY), log=_quiet)  # no error, nothing rewritten
    assert "calibrate_specialists" not in json.loads((folder / "config.json").read_text())
    with pytest.raises(
        ConfigError, match=r"records other settings \(hard_label_control: '\(missing\)' there, False here\)"
    ):
        pipeline.Run(folder, PipelineConfig.quick(**{**TINY, "hard_label_control": False}), log=_quiet)


def test_with_settings_records_the_change_and_returns_the_same_run_when_nothing_changes(tmp_path):
    run = pipeline.Run(tmp_path / "r", PipelineConfig.quick(**TINY), log=_quiet)
    assert run.with_settings(k=4) is run
    run6 = run.with_settings(k=6)
    assert run6.config.k == 6 and pipeline.Run.open(run.folder, log=_quiet).config.k == 6
    with pytest.raises(ConfigError, match="unknown key 'kk'; did you mean k"):
        run.with_settings(kk=6)


def test_opening_a_missing_run_says_to_run_notebook_01_first(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"is not a run yet \(no config.json\): run notebook 01 first, or `specialkit run"
    ):
        pipeline.Run.open(tmp_path / "nothing", log=_quiet)
    monkeypatch.setenv(SMOKE_ENV, "0")
    with pytest.raises(ConfigError, match="run notebook 01 first"):
        pipeline.open_run(tmp_path / "nothing", log=_quiet)
    assert not (tmp_path / "nothing").exists()
    monkeypatch.setenv(SMOKE_ENV, "1")
    run = pipeline.open_run(tmp_path / "made", log=_quiet)
    assert run.config == PipelineConfig.quick(name="made") and (tmp_path / "made" / "config.json").is_file()


def test_settings_table_shows_what_differs_from_the_defaults():
    table = pipeline.settings_table(PipelineConfig(k=5, name="x"))
    assert table.loc["k", "value"] == 5 and table.loc["k", "default"] == 8
    assert set(table.index) == {"name", "dataset", "k"}


def test_cli_refuses_to_change_an_existing_run_without_overwrite(tmp_path, capsys):
    pipeline.Run(tmp_path / "quick", PipelineConfig.quick(**TINY), log=_quiet)
    args = ["run", "--quick", "--out", str(tmp_path), "--per-class", "12", "--epochs", "1", "--k", "5"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("specialkit: error: ") and "records other settings (" in err and "k: 4 there, 5 here" in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "quick" / "generalist").exists()
    assert cli.build_parser().parse_args(args + ["--overwrite"]).overwrite is True


@pytest.mark.slow
def test_notebook_03_to_04_with_a_changed_k_and_an_edited_spec_trains_the_edited_groups(tmp_path, one_thread):
    """The calls notebooks 01, 03 and 04 make, in order: 03 changes k and saves a hand edit; 04 opens the run."""
    from specialkit.widgets import ClusterPicker

    folder = tmp_path / "quick"
    pipeline.Run(folder, PipelineConfig.quick(**TINY), log=_quiet).generalist()  # notebook 01

    run = pipeline.open_run(folder, log=_quiet).with_settings(k=3)  # notebook 03
    picker = ClusterPicker.from_run(run)
    assert picker.spec.num_groups == 3
    first, second = list(picker.spec.groups)[:2]
    moved = picker.spec.groups[first][0]
    assert picker.edit("move", [moved], second)
    edited = picker.spec
    picker.save()
    assert json.loads((folder / "config.json").read_text())["k"] == 3

    with pytest.raises(ConfigError, match="k: 3 there, 4 here"):  # what the old notebook 04 did: a fresh config
        pipeline.Run(folder, PipelineConfig.quick(**TINY), log=_quiet)
    run4 = pipeline.open_run(folder, log=_quiet)  # notebook 04
    assert run4.config.k == 3 and run4.is_done("clusters")
    assert run4.clusters() == edited
    sps = run4.specialists()
    assert [sp.class_names for sp in sps] == [tuple(m) for m in edited.groups.values()]
    assert moved in sps[1].class_names and moved not in sps[0].class_names
    assert [np.asarray(sp.classes).tolist() for sp in sps] == [g.tolist() for g in edited.indices()]
