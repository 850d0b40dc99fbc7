#!/usr/bin/env bash
# Installs mtl-experiments (editable, with the dev extra) into the active Python environment.
#
# torch comes first, chosen for the machine, so that pip never replaces it:
#   - torch already importable           -> kept as it is (your CUDA/ROCm/CPU build stays);
#   - an NVIDIA GPU (nvidia-smi works)   -> PyPI's default torch build (CUDA);
#   - no GPU, download.pytorch.org reachable -> the CPU-only build from PyTorch's CPU index (~200 MB, not GBs);
#   - no GPU, offline                    -> torch==$TORCH_CPU_VERSION from the local wheel cache/registry.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.5.1") to install exactly that.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu

if [ -n "${TORCH_SPEC:-}" ]; then
  echo "install: torch as requested: $TORCH_SPEC"
  $PY -m pip install "$TORCH_SPEC"
elif $PY -c "import torch" 2>/dev/null; then
  echo "install: keeping the installed torch $($PY -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install: NVIDIA GPU found: installing the default (CUDA) torch build"
  $PY -m pip install "torch>=2.1"
elif $PY -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/torch/', timeout=5)" 2>/dev/null; then
  echo "install: no GPU: installing the CPU build of torch from $CPU_INDEX"
  $PY -m pip install "torch>=2.1" --index-url "$CPU_INDEX"
else
  echo "install: no GPU and no access to $CPU_INDEX: installing torch==$TORCH_CPU_VERSION (local CPU build)"
  $PY -m pip install "torch==$TORCH_CPU_VERSION"
fi

$PY -m pip install -e ".[dev]"
$PY -c "import torch, lightning, mlflow, hydra; print('install: ok: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
