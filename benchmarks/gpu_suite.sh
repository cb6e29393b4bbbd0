#!/usr/bin/env bash
# The whole GPU check in one device call (at most about 5.7 minutes): the project's test suite on the
# card, then benchmarks/gpu.py. Every stage has its own timeout, so a hang cannot eat the
# budget; all logs land in $OUT.
#
# 1. Here, with network, in the repository root (once): wheels the GPU image lacks (peers for
#    gpu.py, hypothesis for the property tests) into .whl/:
#        bash benchmarks/gpu_check.sh --fetch-wheels
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#            --implementation cp --platform manylinux2014_x86_64 -d .whl \
#            hypothesis sortedcontainers attrs
# 2. On the GPU machine:
#        run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=380)
#    What to read: $OUT/summary.txt (pytest's last lines, failures and skips by reason,
#    gpu.py's exit), then $OUT/gpu.log (the table).
set -u -o pipefail

OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    timeout 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache

{
    date
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    git log --oneline -1 2>/dev/null
} 2>&1 | tee "$OUT/device.txt"

# Composer's tests need their own venv (make test-composer); skip the folder without it.
ignore=()
python3 -c "import composer" 2>/dev/null || ignore+=(--ignore=tests/composer)

echo "== pytest (whole suite, 8 workers) =="
timeout 180 python3 -m pytest -n 8 tests -p no:cacheprovider -p no:randomly \
    --timeout 120 -v -rfEs "${ignore[@]}" > "$OUT/pytest.log" 2>&1
echo "pytest exit: $?" | tee -a "$OUT/pytest.log"

echo "== benchmarks/gpu.py =="
# Without arguments: the engine's rows and the peers (the kernel-level rows of gpu_check.sh
# are left out to fit the time); pass arguments to choose (e.g. --rows ... --models ...).
if [ $# -eq 0 ]; then
    set -- --reps 10 --rows "lerp_ eager" "CUDA graph: FusedLerp + comp" \
        "emakit.EMA (default: compensated, executor auto)" "emakit.EMA compensated=False" \
        "Store executor=eager + comp" "Store executor=fused + comp" \
        "Store executor=graph" "Store executor=graph + comp" \
        "timm ModelEmaV3" "torch AveragedModel" "ema-pytorch" "diffusers EMAModel" "torch_ema"
fi
timeout 140 python3 benchmarks/gpu.py "$@" > "$OUT/gpu.log" 2>&1
echo "gpu.py exit: $?" | tee -a "$OUT/gpu.log"

{
    cat "$OUT/device.txt"
    echo "--- CUDA tests"; grep -iE "cuda|device_cpu|fsdp2" "$OUT/pytest.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED"
    echo "--- pytest (tail)"; tail -40 "$OUT/pytest.log"
    echo "--- gpu.py"; cat "$OUT/gpu.log"
} > "$OUT/summary.txt" 2>&1
tail -c 11000 "$OUT/summary.txt"
