"""The recipe of the ``ensembles`` stage: every combination rule's distribution on the validation and test splits
(``ensembles/q_<split>_<rule>.npy``). The rules themselves (activation, ``kl``, ``kl_calibrated``,
``top_confident``, ``moe``, calibration) are :mod:`specialkit.ensemble`'s; this module only applies them to a
run's saved outputs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import ensemble, runs, specialists

__all__ = ["activation_of", "combine_for", "calibrations_of", "make_ensembles"]


def activation_of(run: Any, split: str) -> np.ndarray:
    """(N, M) bool: which of ``run``'s specialists the generalist's top-n classes switch on (and, with
    ``skip_threshold > 0``, whose group holds at least that much of the generalist's mass; with
    ``skip_confident < 1``, none for an image whose top-1 probability exceeds it; with ``max_active > 0``, at most
    that many per image, those whose group holds the most mass).

    Args:
        run: the run.
        split: ``"val"`` or ``"test"``.

    Returns:
        The activation mask.
    """
    c = run.config
    return ensemble.activation(
        run.generalist().probs(split),
        run.groups(),
        top_n=c.top_n,
        threshold=c.skip_threshold,
        confident=c.skip_confident,
        max_active=c.max_active,
    )


def combine_for(run: Any, rule: str, split: str) -> np.ndarray:
    """(N, C) combined distribution of ``rule`` on ``split`` (``val``/``test``) of ``run``.

    Args:
        run: the run.
        rule: one of ``config.RULES``.
        split: ``"val"`` or ``"test"``.

    Returns:
        The distribution.
    """
    c = run.config
    p_gen = run.generalist().probs(split)
    if rule == "generalist":
        return p_gen
    outs = [
        ensemble.SpecialistOutputs(classes=g, probs=p) for g, p in zip(run.groups(), specialists.probs_of(run, split))
    ]
    if rule == "kl":
        return ensemble.combine("kl", p_gen, outs, active=activation_of(run, split))
    if rule == "kl_calibrated":  # calibrated evidence is this rule's definition, whatever calibrate_specialists says
        return ensemble.combine(
            "kl_calibrated", p_gen, outs, active=activation_of(run, split), calibration=calibrations_of(run)
        )
    cal = calibrations_of(run) if c.calibrate_specialists else None
    if rule == "top_confident":
        active = activation_of(run, split) if c.top_confident_gated else None
        return ensemble.combine("top_confident", p_gen, outs, n=c.top_confident_n, active=active, calibration=cal)
    return ensemble.combine(rule, p_gen, outs, threshold=c.moe_threshold, calibration=cal)


def calibrations_of(run: Any) -> list[ensemble.Calibration]:
    """Per specialist of ``run``, its temperature and mean output fitted on the validation images (never the test set):
    how ``kl_calibrated`` (always) and ``top_confident`` and ``moe`` (with ``calibrate_specialists``) read it as
    evidence.

    Args:
        run: the run.

    Returns:
        One calibration per specialist (remembered by the run).
    """

    def make() -> list[ensemble.Calibration]:
        y_val = run.dataset().split("val")[1].numpy()
        return [ensemble.calibrate(p, g, y_val) for g, p in zip(run.groups(), specialists.probs_of(run, "val"))]

    return run.memo("calibrations", make)


def make_ensembles(run: Any) -> dict[str, np.ndarray]:
    """Stage 4: every rule's (N, C) test distribution of ``run`` (saved as ``ensembles/q_<split>_<rule>.npy``).

    Args:
        run: the run.

    Returns:
        Rule -> its test distribution.
    """
    key, folder = run.key("ensembles"), run.stage_dir("ensembles")
    if not run.is_done("ensembles", key):
        t0 = time.perf_counter()
        run.begin(folder, key)
        for rule in run.config.rules:
            for split in ("val", "test"):
                runs.save_array(folder / f"q_{split}_{rule}.npy", combine_for(run, rule, split))
        run.add_time("ensembles", time.perf_counter() - t0)
        run.finish(folder, key, rules=list(run.config.rules))
    return {rule: runs.load_array(folder / f"q_test_{rule}.npy") for rule in run.config.rules}
