#!/usr/bin/env bash
# The version matrix of tox.ini: the conformance suite, the entry points and the end-to-end workflows under
#   floor         the oldest versions pyproject.toml declares (torch 2.5: PyPI's CUDA build, run on the CPU),
#   gpu-versions  the GPU machine's (accelerate 1.15, transformers 5.17),
#   newest        the newest releases (torch: 2.13.0, the CPU build).
# Usage: scripts/version_matrix.sh [env,...] [-- pytest options]   (default: all three; ~15 min each on 2 CPUs)
# Needs tox (installed into .venv-tox when missing). Not part of .ci/run: it does not fit its 15 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
envs=floor,gpu-versions,newest
if [ $# -gt 0 ] && [ "$1" != "--" ]; then envs=$1; shift; fi
tox=$(command -v tox || true)
if [ -z "$tox" ]; then
    [ -x .venv-tox/bin/tox ] || { python3 -m venv .venv-tox && .venv-tox/bin/pip install -q tox; } || exit 1
    tox=.venv-tox/bin/tox
fi
exec "$tox" -e "$envs" "$@"
