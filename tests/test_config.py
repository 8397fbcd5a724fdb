import json
from pathlib import Path

import pytest

from specialkit import cli
from specialkit.config import ConfigError, PipelineConfig, smoke_mode


def test_defaults_round_trip_through_json(tmp_path):
    cfg = PipelineConfig(k=5, rules=["generalist", "kl"])
    cfg.save(tmp_path / "c.json")
    again = PipelineConfig.load(tmp_path / "c.json")
    assert again == cfg and again.rules == ("generalist", "kl")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"kk": 3}, "unknown key 'kk'; did you mean k"),
        ({"k": 0}, "k=0 must be a whole number >= 1"),
        ({"top_n": 0}, "top_n=0 must be a whole number >= 1"),
        ({"method": "dbscan"}, "method='dbscan' is not one of"),
        ({"rules": ("generalist", "vote")}, "unknown rule 'vote'"),
        ({"rules": ("kl",)}, "must include 'generalist'"),
        ({"special_fraction": 1.0}, "special_fraction=1.0 is out of range"),
        ({"name": "../x"}, "plain folder name"),
        ({"device": "tpu"}, "device='tpu' is not one of"),
    ],
)
def test_impossible_values_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PipelineConfig().replace(**changes)


def test_class_count_checks():
    PipelineConfig(k=31).validate(62)
    with pytest.raises(ConfigError, match="k=32 groups is too many for 62 classes.*k <= 31"):
        PipelineConfig(k=32).validate(62)
    with pytest.raises(ConfigError, match="top_n=70 exceeds the 62 classes"):
        PipelineConfig(top_n=70).validate(62)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        PipelineConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PipelineConfig.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        PipelineConfig.load(tmp_path / "list.json")


def test_smoke_switch(monkeypatch):
    monkeypatch.setenv("SPECIALKIT_SMOKE", "1")
    assert smoke_mode() and PipelineConfig.from_env().name == "quick"
    monkeypatch.setenv("SPECIALKIT_SMOKE", "0")
    assert not smoke_mode() and PipelineConfig.from_env(k=3) == PipelineConfig(k=3)


def test_cli_flags_override_config_file(tmp_path):
    PipelineConfig(k=4, epochs=2).save(tmp_path / "c.json")
    args = cli.build_parser().parse_args(["run", "--config", str(tmp_path / "c.json"), "--k", "5", "--specialist-epochs", "7"])
    cfg = cli.config_from_args(args)
    assert (cfg.k, cfg.epochs, cfg.specialist_epochs) == (5, 2, 7)


def test_cli_write_config_and_errors(tmp_path, capsys):
    out = tmp_path / "w.json"
    assert cli.main(["run", "--quick", "--k", "3", "--write-config", str(out)]) == 0
    assert json.loads(out.read_text())["k"] == 3
    assert cli.main(["run", "--k", "0", "--write-config", str(out)]) == 2
    assert "k=0 must be a whole number" in capsys.readouterr().err
    assert cli.main(["run", "--dataset", "imagenet"]) == 2
    assert "dataset='imagenet' is unknown" in capsys.readouterr().err


def test_demo_config_is_the_defaults():
    assert PipelineConfig.load(Path(__file__).resolve().parents[1] / "configs" / "demo.json") == PipelineConfig()
