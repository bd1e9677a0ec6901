#!/usr/bin/env bash
# Builds what bench/gpu.sh needs on the GPU machine into target/gpu-bundle/
# and packs it as target/gpu-bundle.tar.xz (what is carried there): the
# `coordinator`, the `worker` built with --features cuda and the
# `experiments` harness (stripped), and a copy of MNIST. The device machine has no toolchain, so the CUDA toolkit comes from
# PyPI wheels pinned to 13.0.x (the device's driver runs CUDA 13.0):
#   bench/gpu-bundle.sh
# then run bench/gpu.sh there (see its header).
#
# The CUDA toolkit's compiler and libraries come from PyPI wheels (in a
# virtual environment under ~/.cache); the link uses them and a stub
# libcuda (the real one comes with the driver on the GPU machine). The
# bundle carries no CUDA library (they are far over the 64 MiB limit):
# bench/gpu.sh finds them in the GPU machine's Python environment.
# Builds in target/cuda, apart from the usual target folder.
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
build_started=$(date +%s)
# The coordinator and the experiments harness need no GPU; only the worker
# is built with CUDA.
cargo build --release --bin coordinator --bin experiments
# The stub defines almost nothing: let the link leave the driver's symbols
# to the real libcuda.so.1 on the GPU machine (kept as a needed library).
RUSTFLAGS="-L $LINK -C link-arg=-Wl,--no-as-needed -C link-arg=-Wl,--unresolved-symbols=ignore-all" \
  cargo build --release -p worker --features cuda
echo "== built in $(($(date +%s) - build_started)) s"
BUNDLE=target/gpu-bundle
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/datasets"
for bin in coordinator worker experiments; do
  cp "$CARGO_TARGET_DIR/release/$bin" "$BUNDLE/"
  strip "$BUNDLE/$bin"
done
cp -r "${DATASETS_DIR:-../shared/datasets}/mnist" "$BUNDLE/datasets/"
echo "== the worker links (resolved here against the wheels and the stub):"
LD_LIBRARY_PATH="$LINK:$CU/lib" ldd "$BUNDLE/worker" | grep -E 'cuda|cublas|curand|nvrtc' || true
du -sh "$BUNDLE"/* "$BUNDLE"
# The CUDA worker is large (candle's kernels are embedded as PTX text), so
# the bundle travels as an xz archive, a third of the folder's size.
tar -C target -cf - gpu-bundle | xz -T0 -6 > "$BUNDLE.tar.xz"
size=$(($(stat -c %s "$BUNDLE.tar.xz") / 1048576))
ls -l "$BUNDLE.tar.xz"
[ "$size" -lt 64 ] || { echo "the bundle is ${size} MiB, over the 64 MiB that can be carried"; exit 1; }
echo "carry target/gpu-bundle.tar.xz and run: bash bench/gpu.sh target/gpu-bundle.tar.xz"
