#!/usr/bin/env bash
# Creates .venv (CPU torch 2.13.0 unless a torch is already there) and installs this project with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Install torch explicitly first: a plain `torch` requirement would make pip resolve a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${STAR_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
