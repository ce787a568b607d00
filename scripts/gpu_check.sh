#!/usr/bin/env bash
# The GPU check in one command, on a machine with an NVIDIA GPU (< 8 minutes on one H100/H200):
#   bash scripts/gpu_check.sh            # or: bash scripts/gpu_check.sh --dry-run  (the same steps on the CPU)
# It installs what that machine lacks from wheels/ (filled here by scripts/fetch_gpu_wheels.sh: the GPU machine has
# no internet), then runs scripts/gpu_check.py: the CUDA tests, the Flux-like bench, the ordering check, and prints
# a PASS/FAIL table. The JSON report goes to $OUT/gpu_check.json when $OUT is set (the device tool's output folder),
# else to ./gpu-check-out/. Extra arguments go to gpu_check.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${ACCEL_NVME_GPU_SITE:-/tmp/accel-nvme-gpu-site}
REPORT_DIR=${OUT:-$PWD/gpu-check-out}
LIMIT_S=${GPU_CHECK_LIMIT_S:-470}

if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    if ! compgen -G "wheels/*.whl" >/dev/null; then
        echo "gpu_check.sh: diffusers is not installed and wheels/ has no wheels;" \
             "run scripts/fetch_gpu_wheels.sh where pip can reach PyPI and carry wheels/ along" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$REPORT_DIR"
"$PYTHON" -c "import accelerate, diffusers, torch, transformers; print('gpu_check.sh: torch', torch.__version__, \
'| accelerate', accelerate.__version__, '| transformers', transformers.__version__, '| diffusers', \
diffusers.__version__, '| cuda', torch.cuda.is_available())"
exec timeout "$LIMIT_S" "$PYTHON" scripts/gpu_check.py --json "$REPORT_DIR/gpu_check.json" "$@"
