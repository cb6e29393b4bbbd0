#!/usr/bin/env bash
# The GPU check in one call: the kernels' CUDA tests, then benchmarks/gpu.py.
#
# 1. Here, with network, in the repository root (once): fetch the peers that the GPU image
#    lacks (ema-pytorch, diffusers, torch_ema; timm is there) as wheels into .whl/:
#        bash benchmarks/gpu_check.sh --fetch-wheels
# 2. On the GPU machine, in one device call (about 5 minutes; logs come back from $OUT):
#        run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=330)
#    Extra arguments go to gpu.py (e.g. --quick).
set -u -o pipefail

if [ "${1:-}" = "--fetch-wheels" ]; then
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        ema-pytorch==0.8.3 diffusers==0.42.1 torch_ema==0.3 importlib_metadata==8.7.0
    exit
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
# inductor's and Triton's caches survive between the tests and the benchmark
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"

echo "== CUDA tests (kernels) =="
timeout 100 python3 -m pytest -q -p no:randomly -p no:cacheprovider tests/test_kernels.py \
    -k cuda -rs 2>&1 | tee "$OUT/tests.log"

echo "== benchmarks/gpu.py =="
timeout 200 python3 benchmarks/gpu.py "$@" 2>&1 | tee "$OUT/gpu.log"
echo "gpu.py exit: $?"
