#!/usr/bin/env bash
# Creates the Python virtual environment for bench/pytorch_reference.py (the
# PyTorch reference benchmark) OUTSIDE the repository, and prints the path of
# its python as the last line of output.
#
#   bash bench/pytorch_setup.sh                 # venv in $HOME/.cache/distill-bench/torch-venv
#   TORCH_VENV=/somewhere/else bash bench/pytorch_setup.sh
#   PY=$(bash bench/pytorch_setup.sh | tail -n 1)
#   "$PY" bench/pytorch_reference.py --help
#
# Idempotent: when the venv's python can already import torch, nothing is
# installed. Otherwise it checks that the file system holding the venv has at
# least 8 GB free (PyPI's default Linux torch wheel pulls about 3 GB of CUDA
# libraries as dependencies, plus pip's download cache and unpacking), then
# installs the pinned versions below from PyPI (the only index needed; the
# download.pytorch.org CPU-only index is not used).
#
# Environment:
#   TORCH_VENV   where the venv goes (default $HOME/.cache/distill-bench/torch-venv)
#   PYTHON       interpreter to build it with (default python3; 3.11 was tested)
#   TORCH_VENV_MIN_FREE_GB  free space required before installing (default 8)
set -euo pipefail

TORCH_VERSION="2.15.0"
NUMPY_VERSION="2.4.6"
MIN_FREE_GB="${TORCH_VENV_MIN_FREE_GB:-8}"

VENV="${TORCH_VENV:-$HOME/.cache/distill-bench/torch-venv}"
PYTHON="${PYTHON:-python3}"
VPY="$VENV/bin/python"

# Refuse to put the venv inside the repository (it would be huge and untracked).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV_ABS="$(realpath -m "$VENV")"
case "$VENV_ABS/" in
    "$REPO_ROOT"/*)
        echo "error: TORCH_VENV=$VENV is inside the repository ($REPO_ROOT); put it elsewhere" >&2
        exit 1
        ;;
esac
mkdir -p "$(dirname "$VENV_ABS")"
VENV_PARENT="$(dirname "$VENV_ABS")"

if [ -x "$VPY" ] && "$VPY" -c 'import torch, numpy' >/dev/null 2>&1; then
    echo "torch $("$VPY" -c 'import torch; print(torch.__version__)') already installed in $VENV; nothing to do" >&2
    echo "$VPY"
    exit 0
fi

# Free space (in 1K blocks) on the file system that will hold the venv.
free_kb="$(df -Pk "$VENV_PARENT" | awk 'NR == 2 { print $4 }')"
free_gb=$((free_kb / 1024 / 1024))
if [ "$free_kb" -lt $((MIN_FREE_GB * 1024 * 1024)) ]; then
    echo "error: only ${free_gb} GB free on the file system of $VENV_PARENT;" \
        "the torch install (torch + CUDA wheels from PyPI, about 3 GB plus" \
        "download cache) needs at least ${MIN_FREE_GB} GB. Free some space or set" \
        "TORCH_VENV to a path on a larger disk." >&2
    exit 1
fi
echo "${free_gb} GB free under $VENV_PARENT; creating $VENV" >&2

if [ ! -x "$VPY" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VPY" -m pip install --upgrade pip >&2
"$VPY" -m pip install "torch==${TORCH_VERSION}" "numpy==${NUMPY_VERSION}" >&2
"$VPY" -c 'import torch, numpy; print("installed torch", torch.__version__, "numpy", numpy.__version__)' >&2
echo "$VPY"
