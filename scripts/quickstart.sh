#!/usr/bin/env bash
# The main job: set up .venv, then run python/quickstart.py (routed LoRA in every projection of a small
# Llama built from a config, a few training steps, loss and tokens/s). Extra arguments go to the script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${PERSONAFUSE_VENV:-$ROOT/.venv}/bin/python" python/quickstart.py "$@"
