"""Project-wide pytest set-up: quick mode for notebooks and a private data cache per test session."""

import os
import tempfile

import pytest

# Notebook kernels started by nbval inherit this environment: every size follows from this switch.
os.environ.setdefault("SPECIALKIT_SMOKE", "1")
os.environ.setdefault("SPECIALKIT_CACHE", os.path.join(tempfile.gettempdir(), "specialkit-test-cache"))
os.environ.setdefault("MPLBACKEND", "Agg")
# Before torch loads (here, in notebook kernels and in the CLI subprocesses that inherit this environment): OpenMP
# threads wait passively, so the suite slows gracefully instead of collapsing when another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The suite's thread budget, set once: one intra-op thread per process (the tests' tensors are tiny, and one thread
# keeps its speed when another process takes the other core). `OMP_NUM_THREADS=2 make test` gives it two.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Notebooks write their run folder here, fresh for each test session; each pytest-xdist worker (which inherits the
# controller's environment) in a folder of its own inside it.
os.environ.setdefault("SPECIALKIT_RUNS", tempfile.mkdtemp(prefix="specialkit-runs-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["SPECIALKIT_RUNS"] = os.path.join(os.environ["SPECIALKIT_RUNS"], os.environ["PYTEST_XDIST_WORKER"])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The notebooks first (stable sort, each order kept): under ``pytest -n 2`` (``make test``) they are the
    longest chain, so one worker starts on them while the other takes the test files."""
    items.sort(key=lambda item: item.path.suffix != ".ipynb")


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist installed, its workers take the units of :class:`_XdistUnits`."""
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistUnits(), "specialkit-xdist-units")


class _XdistUnits:
    """pytest-xdist's unit of work, whatever ``--dist`` says: a whole test file (its module fixtures are built once,
    in one worker), and all the notebooks together, in order, in one worker (each notebook opens the run the ones
    before it made). xdist's own ``--dist loadgroup`` cannot do this under pytest 9.2, which ignores the node ids
    xdist rewrites for it."""

    @pytest.hookimpl
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: object) -> object:
        from xdist.scheduler import LoadScopeScheduling

        class FilesAndNotebooks(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                path = nodeid.split("::", 1)[0]
                return "notebooks" if path.endswith(".ipynb") else path

        config.option.loadscopereorder = False  # keep the collection's order: the notebooks first
        return FilesAndNotebooks(config, log)
