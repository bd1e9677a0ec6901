#!/usr/bin/env bash
# Runs the MNIST pipeline on a GPU and records what happened. Meant for the
# device machine, which has no Rust toolchain and no network: build the
# bundle here with bench/gpu-bundle.sh, then run (device tool)
#   bash bench/gpu.sh target/gpu-bundle.tar.xz   carry: ["target/gpu-bundle.tar.xz"]
# (a bundle folder works too).
#
# Before anything runs it checks its environment and stops with a clear
# message when something is missing: the bundle, an NVIDIA GPU (nvidia-smi),
# and every library the CUDA worker links (cuBLAS, cuBLASLt, cuRAND, NVRTC,
# the CUDA runtime; libcuda comes with the driver). The libraries are taken
# from the NVIDIA wheels of the machine's Python (PyTorch's environment;
# PYTHON picks another interpreter): their `lib` folders go on
# LD_LIBRARY_PATH, and `ldd` must resolve every library of the worker.
#
# Then, within GPU_BUDGET_S seconds (default 420, about 7 minutes):
#   1. bench/gpu/mnist-gpu.toml (3 epochs per model), one worker on GPU 0;
#   2. if at least the first job's wall time is left, bench/gpu/mnist-gpu-large.toml
#      (a 20-epoch teacher), so that a later issue can plan the paper's budget.
# For each job it records into $OUT (default /tmp/gpu-out): the GPU's name
# and driver (gpu.csv), nvidia-smi samples every second during the job
# (<job>/gpu-samples.csv: utilisation and memory), the job's wall time,
# per model its examples/s and test errors (<job>/summary.json and
# summary.md), the report and the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() {
  echo "bench/gpu.sh: $*" >&2
  exit 1
}
BUNDLE_ARG=${1:-target/gpu-bundle.tar.xz}
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ -f "$BUNDLE_ARG" ]; then
  # The archive bench/gpu-bundle.sh packs: unpacked beside, not into $OUT
  # (whatever is under $OUT comes back).
  unpacked=$(mktemp -d)
  "$PYTHON" -m tarfile -e "$BUNDLE_ARG" "$unpacked" ||
    fail "cannot unpack $BUNDLE_ARG (an xz tar archive from bench/gpu-bundle.sh)"
  BUNDLE_ARG="$unpacked/gpu-bundle"
fi
[ -d "$BUNDLE_ARG" ] || fail "no bundle at $BUNDLE_ARG: build it with bench/gpu-bundle.sh and carry it"
BUNDLE=$(cd "$BUNDLE_ARG" && pwd)
for bin in coordinator worker; do
  [ -x "$BUNDLE/$bin" ] || fail "the bundle $BUNDLE has no executable $bin: rebuild it with bench/gpu-bundle.sh"
done
[ -d "$BUNDLE/datasets/mnist" ] || fail "the bundle $BUNDLE has no datasets/mnist"
BUDGET=${GPU_BUDGET_S:-420}
started_all=$(date +%s)

echo "== GPU"
command -v nvidia-smi > /dev/null ||
  fail "nvidia-smi is not installed: this machine has no NVIDIA driver, so no GPU to run on"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT_DIR/gpu.csv" 2>&1 ||
  fail "nvidia-smi finds no GPU: $(cat "$OUT_DIR/gpu.csv")"
cat "$OUT_DIR/gpu.csv"

echo "== CUDA libraries from Python's NVIDIA wheels"
command -v "$PYTHON" > /dev/null || fail "no $PYTHON to find the NVIDIA wheels' libraries with"
# Every folder holding shared libraries under the `nvidia` namespace package
# (nvidia/cu13/lib for CUDA 13 wheels, nvidia/<name>/lib for CUDA 12 ones).
LIB_DIRS=$("$PYTHON" - << 'PY'
import os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = sorted({d for root in roots for d, _, files in os.walk(root)
               if any(".so" in f for f in files)})
print(":".join(dirs))
PY
)
[ -n "$LIB_DIRS" ] || fail "$PYTHON ($(command -v "$PYTHON")) has no NVIDIA wheels (the 'nvidia' package): install PyTorch's CUDA 13 build or nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc, nvidia-cuda-runtime"
echo "$LIB_DIRS" | tr ':' '\n' | sed 's/^/  /'
export LD_LIBRARY_PATH="$LIB_DIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$BUNDLE/worker" > "$OUT_DIR/ldd-worker.txt" 2>&1 || true
missing=$(awk '/not found/ {print $1}' "$OUT_DIR/ldd-worker.txt" | sort -u | tr '\n' ' ')
if [ -n "$missing" ]; then
  hint=""
  case "$missing" in *libcuda.so*) hint=" libcuda.so.1 comes with the NVIDIA driver, not with the wheels: is the driver installed?" ;; esac
  fail "the worker needs libraries that are not found: $missing(searched: LD_LIBRARY_PATH=$LD_LIBRARY_PATH).$hint"
fi
grep -E 'lib(cuda|cublas|cublasLt|curand|nvrtc|cudart)\.' "$OUT_DIR/ldd-worker.txt" | sed 's/^\s*/  /'

export DATASETS_DIR="$BUNDLE/datasets"
# The coordinator and the worker share a fresh cluster token.
DISTILL_CLUSTER_TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export DISTILL_CLUSTER_TOKEN

# run_job NAME CONFIG: one job, one worker on GPU 0, with GPU samples.
run_job() {
  local name=$1 config=$2 dir="$OUT_DIR/$1"
  mkdir -p "$dir"
  sed "s#^output_dir = .*#output_dir = \"$dir/job\"#" "$config" > "$dir/cluster.toml"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used,memory.total,power.draw \
    --format=csv -l 1 > "$dir/gpu-samples.csv" 2>&1 &
  local sampler=$!
  local started ended status=0
  started=$(date +%s.%N)
  "$BUNDLE/coordinator" --config "$dir/cluster.toml" --listen 127.0.0.1:0 --fresh \
    > "$dir/coordinator.out" 2> "$dir/coordinator.log" &
  local coordinator=$! url=""
  for _ in $(seq 300); do
    url=$(head -n1 "$dir/coordinator.out" 2> /dev/null | sed -n 's/^coordinator listening on //p')
    [ -n "$url" ] && break
    kill -0 "$coordinator" 2> /dev/null || break
    sleep 0.1
  done
  if [ -z "$url" ]; then
    kill "$sampler" 2> /dev/null || true
    echo "the coordinator did not start:"
    tail -n 20 "$dir/coordinator.log"
    return 1
  fi
  "$BUNDLE/worker" --coordinator "$url" --gpu 0 --scratch "$dir/scratch" > "$dir/worker.log" 2>&1 &
  local worker=$!
  wait "$coordinator" || status=$?
  ended=$(date +%s.%N)
  kill "$sampler" 2> /dev/null || true
  wait "$worker" 2> /dev/null || true
  if [ "$status" -ne 0 ]; then
    echo "the job $name failed (exit $status); last lines of the logs:"
    tail -n 20 "$dir/coordinator.log" "$dir/worker.log"
    return "$status"
  fi
  "$PYTHON" bench/gpu_summary.py "$dir" "$(awk -v a="$started" -v b="$ended" 'BEGIN { print b - a }')" "$OUT_DIR/gpu.csv"
}

echo "== job 1: bench/gpu/mnist-gpu.toml"
first_started=$(date +%s)
run_job small bench/gpu/mnist-gpu.toml
first_seconds=$(($(date +%s) - first_started))
left=$((BUDGET - ($(date +%s) - started_all)))
# The large job's teacher trains about 7 times as long as the small job's.
if [ "$left" -gt $((first_seconds * 7)) ]; then
  echo "== job 2: bench/gpu/mnist-gpu-large.toml (${left} s of the budget left)"
  run_job large bench/gpu/mnist-gpu-large.toml
else
  echo "== job 2 skipped: ${left} s of the budget left, the small job took ${first_seconds} s"
fi
echo "== done; results in $OUT_DIR"
