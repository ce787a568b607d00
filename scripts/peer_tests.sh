#!/usr/bin/env bash
# The peers' own offload tests against the nvme tier: accelerate's tests/test_big_modeling.py and transformers'
# test_disk_offload_bin / test_disk_offload_safetensors, from the sdists of the installed versions (PyPI only), run
# once as the baseline (accelerate's disk tier) and once with every disk offload routed to "nvme".
#
# usage: scripts/peer_tests.sh [baseline|nvme|both] [extra pytest args]     (default: both; also `tox -e peer`)
# env:   PYTHON (default: python), PEER_DIR (work folder, default: a new temp folder; reused sdists are kept),
#        ACCEL_NVME_PATH (an accel_nvme checkout to test instead of this one)
# out:   $PEER_DIR/<suite>-<mode>.xml (junit) and a summary line per run; exit 1 when a run has failures.
set -euo pipefail

MODE=${1:-both}
shift || true
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
PEER_DIR=${PEER_DIR:-$(mktemp -d -t accel-nvme-peer-XXXXXX)}
mkdir -p "$PEER_DIR/sdists"

read -r ACCELERATE TRANSFORMERS < <("$PYTHON" -c \
    "import accelerate, transformers; print(accelerate.__version__, transformers.__version__)")
if [ ! -d "$PEER_DIR/accelerate-$ACCELERATE" ] || [ ! -d "$PEER_DIR/transformers-$TRANSFORMERS" ]; then
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps -d "$PEER_DIR/sdists" \
        "accelerate==$ACCELERATE" "transformers==$TRANSFORMERS"
    tar -xzf "$PEER_DIR/sdists/accelerate-$ACCELERATE.tar.gz" -C "$PEER_DIR"
    tar -xzf "$PEER_DIR/sdists/transformers-$TRANSFORMERS.tar.gz" -C "$PEER_DIR"
fi

# transformers' sdist ships tests/test_modeling_common.py but not the two packages it imports mixins from
# (tests/generation, tests/exporters) nor tests/models: empty mixins stand in (the offload tests use neither).
TESTS="$PEER_DIR/transformers-$TRANSFORMERS/tests"
touch "$TESTS/__init__.py"
for stub in generation/test_utils.py:GenerationTesterMixin exporters/test_export.py:ExportTesterMixin; do
    file=${stub%%:*}
    mkdir -p "$TESTS/$(dirname "$file")"
    touch "$TESTS/$(dirname "$file")/__init__.py"
    [ -f "$TESTS/$file" ] || printf 'class %s:\n    """Stand-in: not in the sdist."""\n' "${stub##*:}" > "$TESTS/$file"
done

status=0
run() {  # run <suite> <mode> <folder> <pytest args...>
    local suite=$1 mode=$2 folder=$3
    shift 3
    local route=0
    [ "$mode" = nvme ] && route=1
    local xml="$PEER_DIR/$suite-$mode.xml"
    (cd "$folder" && ACCEL_NVME_PEER_ROUTE=$route PYTHONPATH="${ACCEL_NVME_PATH:+$ACCEL_NVME_PATH:}$REPO:$REPO/scripts/peer:$REPO/tests:$folder" \
        "$PYTHON" -m pytest -p nvme_route -p no:cacheprovider -q --tb=line --junitxml="$xml" "$@") \
        > "$PEER_DIR/$suite-$mode.log" 2>&1 || status=1
    echo "$suite $mode: $(tail -n 1 "$PEER_DIR/$suite-$mode.log")   (log: $PEER_DIR/$suite-$mode.log)"
}

case $MODE in
    both) modes="baseline nvme" ;;
    baseline | nvme) modes=$MODE ;;
    *) echo "usage: $0 [baseline|nvme|both] [pytest args]" >&2; exit 2 ;;
esac
for mode in $modes; do
    run accelerate "$mode" "$PEER_DIR/accelerate-$ACCELERATE" tests/test_big_modeling.py "$@"
    run transformers "$mode" "$PEER_DIR/transformers-$TRANSFORMERS" \
        "$REPO/scripts/peer/test_transformers_disk_offload.py" -k "test_disk_offload" "$@"
done
exit $status
