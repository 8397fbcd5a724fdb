import json
from dataclasses import fields
from pathlib import Path

import pytest

from specialkit import cli, pipeline
from specialkit import config as config_mod
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
    args = cli.build_parser().parse_args(
        ["run", "--config", str(tmp_path / "c.json"), "--k", "5", "--specialist-epochs", "7"]
    )
    cfg = cli.config_from_args(args)
    assert (cfg.k, cfg.epochs, cfg.specialist_epochs) == (5, 2, 7)


def test_cli_write_config_and_errors(tmp_path, capsys):
    out = tmp_path / "w.json"
    assert cli.main(["run", "--quick", "--k", "3", "--write-config", str(out)]) == 0
    assert json.loads(out.read_text())["k"] == 3
    assert cli.main(["run", "--k", "0", "--write-config", str(out)]) == 2
    assert "k=0 must be a whole number" in capsys.readouterr().err
    assert cli.main(["run", "--dataset", "imagenet21k"]) == 2
    assert "dataset='imagenet21k' is unknown" in capsys.readouterr().err


def test_demo_config_is_the_defaults():
    assert PipelineConfig.load(Path(__file__).resolve().parents[1] / "configs" / "demo.json") == PipelineConfig()


# ------------------------------------------------------------------ routing by field metadata

# _KEYS as it was written by hand before it was derived (temperature renamed specialist_temperature)
_KEYS_BY_HAND = {
    "data": ("dataset", "root", "image_size", "per_class", "val_fraction", "data_seed"),
    "generalist": (
        "seed",
        "model",
        "width",
        "depth",
        "epochs",
        "batch_size",
        "lr",
        "optimizer",
        "schedule",
        "weight_decay",
        "label_smoothing",
    ),
    "clusters": ("method", "distance", "k", "overlap", "gamma", "top_r", "max_group_size"),
    "specialists": (
        "specialist_model",
        "specialist_width",
        "specialist_depth",
        "specialist_epochs",
        "specialist_lr",
        "special_fraction",
        "specialist_soft_weight",
        "specialist_temperature",
        "dustbin_correction",
        "specialist_shared_stages",
        "specialist_delta_rank",
        "specialist_init",
    ),
    "compute_matched": ("compute_match",),
    "ensembles": (
        "top_n",
        "rules",
        "top_confident_n",
        "top_confident_gated",
        "moe_threshold",
        "skip_threshold",
        "skip_confident",
        "max_active",
        "calibrate_specialists",
    ),
    "distill": (
        "student_init",
        "student_width",
        "student_depth",
        "student_epochs",
        "distill_temperature",
        "distill_soft_weight",
        "distill_mixup",
    ),
}


def test_every_setting_has_a_stage_from_the_allowed_set():
    stages = {f.name: f.metadata.get("stage") for f in fields(PipelineConfig)}
    assert not {n: s for n, s in stages.items() if s not in config_mod.SETTING_STAGES}
    assert (
        stages["seed"] == "generalist" and stages["data_seed"] == "data" and stages["bootstrap_resamples"] == "metrics"
    )
    assert {n for n, s in stages.items() if s == "run"} == {
        "name",
        "device",
        "seeds",
        "progress",
        "extra",
        "html_report",
    }
    assert config_mod.stage_of("specialist_temperature") == "specialists"
    with pytest.raises(ConfigError, match="unknown setting 'temperature'"):
        config_mod.stage_of("temperature")
    with pytest.raises(ValueError, match="stage 'specialist' is not one of data, generalist"):
        config_mod._setting(1, "specialist")


def test_stage_keys_derived_from_metadata_equal_the_mapping_written_by_hand():
    derived = pipeline._KEYS
    assert list(derived) == list(_KEYS_BY_HAND) == list(config_mod.KEY_STAGES)
    assert {s: sorted(v) for s, v in derived.items()} == {s: sorted(v) for s, v in _KEYS_BY_HAND.items()}
    assert all(len(set(v)) == len(v) for v in derived.values())
    # settings of a key stage kept out of its key on purpose
    outside = {
        f.name
        for f in fields(PipelineConfig)
        if f.metadata["stage"] in config_mod.KEY_STAGES and not f.metadata["in_key"]
    }
    assert outside == {
        "download",
        "clusters_file",
        "compute_matched",
        "in_memory",
        "memory_budget_gb",
        "stream_workers",
        "generalist_from",
        "generalist_normalize",
        "generalist_input_size",
        "hard_label_control",
        "student_matched",
    }


# Run.key / Run.specialist_key values computed with the hand-written _KEYS (and the key `temperature`)
# before this change: the derived keys and the rename must leave every trained stage valid. The ensembles keys
# changed on purpose once since (pipeline.ENSEMBLE_RULES = 2: top_confident and moe read calibrated specialists as
# evidence), so a stored ensembles stage made by the old rules is recomputed; every other stage stays valid. The
# hard_label_student stage (issue 20) was added later with its own keys. The compute_matched keys changed on purpose
# too (stages: budget_version 2, issue 20 part 4: the budget counts training FLOPs as the loop spends them, so a
# compute-matched generalist trained for the old budget is trained again; were 0e2e2cbb6acbd256 / 2629d56133cec2a2).
# The default rules gained kl_calibrated (issue 20 part 1), and rules are an ensembles setting: the ensembles keys
# (were 85e468b7faff0f77 / ba9d596219bf15aa) and the distill keys downstream of them (were 6cc0a4492b448b9f /
# 1f6157bb7e66bf46) changed with them. The student_matched stage (issue 20) was added later with its own keys.
_PINNED_KEYS = {
    "default": {
        "generalist": "fc96c39988425598",
        "clusters": "8a5cae68889deac2",
        "specialists": "1d55fe9da57a959f",
        "compute_matched": "e186d4fb25725f59",
        "ensembles": "e5a704f5c26705dc",
        "distill": "233c358add20c34b",
        "specialist_1": "26b88b549c9ecc03",
        "hard_label_student": "67e148b96c32ca50",
        "student_matched": "e732f40bb3ab6e25",
    },
    "quick": {
        "generalist": "d304bbecffeee6f8",
        "clusters": "9f32639b49ddf5d0",
        "specialists": "2a95c80fb8b8a66d",
        "compute_matched": "9e4a65c53a14b7ac",
        "ensembles": "79d7e0856583bf15",
        "distill": "b3a9cc3908cd5aa3",
        "specialist_1": "78d9bcb38442a4a6",
        "hard_label_student": "edeada663ca2243e",
        "student_matched": "ad5965233ca31b43",
    },
}


def test_cache_keys_are_the_same_as_before_the_routing_and_the_rename(tmp_path, monkeypatch):
    from specialkit.clusters import ClusterSpec

    spec = ClusterSpec(groups={"g0": ("a", "b"), "g1": ("c", "d")}, class_names=("a", "b", "c", "d"))
    monkeypatch.setattr(pipeline.Run, "clusters", lambda self: spec)
    odds = {"dustbin_correction": "odds"}  # the default when the keys were pinned (now prior_match)
    configs = {
        "default": PipelineConfig(**odds),
        "quick": PipelineConfig.quick(  # student_epochs: the quick preset's value when the keys were pinned (now 3)
            specialist_temperature=3.0, seed=4, k=3, top_n=2, distill_temperature=2.0, student_epochs=6, **odds
        ),
    }
    for label, cfg in configs.items():
        run = pipeline.Run(tmp_path / label, cfg, log=lambda _: None)
        got = {s: run.key(s) for s in pipeline.STAGES} | {"specialist_1": run.specialist_key(1)}
        assert got == _PINNED_KEYS[label], label
    # the order of the settings within a stage does not enter the hash (json sort_keys)
    monkeypatch.setattr(pipeline, "_KEYS", {s: tuple(reversed(v)) for s, v in pipeline._KEYS.items()})
    assert (
        pipeline.Run(tmp_path / "default", configs["default"], log=lambda _: None).key("distill")
        == _PINNED_KEYS["default"]["distill"]
    )
    # settings added later (key_if_set) enter the key only when set, and then change it
    shared = pipeline.Run(tmp_path / "shared", PipelineConfig(specialist_shared_stages=2, **odds), log=lambda _: None)
    assert shared.settings("specialists")["specialist_shared_stages"] == 2
    assert shared.key("specialists") != _PINNED_KEYS["default"]["specialists"]
    # the specialists' temperature is hashed under its old name, and still changes the key
    run = pipeline.Run(tmp_path / "t3", PipelineConfig(specialist_temperature=3.0, **odds), log=lambda _: None)
    assert (
        run.settings("specialists")["temperature"] == 3.0
        and run.key("specialists") != _PINNED_KEYS["default"]["specialists"]
    )


def test_cli_flags_are_the_settings_with_a_cli_help():
    knobs = cli._KNOBS
    assert list(knobs) == [f.name for f in fields(PipelineConfig) if "cli" in f.metadata]
    assert set(knobs) == {
        "name",
        "dataset",
        "root",
        "image_size",
        "per_class",
        "model",
        "width",
        "depth",
        "epochs",
        "batch_size",
        "lr",
        "generalist_from",
        "generalist_normalize",
        "generalist_input_size",
        "method",
        "k",
        "overlap",
        "clusters_file",
        "specialist_model",
        "specialist_width",
        "specialist_depth",
        "specialist_epochs",
        "specialist_soft_weight",
        "specialist_temperature",
        "specialist_shared_stages",
        "specialist_delta_rank",
        "specialist_init",
        "top_n",
        "skip_threshold",
        "skip_confident",
        "max_active",
        "student_epochs",
        "device",
        "seed",
        "memory_budget_gb",
        "stream_workers",
    }
    assert knobs["image_size"] == (int, "resize images to this side, e.g. 32")
    assert knobs["specialist_soft_weight"] == (
        float,
        "weight of the generalist's soft targets for specialists (paper §6)",
    )
    assert knobs["clusters_file"][0] is str and knobs["seed"] == (int, "random seed")
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "--specialist-temperature" in help_text and "--temperature " not in help_text
    args = cli.build_parser().parse_args(["run", "--specialist-temperature", "3.5", "--image-size", "16"])
    cfg = cli.config_from_args(args)
    assert (cfg.specialist_temperature, cfg.image_size) == (3.5, 16)


def test_a_cli_help_on_a_setting_a_flag_cannot_carry_is_refused():
    assert config_mod._flag_type(int | None, "per_class") is int
    with pytest.raises(TypeError, match="PipelineConfig.rules has a cli help but type"):
        config_mod._flag_type(tuple[str, ...], "rules")


def test_choices_in_the_metadata_are_what_validate_checks():
    with_choices = {f.name: f.metadata["choices"] for f in fields(PipelineConfig) if "choices" in f.metadata}
    assert set(with_choices) == {
        "optimizer",
        "schedule",
        "method",
        "distance",
        "overlap",
        "dustbin_correction",
        "compute_match",
        "student_init",
        "device",
        "specialist_init",
        "generalist_normalize",
    }
    for name, options in with_choices.items():
        assert getattr(PipelineConfig(), name) in options
        with pytest.raises(ConfigError, match=f"{name}='nope' is not one of {', '.join(options)}"):
            PipelineConfig().replace(**{name: "nope"})


def test_the_old_temperature_key_is_refused_naming_its_new_name(tmp_path, capsys):
    message = "key 'temperature' was renamed to 'specialist_temperature'; write 'specialist_temperature' instead"
    with pytest.raises(ConfigError, match=message):
        PipelineConfig.from_dict({"temperature": 2.0})
    with pytest.raises(ConfigError, match=message):
        PipelineConfig().replace(temperature=3.0)
    old = PipelineConfig().to_dict()
    old["temperature"] = old.pop("specialist_temperature")
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=f"old.json: {message}"):
        PipelineConfig.load(tmp_path / "old.json")
    assert cli.main(["run", "--config", str(tmp_path / "old.json"), "--write-config", str(tmp_path / "w.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "w.json").exists()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--temperature", "2"])


def test_the_usage_settings_table_is_the_one_the_metadata_makes():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "USAGE.md").read_text()
    block = readme.split("<!-- settings:start -->\n")[1].split("\n<!-- settings:end -->")[0]
    assert block == config_mod.settings_markdown(), "regenerate it: python tools/update_readme.py"
    assert (
        "`specialist_temperature` (`--specialist-temperature`)" in block
        and "`clusters_file` (`--clusters-file`)*" in block
    )
    assert block.count("\n| ") == len(config_mod.SETTING_STAGES) + 1
