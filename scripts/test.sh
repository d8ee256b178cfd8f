#!/usr/bin/env bash
# The test suite: sets up .venv (torch CUDA build, the extension compiled), then runs pytest.
# Without a GPU, Triton kernels run under TRITON_INTERPRET=1 on CPU tensors.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
PYBIN="${PERSONAFUSE_VENV:-$ROOT/.venv}/bin/python"
if ! "$PYBIN" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
  echo "[test] no GPU visible: Triton kernels run in the interpreter (TRITON_INTERPRET=1)"
fi
# A CUDA build of torch plus nvcc means the extension must have compiled: make its absence a failure.
if "$PYBIN" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" && command -v nvcc >/dev/null; then
  export PERSONAFUSE_REQUIRE_EXTENSION=1
fi
cd "$ROOT"
exec "$PYBIN" -m pytest -q tests "$@"
