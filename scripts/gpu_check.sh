#!/usr/bin/env bash
# The GPU check in one command, on a machine with an NVIDIA GPU (< 8 minutes on one H100/H200):
#   bash scripts/gpu_check.sh            # or: bash scripts/gpu_check.sh --dry-run  (the same steps on the CPU)
#   bash scripts/gpu_check.sh --negative-control wait_event   # the ordering rows must then FAIL
# It installs diffusers from wheels/ when the machine lacks it and wheels/ was carried (scripts/fetch_gpu_wheels.sh;
# without either, the diffusers comparison, information only, is skipped), then runs scripts/gpu_check.py: the CUDA
# tests, the MoE check (a tiny Qwen3-MoE: only routed experts go to the GPU), the Flux-like bench, the ordering checks
# and their negative controls, each within its own time budget, and prints a PASS/FAIL table whatever fails. The JSON
# report goes to $OUT/gpu_check.json when $OUT is set (the device tool's output folder), else to ./gpu-check-out/.
# Extra arguments go to gpu_check.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${ACCEL_NVME_GPU_SITE:-/tmp/accel-nvme-gpu-site}
REPORT_DIR=${OUT:-$PWD/gpu-check-out}
LIMIT_S=${GPU_CHECK_LIMIT_S:-500}  # the budgets (tests 160, moe 20, bench 180, ordering 90), start-up, margin

if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    if compgen -G "wheels/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            wheels/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check.sh: no diffusers and no wheels/: the diffusers comparison (information only) is skipped" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$REPORT_DIR"
"$PYTHON" -c "import importlib.util as u, accelerate, torch, transformers; \
d = u.find_spec('diffusers') and __import__('diffusers').__version__; \
print('gpu_check.sh: torch', torch.__version__, '| accelerate', accelerate.__version__, '| transformers', \
transformers.__version__, '| diffusers', d, '| cuda', torch.cuda.is_available())"
exec timeout -k 20 "$LIMIT_S" "$PYTHON" scripts/gpu_check.py --json "$REPORT_DIR/gpu_check.json" "$@"
