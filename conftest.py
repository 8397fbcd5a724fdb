"""Project-wide pytest set-up: quick mode for notebooks and a private data cache per test session."""

import os
import tempfile

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
# Notebooks (and the browser test's kernel) write their run folder here, fresh for each test session.
os.environ.setdefault("SPECIALKIT_RUNS", tempfile.mkdtemp(prefix="specialkit-runs-"))
