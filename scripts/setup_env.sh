#!/usr/bin/env bash
# Set up .venv with a CUDA build of torch and install personafuse-kernels into it (compiling the CUDA
# extension). Idempotent: a second run only rebuilds what changed. Sourced by the README's commands.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PERSONAFUSE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.personafuse-deps"
if [ ! -f "$stamp" ] || ! cmp -s "$ROOT/requirements-dev.txt" "$stamp"; then
  echo "[setup] installing requirements-dev.txt (torch CUDA build, transformers, pytest)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.txt"
  cp "$ROOT/requirements-dev.txt" "$stamp"
fi
echo "[setup] building and installing personafuse-kernels (CUDA extension with ninja)"
start=$(date +%s)
( cd "$ROOT" && "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e . )
echo "[setup] install took $(( $(date +%s) - start )) s"
"$VENV/bin/python" - <<'PY'
import personafuse_kernels as pfk
info = pfk.build_info()
print(f"[setup] torch {info.get('torch_version')}, extension built: {info.get('extension_built')} "
      f"{info.get('skip_reason') or ''}; backends here: {pfk.available_backends()}")
PY
