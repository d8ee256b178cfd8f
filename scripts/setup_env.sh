#!/usr/bin/env bash
# Set up .venv with a CUDA build of torch and install personafuse-kernels into it (compiling the CUDA
# extension). Sourced by the README's commands. Does only what changed, each step keyed on a stamp in .venv:
#   deps       requirements-dev.txt                       -> pip install -r
#   package    setup.py, pyproject.toml, torch version    -> pip install -e . (metadata, entry points)
#   extension  csrc/**, setup.py, torch version, nvcc     -> setup.py build_ext --inplace into build/ext, where
#              ninja keeps the objects and recompiles only the sources (and their headers) that changed
# On an unchanged tree the whole script is a few file hashes. PERSONAFUSE_SETUP_FORCE=1 redoes every step.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PERSONAFUSE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
VPY="$VENV/bin/python"

if [ ! -x "$VPY" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi

# stamp_ok NAME KEY: true when the step NAME last finished with this KEY (and no forced rebuild is asked).
stamp_ok() { [ "${PERSONAFUSE_SETUP_FORCE:-0}" != 1 ] && [ -f "$VENV/.pfk-$1" ] && [ "$(cat "$VENV/.pfk-$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" > "$VENV/.pfk-$1"; }
# hash_of PATH...: one sha256 over the names and contents of the files under PATHs (sorted, so stable).
hash_of() { (cd "$ROOT" && find "$@" -type f ! -name '*.pyc' -print0 2>/dev/null | sort -z | xargs -0 sha256sum) \
  | sha256sum | cut -c1-16; }

deps_key=$(hash_of requirements-dev.txt)
if ! stamp_ok deps "$deps_key"; then
  echo "[setup] installing requirements-dev.txt (torch CUDA build, transformers, pytest)"
  "$VPY" -m pip install -q --upgrade pip setuptools wheel
  "$VPY" -m pip install -q -r "$ROOT/requirements-dev.txt"
  stamp_set deps "$deps_key"
fi

# The torch version without importing torch (an import costs seconds): its version.py names it (test.sh reads
# whether it is a CUDA build from the same file).
TORCH_VERSION_PY=$(ls "$VENV"/lib/python3*/site-packages/torch/version.py 2>/dev/null | head -n 1 || true)
torch_key=$(cat "$TORCH_VERSION_PY" 2>/dev/null | sha256sum | cut -c1-16)
nvcc_key=$( (command -v nvcc >/dev/null && nvcc --version 2>/dev/null | tail -n 1) || echo none)
changed=0

pkg_key="$(hash_of setup.py pyproject.toml)-$torch_key"
if ! stamp_ok package "$pkg_key"; then
  echo "[setup] installing personafuse-kernels (editable; the extension is built in the next step)"
  start=$(date +%s)
  ( cd "$ROOT" && PERSONAFUSE_SKIP_CUDA_BUILD=1 "$VPY" -m pip install -q --no-build-isolation --no-deps -e . \
      >"$VENV/.pfk-install.log" 2>&1 ) \
    || { tail -n 60 "$VENV/.pfk-install.log"; echo "[setup] install failed (log: $VENV/.pfk-install.log)"; exit 1; }
  echo "[setup] editable install took $(( $(date +%s) - start )) s"
  stamp_set package "$pkg_key"
  stamp_set extension "stale"  # the install rewrote _build_info.py: the extension step must write it again
  changed=1
fi

ext_key="$(hash_of csrc setup.py)-$torch_key-$(printf '%s' "$nvcc_key" | sha256sum | cut -c1-16)"
if ! stamp_ok extension "$ext_key" || [ ! -f "$ROOT/personafuse_kernels/_build_info.py" ]; then
  echo "[setup] building the CUDA extension in place (build/ext keeps the objects; ninja recompiles what changed)"
  start=$(date +%s)
  # --force: setuptools would compare only the .cu/.cpp times with the .so; ninja's own dependency files
  # (headers included) then decide what really recompiles.
  ( cd "$ROOT" && "$VPY" setup.py -q build_ext --inplace --force --build-temp build/ext >"$VENV/.pfk-ext.log" 2>&1 ) \
    || { tail -n 60 "$VENV/.pfk-ext.log"; echo "[setup] extension build failed (log: $VENV/.pfk-ext.log)"; exit 1; }
  # ninja's "[i/n] <compiler command>" lines, shortened to the source each one compiled
  sed -n -E 's#^(\[[0-9]+/[0-9]+\]) .* -c (/[^ ]*/)?(csrc/[^ ]+) -o .*#\1 compiled \3#p' "$VENV/.pfk-ext.log"
  echo "[setup] extension step took $(( $(date +%s) - start )) s"
  stamp_set extension "$ext_key"
  changed=1
fi

# A side environment with only the Triton that the GPU machine carries (no torch): tests/test_triton_aot.py compiles
# the kernels for sm_90a under it too. PERSONAFUSE_STATIC_TRITON=0 skips it; a failed install is reported, not fatal
# (the test then skips, or fails under CI=true).
STATIC_TRITON="${PERSONAFUSE_STATIC_TRITON:-3.6.0}"
SIDE="$ROOT/.venv-triton${STATIC_TRITON}"
if [ "$STATIC_TRITON" != 0 ] && { ! stamp_ok "triton-$STATIC_TRITON" "$STATIC_TRITON" || [ ! -x "$SIDE/bin/python" ]; }; then
  echo "[setup] side environment $SIDE with triton==$STATIC_TRITON only (the sm_90a compile gate)"
  start=$(date +%s)
  if "$PY" -m venv "$SIDE" >/dev/null 2>&1 \
      && "$SIDE/bin/python" -m pip install -q "triton==$STATIC_TRITON" >"$VENV/.pfk-side.log" 2>&1; then
    echo "[setup] side environment took $(( $(date +%s) - start )) s"
    stamp_set "triton-$STATIC_TRITON" "$STATIC_TRITON"
  else
    tail -n 5 "$VENV/.pfk-side.log" 2>/dev/null || true
    echo "[setup] WARNING: could not install triton==$STATIC_TRITON into $SIDE; its compile gate will not run"
  fi
fi

if [ "$changed" = 1 ]; then
  "$VPY" - <<'PY'
import personafuse_kernels as pfk
info = pfk.build_info()
print(f"[setup] torch {info.get('torch_version')}, extension built: {info.get('extension_built')} "
      f"{info.get('skip_reason') or ''}; backends here: {pfk.available_backends()}")
PY
else
  echo "[setup] up to date (requirements, package and csrc/ unchanged since the last setup)"
fi
