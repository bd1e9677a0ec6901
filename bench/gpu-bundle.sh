#!/usr/bin/env bash
# Builds what bench/gpu.sh needs on the GPU machine into target/gpu-bundle/:
# `coordinator` and `worker` with --features cuda (stripped), and a copy of
# MNIST. The device machine has no toolchain, so the CUDA toolkit comes from
# PyPI wheels pinned to 13.0.x (the device's driver runs CUDA 13.0):
#   bench/gpu-bundle.sh
# then run bench/gpu.sh there (see its header).
#
# Status: untested end to end. With these wheels candle's kernels compile
# (nvcc, cicc) and `cargo clippy --features cuda` passes; the final link of
# candle 0.11 (cudarc with dynamic linking) also needs libcuda, cuBLAS,
# cuBLASLt, cuRAND and NVRTC at link time. This script installs their wheels
# and links against them, with a stub libcuda (the real one comes with the
# driver on the GPU machine). At run time the GPU machine must provide the
# same libraries (bench/gpu.sh lists what its loader finds); they are too
# large to carry (64 MiB limit).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-$HOME/.cache/distill-bench/cuda-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
  "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" \
  "nvidia-curand" "nvidia-cuda-nvrtc==13.0.*"
CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
export CUDA_HOME="$CU" CUDA_PATH="$CU" PATH="$CU/bin:$PATH" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
[ -e "$CU/lib64" ] || ln -s lib "$CU/lib64"
# Unversioned names for the linker, and a stub libcuda with the driver's soname.
LINK="$VENV/link"
mkdir -p "$LINK"
for lib in cublas cublasLt curand nvrtc cudart; do
  real=$(ls "$CU"/lib/lib$lib.so.* 2>/dev/null | head -n1 || true)
  [ -n "$real" ] && ln -sf "$real" "$LINK/lib$lib.so"
done
if [ ! -e "$LINK/libcuda.so" ]; then
  echo 'void cuInit(void){}' > "$LINK/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/stub.c"
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
# The coordinator needs no GPU; only the worker is built with CUDA.
cargo build --release --bin coordinator
# The stub defines almost nothing: let the link leave the driver's symbols
# to the real libcuda.so.1 on the GPU machine (kept as a needed library).
RUSTFLAGS="-L $LINK -C link-arg=-Wl,--no-as-needed -C link-arg=-Wl,--unresolved-symbols=ignore-all" \
  cargo build --release -p worker --features cuda
BUNDLE=target/gpu-bundle
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/datasets"
cp "$CARGO_TARGET_DIR/release/coordinator" "$CARGO_TARGET_DIR/release/worker" "$BUNDLE/"
strip "$BUNDLE/coordinator" "$BUNDLE/worker"
cp -r "${DATASETS_DIR:-../shared/datasets}/mnist" "$BUNDLE/datasets/"
du -sh "$BUNDLE"
