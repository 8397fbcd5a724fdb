"""Named presets and the one ``key=value`` override syntax (issue 21 part 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specialkit import cli, study
from specialkit.config import PRESETS, ConfigError, PipelineConfig, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_the_presets_are_ordered_by_size_and_demo_is_the_demo_config():
    tiny, quick, demo = (PipelineConfig.preset(n) for n in ("tiny", "quick", "demo"))
    assert PipelineConfig.quick() == quick and PipelineConfig.quick(k=3) == PipelineConfig.preset("quick", k=3)
    assert PipelineConfig.load(ROOT / "configs" / "demo.json") == demo
    for field in ("per_class", "epochs", "specialist_epochs", "student_epochs", "k"):
        assert getattr(tiny, field) <= getattr(quick, field) <= getattr(demo, field), field
    assert set(PRESETS) == {"tiny", "quick", "demo"}
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of tiny, quick, demo"):
        PipelineConfig.preset("huge")


def test_key_value_overrides_are_typed_by_the_setting():
    got = parse_overrides(
        ["width=8", "lr=0.1", "clusters-file=null", "rules=generalist,kl", "name=007", "latency=false"]
    )
    assert got == {
        "width": 8,
        "lr": 0.1,
        "clusters_file": None,
        "rules": ("generalist", "kl"),
        "name": "007",
        "latency": False,
    }
    assert PipelineConfig.preset("tiny", **got).rules == ("generalist", "kl")


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["width"], "--set 'width': write key=value"),
        (["widht=8"], "unknown key 'widht'; did you mean width"),
        (["width=8", "width=9"], "gives 'width' twice"),
        (["temperature=2"], "renamed to 'specialist_temperature'"),
    ],
)
def test_a_bad_override_names_the_problem_and_the_fix(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(items)


def test_run_prints_the_resulting_settings_with_set_after_config_and_flags_last(tmp_path, capsys):
    config = tmp_path / "c.json"
    PipelineConfig.preset("demo", width=32, k=5).save(config)
    argv = [
        "run",
        "--config",
        str(config),
        "--preset",
        "tiny",
        "--set",
        "k=3",
        "epochs=2",
        "rules=generalist,kl",
        "--epochs",
        "4",
        "--print-config",
    ]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["width"], printed["k"], printed["epochs"], printed["rules"]) == (32, 3, 4, ["generalist", "kl"])
    assert (
        printed["per_class"] == PipelineConfig().per_class
    )  # the config file holds every key: it wins over the preset
    assert not (tmp_path / "runs").exists()


def test_an_unknown_override_on_the_command_line_is_one_line_and_exit_2(capsys):
    assert cli.main(["run", "--preset", "tiny", "--set", "widht=8", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specialkit: error: --set: unknown key 'widht'; did you mean width") and "\n" not in err


def test_the_study_grid_reads_values_as_set_does():
    assert study.parse_grid(["width=8,16", "distance=soft,hard"]) == {"width": [8, 16], "distance": ["soft", "hard"]}
    assert study._parse_value("per_class", "null") is None and parse_overrides(["per_class=null"]) == {
        "per_class": None
    }
