#!/usr/bin/env bash
# Runs the MNIST pipeline on a GPU and prints throughput and test errors.
# Meant for the device machine, which has no Rust toolchain and no network:
# build the bundle here with bench/gpu-bundle.sh, then run (device tool)
#   bench/gpu.sh target/gpu-bundle          carry: ["target/gpu-bundle"]
# The bundle holds `coordinator` and `worker` built with --features cuda,
# and datasets/mnist/. Results (report.json/md, logs) go to $OUT (or
# /tmp/gpu-out). Takes a few minutes.
set -euo pipefail
BUNDLE=$(cd "${1:-target/gpu-bundle}" && pwd)
OUT_DIR=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
echo "== CUDA libraries the loader finds (candle links cuBLAS, cuRAND, NVRTC)"
ldconfig -p | grep -E 'lib(cublas|cublasLt|curand|nvrtc|cudart)\.so' || echo "  none listed by ldconfig"
export LD_LIBRARY_PATH="$BUNDLE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DATASETS_DIR="$BUNDLE/datasets"
# The coordinator and the worker share a fresh cluster token.
export DISTILL_CLUSTER_TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

sed "s#^output_dir = .*#output_dir = \"$OUT_DIR/job\"#" bench/gpu/mnist-gpu.toml > "$OUT_DIR/cluster.toml"
"$BUNDLE/coordinator" --config "$OUT_DIR/cluster.toml" --listen 127.0.0.1:0 --fresh \
  > "$OUT_DIR/coordinator.out" 2> "$OUT_DIR/coordinator.log" &
coordinator=$!
for _ in $(seq 100); do
  url=$(head -n1 "$OUT_DIR/coordinator.out" 2>/dev/null | sed -n 's/^coordinator listening on //p')
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "${url:-}" ] || { echo "the coordinator did not start:"; cat "$OUT_DIR/coordinator.log"; exit 1; }
"$BUNDLE/worker" --coordinator "$url" --gpu 0 --scratch "$OUT_DIR/scratch" \
  > "$OUT_DIR/worker.log" 2>&1 &
started=$(date +%s.%N)
status=0
wait "$coordinator" || status=$?
ended=$(date +%s.%N)
if [ "$status" -ne 0 ]; then
  echo "the job failed; last lines of the logs:"
  tail -n 20 "$OUT_DIR/coordinator.log" "$OUT_DIR/worker.log"
  exit "$status"
fi
echo "== job wall time: $(echo "$ended - $started" | bc) s"
cat "$OUT_DIR/job/report.md"
echo "== training throughput per model (examples x epochs / training seconds, validation included)"
python3 - "$OUT_DIR/job/report.json" <<'PY' || cat "$OUT_DIR/job/report.json"
import json, sys
report = json.load(open(sys.argv[1]))
for m in report["models"]:
    epochs = len(m.get("validation_errors_per_epoch") or [])
    if epochs and m.get("train_seconds"):
        examples = m.get("training_examples") or report["train_examples"]
        print(f'{m["name"]:>10}: {examples * epochs / m["train_seconds"]:10.0f} examples/s '
              f'({m["train_seconds"] / epochs:.2f} s/epoch), {m["test_errors"]} test errors')
PY
