#!/usr/bin/env bash
# The packages a lent GPU machine lacks, as wheels in .whl/ (git ignores it), for tools/device_check.sh to install
# there: that machine has PyTorch, numpy, scipy, scikit-learn, pandas, matplotlib, pillow, tqdm, numba and pytest,
# and no network. All the wheels here are pure Python. Run once, here: bash tools/device_wheels.sh [RUN]
# With a finished glyphs_hard run here (RUN, default the regime study's runs/regimes/dataset-glyphs_hard/seed-0), the
# files of it that bench/inference_cost.py --run reads (settings, groups, generalist; 2 MB) go to .whl/run/, so that
# the device times issue 22's kind with that run's real routing.
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
run=${1:-runs/regimes/dataset-glyphs_hard/seed-0}
if [ -f "$run/generalist/done.json" ] && [ -f "$run/clusters.json" ]; then
    rm -rf .whl/run && mkdir -p .whl/run/generalist
    cp -r "$run/config.json" "$run/clusters.json" "$run/clusters" .whl/run/
    cp "$run"/generalist/{done.json,key.txt,model.pt,logits_test.npy,logits_val.npy} .whl/run/generalist/
    echo "the run $run (its generalist and groups) copied to .whl/run"
else
    echo "no finished run at $run (make study makes one): the device times the bench's default setting instead"
fi
ls -s .whl
