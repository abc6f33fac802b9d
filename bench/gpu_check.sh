#!/usr/bin/env bash
# The GPU figures of issue 17 in one run of at most 10 minutes, written to one JSON file:
#   bench/train_throughput.py for vit_b16_roberta_base.yaml in bf16: FLIP mask 0 and 0.5, compile off
#     and on; samples/s, step time, peak memory and MFU against the device's dense bf16 peak
#   bench/peers.py on the GPU: our step against Chinese-CLIP's CLIP and open_clip's ViT (fp32)
#   bench/loss_memory.py at GPU-sized global batches (16k and 32k)
#   bench/curate_speed.py: curate's scoring against predict.py index encoding, images/s
#
#   bash bench/gpu_check.sh [OUT.json]        (default: gpu_check.json)
#
# Each part has its own time limit, so that one that hangs or runs out of memory costs only its
# share and is recorded as failed. GPU_CHECK_CONFIG / GPU_CHECK_BATCH / GPU_CHECK_PEERS_BATCH change
# the model and batches (a smoke test on a CPU: tiny_synthetic.yaml, small batches).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu_check.json}")
PY=${PYTHON:-python}
CONFIG=${GPU_CHECK_CONFIG:-recipes/configs/vit_b16_roberta_base.yaml}
BATCH=${GPU_CHECK_BATCH:-128}
PEERS_BATCH=${GPU_CHECK_PEERS_BATCH:-64}
PARTS=$(mktemp -d)
START=$(date +%s)

BUDGET=${GPU_CHECK_SECONDS:-570}  # the parts' limits add up to more: a late part gets what is left of 10 minutes

part() {  # part NAME SECONDS command...: run it, keep its JSON (--out) or record why there is none
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    echo '{"error": "not run: the 10-minute budget was spent"}' > "$PARTS/$name.json"
    return
  fi
  echo "== $name (at most ${limit}s)" >&2
  timeout "$limit" "$@" --out "$PARTS/$name.json" > "$PARTS/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    printf '{"error": "exit %s%s", "log_tail": %s}\n' "$rc" "$([ $rc -eq 124 ] && echo ', timed out')" \
      "$(tail -c 2000 "$PARTS/$name.log" | $PY -c 'import json, sys; print(json.dumps(sys.stdin.read()))')" \
      > "$PARTS/$name.json"
  fi
}

for mask in 0.0 0.5; do
  part "train_mask${mask}_eager" 60 $PY bench/train_throughput.py --config "$CONFIG" --batch-size "$BATCH" \
    --steps 10 --warmup 2 data.source=synthetic train.mixed_precision=bf16 model.vision.patch_drop_rate=$mask
  part "train_mask${mask}_compiled" 120 $PY bench/train_throughput.py --config "$CONFIG" --batch-size "$BATCH" \
    --steps 10 --warmup 2 data.source=synthetic train.mixed_precision=bf16 model.vision.patch_drop_rate=$mask \
    train.compile=true
done
part peers 140 $PY bench/peers.py --batch "$PEERS_BATCH" --steps 5
# curate's scoring against predict.py index on the same images (issue 26's goal: at least 0.9x)
part curate_speed 90 $PY bench/curate_speed.py --config "$CONFIG" --images 1000 --workers 8 --batch 256 --repeats 2 \
  --work-dir "$PARTS/curate_speed"
# CPU processes over gloo, as everywhere: the loss's memory at a global batch GPUs train with
part loss_memory 90 $PY bench/loss_memory.py --batches 16384 32768 --losses "clip (local)" "siglip ring" --max-gib 48

$PY - "$PARTS" "$OUT" "$START" <<'PYEOF'
import json, shutil, subprocess, sys, time
from pathlib import Path
parts, out, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
gpu = (subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else "no nvidia-smi")
result = {"gpu": gpu, "seconds": round(time.time() - start),
          **{p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}}
out.write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
PYEOF
