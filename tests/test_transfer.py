"""``specialkit transfer``: linear probes on a run's frozen features, on another dataset, with intervals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from specialkit import cli, pipeline, transfer


@pytest.fixture(scope="module")
def distilled(tiny, tmp_path_factory):
    """A copy of the tiny run with its student trained (the shared fixture itself stays untouched)."""
    folder = tmp_path_factory.mktemp("t") / "quick"
    shutil.copytree(tiny.folder, folder)
    run = pipeline.Run.open(folder, log=lambda s: None)
    run.distill()
    return run


def test_transfer_command_writes_probe_accuracies_with_intervals_and_paired_comparisons(distilled, capsys):
    assert cli.main(["transfer", "--run", str(distilled.folder), "--target", "glyphs_hard"]) == 0
    out = capsys.readouterr().out
    result = json.loads(transfer.result_path(distilled, "glyphs_hard").read_text())
    names = [m["name"] for m in result["models"]]
    assert names == ["pixels", "generalist", "student", "specialists"] and result["not_probed"] == {}
    dims = {m["name"]: m["feature_dim"] for m in result["models"]}
    spec_dim = sum(s.model.feature_dim for s in distilled.specialists())  # every specialist's features, concatenated
    assert dims == {"pixels": 32 * 32, "generalist": 4, "student": 4, "specialists": spec_dim}
    for m in result["models"]:
        lo, hi = m["accuracy_ci"]
        assert 0 <= lo <= m["accuracy"] <= hi <= 1
    assert len(result["comparisons"]) == 6  # every pair of the four extractors
    for r in result["comparisons"]:
        assert r["gain_ci"][0] <= r["gain"] <= r["gain_ci"][1] and 0 <= r["p_value"] <= 1
        assert r["verdict"] in ("better", "worse", "indistinguishable")
    assert result["num_classes"] == 62 and result["test"] == 62 and "specialists" in out and "McNemar" in out
    again = transfer.transfer(distilled, "glyphs_hard", log=lambda s: None)  # same seed -> same numbers
    assert again["models"] == result["models"]


def test_transfer_refuses_the_runs_own_data_and_unfinished_stages(tiny, tmp_path, capsys):
    assert cli.main(["transfer", "--run", str(tiny.folder), "--target", "glyphs"]) == 2
    assert "is the run's own dataset: choose another one" in capsys.readouterr().err
    assert cli.main(["transfer", "--run", str(tiny.folder), "--target", "nope"]) == 2
    assert "is not a dataset; choose one of" in capsys.readouterr().err
    with pytest.raises(transfer.TransferError, match="no finished 'distill' stage.*trains none"):
        transfer.extractors(tiny)
    assert not transfer.result_path(tiny, "glyphs_hard").exists()


def test_adapt_images_matches_the_runs_channels_and_size():
    grey = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    rgb = transfer.adapt_images(grey, channels=3, image_size=32)
    assert rgb.shape == (3, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = transfer.adapt_images(rgb, channels=1, image_size=32)  # RGB -> grey: the mean of equal channels
    assert back.shape == (3, 1, 32, 32) and torch.equal(back[:, 0], rgb[:, 0])
