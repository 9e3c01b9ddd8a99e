#!/usr/bin/env bash
# Install the framework (editable) into the current Python. Usage: bash scripts/setup.sh [--dev]
# torch is pinned first when absent: a bare `torch` requirement would pull the CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build) ..."
  "${PIP[@]}" "torch==2.13.0" || {
    echo "[setup] could not install torch==2.13.0; install a torch build for your platform (>=2.3), then rerun." >&2
    exit 1
  }
fi
if [[ "${1:-}" == "--dev" ]]; then
  echo "[setup] installing framework with dev extras ..."
  "${PIP[@]}" -e ".[dev]"
else
  echo "[setup] installing framework ..."
  "${PIP[@]}" -e .
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true  # expose fw-* commands under pyenv
"$PY" -c "import framework, torch, lightning; print(f'[setup] ok: torch {torch.__version__}, lightning {lightning.__version__}')"
