#!/usr/bin/env bash
# Ours vs. PyTorch on this machine, in one run, with the same thread count:
#   bench/compare.sh [--epochs 3] [--threads 2] [--steps 150] [--repeats 3]
# Measures training and inference throughput of both (and the GEMM rate on
# each step's own shapes), then the whole MNIST pipeline (teacher, baseline,
# transfer set, student; --epochs each) through our cluster and through
# PyTorch's reference script, and writes bench/results/pytorch-comparison.*
# and its block of bench/README.md. Throughput is measured --repeats times
# per framework, alternating, and reported as medians (the machine drifts). PyTorch is installed by
# bench/pytorch_setup.sh into a virtual environment outside the repository.
# Run it on an otherwise idle machine: never while something compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=3 THREADS=2 STEPS=150 REPEATS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --epochs) EPOCHS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
PY=$(bench/pytorch_setup.sh | tail -n1)
cargo build --release --bin coordinator --bin worker
cargo bench -p distill --bench train_throughput --no-run
WORK=target/bench/comparison
rm -rf "$WORK" && mkdir -p "$WORK"
DATASETS=${DATASETS_DIR:-$(cd .. && pwd)/shared/datasets}

for r in $(seq 1 "$REPEATS"); do
  echo "== throughput $r/$REPEATS: ours"
  RAYON_NUM_THREADS=$THREADS cargo bench -q -p distill --bench train_throughput -- --steps "$STEPS" \
    > "$WORK/ours-throughput-$r.json"
  echo "== throughput $r/$REPEATS: PyTorch"
  "$PY" bench/pytorch_reference.py throughput --threads "$THREADS" --steps "$STEPS" \
    --out "$WORK/torch-throughput-$r.json" > /dev/null
done

# One worker with all the threads: every stage after the teacher waits for
# it, so splitting the cores between two workers only slows the critical
# path (PyTorch's reference also runs its stages one after another).
echo "== MNIST pipeline: ours ($EPOCHS epochs per model, 1 worker with $THREADS threads)"
sed -e "s#^output_dir = .*#output_dir = \"ours-pipeline\"#" -e "s/^epochs = .*/epochs = $EPOCHS/" \
  bench/comparison-mnist.toml > "$WORK/cluster.toml"
started=$(date +%s.%N)
DATASETS_DIR=$DATASETS target/release/coordinator --config "$WORK/cluster.toml" --fresh \
  --local-workers 1 --local-worker-threads "$THREADS" \
  > "$WORK/ours-pipeline.log" 2>&1
ended=$(date +%s.%N)
python3 -c "print($ended - $started)" > "$WORK/ours-pipeline-wall.txt"
echo "== MNIST pipeline: PyTorch"
"$PY" bench/pytorch_reference.py pipeline --datasets-dir "$DATASETS" --dataset mnist \
  --epochs "$EPOCHS" --threads "$THREADS" --seed 1 --teachers 1 --out "$WORK/torch-pipeline.json" \
  > "$WORK/torch-pipeline.log" 2>&1

python3 bench/compare.py "$WORK" "bench/compare.sh --epochs $EPOCHS --threads $THREADS --steps $STEPS --repeats $REPEATS"
