"""Fixtures shared by the unit tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and steady when another process shares the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """Generalist, clusters and both specialists of a tiny run (seconds), for the run-folder tests to copy."""
    from specialkit import pipeline
    from specialkit.config import PipelineConfig

    cfg = PipelineConfig.preset("tiny", compute_matched=False, rules=("generalist", "kl"))
    run = pipeline.Run(tmp_path_factory.mktemp("tiny") / "quick", cfg, log=lambda s: None)
    run.specialists()
    return run
