#!/usr/bin/env bash
# Fill wheels/ with what the GPU machine lacks for scripts/gpu_check.sh: it has Python 3.12, torch, accelerate,
# transformers, safetensors, psutil, pyyaml, tqdm and pytest, but no diffusers (nor importlib_metadata, which diffusers
# needs) and no internet. Run it here, where pip reaches PyPI; wheels/ is git-ignored and travels as a carried path
# (device tool: carry=["wheels"]). Both wheels are pure Python (py3-none-any), about 6.4 MB together.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p wheels
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheels \
    diffusers==0.42.1 importlib_metadata==8.7.0
ls -l wheels
