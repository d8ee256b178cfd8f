#!/usr/bin/env bash
# The main job: set up .venv (torch CUDA build, the extension compiled), then run the PersonaFuse demo
# (`personafuse demo`: ten Big Five persona experts in a small Llama, trained, routed, saved, reloaded,
# generating with a persona mix, timed against the per-expert loop). Extra arguments go to the demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${PERSONAFUSE_VENV:-$ROOT/.venv}/bin/personafuse" demo "$@"
