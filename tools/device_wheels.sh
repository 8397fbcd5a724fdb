#!/usr/bin/env bash
# The packages a lent GPU machine lacks, as wheels in .whl/ (git ignores it), for tools/device_check.sh to install
# there: that machine has PyTorch, numpy, scipy, scikit-learn, pandas, matplotlib, pillow, tqdm, numba and pytest,
# and no network. All the wheels here are pure Python. Run once, here: bash tools/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
# name==version as this checkout's venv has them (the versions the suite passed with)
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("plotly", "narwhals", "umap-learn", "pynndescent", "submitit")))
PYEOF
)
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
ls -s .whl
