#!/usr/bin/env bash
# The GPU check on the lent machine as it is (see bench/README.md, "GPU check"):
#   - its own python3 with its torch and triton (no venv, no registry: nothing downloaded);
#   - Python packages it lacks come as wheels in .whl/ (carried), installed with --no-index
#     into /tmp/site (what the engine and the kernel tests import is already there);
#   - bench/gpu_check.py runs every step in a child with its own time limit and writes logs,
#     <step>.json, summary.json and summary.md (the README table) under $OUT.
#
#   bash bench/gpu_check.sh                 # on the device (OUT=dir; default bench/results)
#   bash bench/gpu_check.sh --cpu-dry-run   # here: the same steps in the Triton interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "${1:-}" != "--cpu-dry-run" ]; then
    unset TRITON_INTERPRET
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >"$OUT/wheels.log" 2>&1 \
        || { echo "carried wheels failed to install:"; tail -5 "$OUT/wheels.log"; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_check.py --out "$OUT" "$@"
