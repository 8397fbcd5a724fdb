#!/usr/bin/env bash
# The GPU checks of a lent device machine, in one call: the quick pipeline, the training-throughput bench, the
# inference-cost bench (issue 22's ratios: its kind on a real run where tools/device_wheels.sh copied one, else the
# bench's default setting) and the DDP tests, all on CUDA. Each step's whole log lands in $OUT (what
# comes back); a failing step is reported with its log's tail and the next one runs.
#
#   here, once:     bash tools/device_wheels.sh          (the packages that machine lacks, into .whl/)
#   device call:    command "bash tools/device_check.sh", carry [".whl"], timeout_s 540
#   to try it here: DEVICE=cpu PYTHON=.venv/bin/python bash tools/device_check.sh
#
# The DDP tests run two processes on one GPU, which NCCL refuses: SPECIALKIT_DIST_BACKEND=gloo (specialkit.distributed)
# shares the GPU between them. STEP_TIMEOUT (default 200 s) bounds each step.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg SPECIALKIT_CACHE="$OUT/cache"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() {  # step NAME COMMAND...: run it under STEP_TIMEOUT, log to $OUT/NAME.log, print its rc, time and tail
    local name=$1 start=$SECONDS rc
    shift
    echo "== $name: $*"
    timeout "${STEP_TIMEOUT:-200}" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: rc $rc in $((SECONDS - start)) s (log: $name.log)"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step env "$PYTHON" -c "import torch, specialkit; cuda = torch.cuda.is_available(); \
print('torch', torch.__version__, 'specialkit', specialkit.__version__, \
torch.cuda.get_device_name() if cuda else 'no CUDA'); assert cuda or '$DEVICE' == 'cpu', 'no CUDA here'"
step quick "$PYTHON" -m specialkit.cli run --quick --out "$OUT/runs" --set device="$DEVICE" progress=false html_report=false
step throughput "$PYTHON" bench/train_throughput.py --device "$DEVICE" --repeats 2
if [ -f .whl/run/config.json ]; then  # issue 22's kind on the run tools/device_wheels.sh copied, its real routing
    step inference "$PYTHON" bench/inference_cost.py --device "$DEVICE" --run .whl/run --shared-stages 1 --delta-rank 8 \
        --skip-confident 0.7 --max-active 1 --images-small 64 --images-large 1024 --repeats 3
else
    step inference "$PYTHON" bench/inference_cost.py --device "$DEVICE" --images-small 64 --images-large 512 --repeats 3
fi
step ddp env SPECIALKIT_DIST_BACKEND=gloo "$PYTHON" -m pytest -o addopts="" -p no:cacheprovider -q tests/test_distributed.py
echo "== $failed step(s) failed; logs in $OUT"
exit "$failed"
