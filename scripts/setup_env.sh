#!/usr/bin/env bash
# Prepares a fresh machine for fastfit, idempotently: the Fashion-MNIST Debian package (the demo's real data)
# and a virtual environment in .venv with fastfit installed editable plus its dev extras (tests, DALI, TensorBoard).
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing the Debian package dataset-fashion-mnist (the demo's data)"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
    $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.fastfit-installed
want=$(sha256sum pyproject.toml CMakeLists.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing fastfit[dev] into .venv (torch, torchvision, triton, DALI, pytest; a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
