#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md in one call on a lent NVIDIA machine (its image has JAX,
# PyTorch and transformers): `bash bench/gpu.sh [OUT_DIR]`. Each step has its own time limit
# and steps are skipped once the budget is spent; JSON rows and one log land in OUT_DIR.
# PRESET, SEQ_LEN and LOSS_CHUNK shrink it for a dry run on a CPU.
set -u
out=${1:-${OUT:-/tmp/bench-gpu}}
mkdir -p "$out"
log=$out/gpu.log
budget=${BUDGET_S:-450}
start=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The 1B training step needs ~65 GiB: more than JAX's default pool (75 % of the card).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
py=${PYTHON:-python3}
llama=(--preset "${PRESET:-llama-3.2-1b}" --dtype bfloat16)
seq=${SEQ_LEN:-2048}
chunk=${LOSS_CHUNK:-512}

step() {  # step SECONDS NAME COMMAND...: run unless the budget cannot cover SECONDS more
    local limit=$1 name=$2; shift 2
    if (( SECONDS - start + limit > budget )); then
        echo "=== $name: skipped (budget)" | tee -a "$log"; return
    fi
    echo "=== $name ($((SECONDS - start)) s in): $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== $name: exit $? at $((SECONDS - start)) s" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$log" 2>&1
step 30 versions $py -c "import jax, flax, optax, torch, transformers as tf; d = jax.devices()[0]; \
print(jax.__version__, flax.__version__, optax.__version__, torch.__version__, tf.__version__, d.device_kind, \
d.client.platform_version)"
step 90 attention-check $py -m bench.attention_check
# --vs hf runs PyTorch twice, torch.compile (compiled in its warm-up) and eager: longer limits.
step 240 train-unrolled $py -m bench train "${llama[@]}" --seq-len "$seq" --batch-size 8 --no-scan-layers \
    --vs hf --json "$out/h100_train_unrolled_b8.json"
step 80 train-unrolled-chunk $py -m bench train "${llama[@]}" --seq-len "$seq" --batch-size 8 --no-scan-layers \
    --loss-chunk "$chunk" --json "$out/h100_train_unrolled_b8_chunk.json"
step 80 train-scan $py -m bench train "${llama[@]}" --seq-len "$seq" --batch-size 8 \
    --json "$out/h100_train_scan_b8.json"
step 200 decode $py -m bench decode "${llama[@]}" --vs hf --json "$out/h100_decode_bf16.json"
step 60 profile-decode $py -m bench.profile decode "${llama[@]}" --calls 2 --top 12
step 90 profile-train $py -m bench.profile train "${llama[@]}" --seq-len "$seq" --batch-size 8 \
    --no-scan-layers --calls 2 --top 16
grep -E "^(\||device|wall|window|attention=|Traceback|[A-Za-z]*Error)" "$log" | grep -v "^|---"
