#!/usr/bin/env bash
# One script for a GPU machine (H100/H200, no network): build the extension, run the GPU tests, run the
# benchmark, write everything under OUT_DIR, print a short table last.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--memcheck] [--quick] [--tune] [--tests-only | --bench-only]
#
# The device tool allows 10 minutes a command: if the whole script does not fit, run it twice, with
# --tests-only and then --bench-only. The GPU tests are the files that exercise the GPU; the CPU-only files
# (CLI, demo, distributed, AOT compile, ...) already run in CI.
#
# Uses the machine's python3 (torch, triton, pytest preinstalled there); installs nothing from a registry.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu_out}}"
shift || true
MEMCHECK=0
QUICK=0
TUNE=0
TESTS=1
BENCH=1
for arg in "$@"; do
  case "$arg" in
    --memcheck) MEMCHECK=1 ;;
    --quick) QUICK=1 ;;
    --tune) TUNE=1 ;;
    --tests-only) BENCH=0 ;;
    --bench-only) TESTS=0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --memcheck, --quick, --tune, --tests-only, --bench-only)" >&2
       exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
cd "$ROOT"

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; \
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; \
  git rev-parse --short HEAD 2>/dev/null; } > "$OUT_DIR/env.txt" 2>&1
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
if ! PERSONAFUSE_FORCE_CUDA_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT_DIR/build.log" 2>&1; then
  echo "pip install -e failed (see build.log); building the extension in place instead" | tee -a "$OUT_DIR/build.log"
  if ! PERSONAFUSE_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace >> "$OUT_DIR/build.log" 2>&1; then
    tail -40 "$OUT_DIR/build.log"; echo "BUILD FAILED"; exit 1
  fi
fi
echo "built in $(( $(date +%s) - start )) s"

test_rc=skipped
if [ "$TESTS" = 1 ]; then
  echo "== GPU tests"
  PERSONAFUSE_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_extension.py \
      tests/test_routed_lora_triton.py tests/test_topk.py tests/test_routed_lora_torch.py tests/test_modules.py \
      tests/test_integration_hf.py tests/test_cuda_graphs.py tests/test_delta.py tests/test_serving_slots.py \
      > "$OUT_DIR/tests.log" 2>&1
  test_rc=$?
  tail -3 "$OUT_DIR/tests.log"
  echo "== personafuse check (self-test of every backend, float32 and bfloat16)"
  "$PY" -m personafuse_kernels.cli check >> "$OUT_DIR/tests.log" 2>&1 || test_rc="$test_rc+check-failed"
  grep -E "PASS|FAIL" "$OUT_DIR/tests.log" | tail -8
fi

memcheck_rc=skipped
if [ "$MEMCHECK" = 1 ]; then
  echo "== compute-sanitizer memcheck (extension and triton kernel tests)"
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_extension.py "tests/test_routed_lora_triton.py::test_matches_torch_fp32" > "$OUT_DIR/memcheck.log" 2>&1
  memcheck_rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$OUT_DIR/memcheck.log" | tail -3
fi

bench_rc=skipped
if [ "$BENCH" = 1 ]; then
echo "== benchmark"
if [ "$QUICK" = 1 ]; then
  shapes="1,4096,4096,10,16;4096,4096,4096,10,16"
else
  shapes="1,4096,4096,10,16;16,4096,4096,10,16;64,4096,4096,10,16;4096,4096,4096,10,16;16384,4096,4096,10,16;8192,4096,14336,10,16;8192,14336,4096,10,16"
fi
"$PY" benchmarks/bench_routed_lora.py --providers base,loop,xlora,stacked,torch,triton,cuda --shapes "$shapes" --e2e \
    --modes fwd,fwdbwd --no-progress --out "$OUT_DIR/bench" > "$OUT_DIR/bench.log" 2>&1
bench_rc=$?
# the measured cuda-vs-triton choice per T bucket for `auto` (copy it to personafuse_kernels/ops/dispatch_tables/)
"$PY" benchmarks/make_dispatch_table.py "$OUT_DIR/bench/rows.json" --out "$OUT_DIR/bench" >> "$OUT_DIR/bench.log" 2>&1
# torch.compile recompiles per shape (tens of seconds each): two shapes only
"$PY" benchmarks/bench_routed_lora.py --providers base,stacked,compile --shapes "4096,4096,4096,10,16;16,4096,4096,10,16" --no-progress --no-plot \
    --out "$OUT_DIR/bench_compile" > "$OUT_DIR/bench_compile.log" 2>&1

# top-k: T = 8192, 4096x4096, r = 16, top-2, E = 8, 16, 32, 64, 128
# (grouped providers forced onto the grouped path, beside their -dense twins: the measured grouped-vs-dense rule)
PERSONAFUSE_TOPK_PATH=grouped "$PY" benchmarks/bench_routed_lora.py \
    --providers base,loop,stacked,triton,triton-dense,cuda,cuda-dense --shapes topk --modes fwd,fwdbwd \
    --no-progress --no-plot --out "$OUT_DIR/bench_topk" > "$OUT_DIR/bench_topk.log" 2>&1
"$PY" benchmarks/make_dispatch_table.py "$OUT_DIR/bench/rows.json" "$OUT_DIR/bench_topk/rows.json" \
    --out "$OUT_DIR/bench_topk" >> "$OUT_DIR/bench_topk.log" 2>&1

# the cost model against what was just measured, the calibration step (docs/cost-model.md); appended to bench.log,
# since the device tool brings back only a few files
for rows in "$OUT_DIR/bench/rows.json" "$OUT_DIR/bench_topk/rows.json"; do
  [ -f "$rows" ] && "$PY" -m personafuse_kernels.cli explain --against "$rows"
done >> "$OUT_DIR/bench.log" 2>&1

if [ "$TUNE" = 1 ]; then  # per-GPU launch table for the triton backend (lands in rows.tar.gz)
  mkdir -p "$OUT_DIR/bench"
  "$PY" benchmarks/tune_triton.py --out "$OUT_DIR/bench" > "$OUT_DIR/bench/tune.log" 2>&1
fi

# the device tool returns at most 8 files: keep the logs, pack the row folders into one archive
tar czf "$OUT_DIR/rows.tar.gz" -C "$OUT_DIR" bench bench_compile bench_topk 2>/dev/null \
  && rm -rf "$OUT_DIR/bench" "$OUT_DIR/bench_compile" "$OUT_DIR/bench_topk"
fi
echo "== summary: tests rc=$test_rc memcheck=$memcheck_rc bench rc=$bench_rc"
if [ "$BENCH" = 1 ]; then
  grep -A60 "base in ms" "$OUT_DIR/bench.log" | head -60
  grep -A10 "base in ms" "$OUT_DIR/bench_compile.log" | head -10
  grep -A14 "base in ms" "$OUT_DIR/bench_topk.log" | head -14
  echo "== the cost model against these rows (the end of bench.log)"
  grep -E "rows priced|OFF" "$OUT_DIR/bench.log" | head -20
fi
[ "$test_rc" = 0 -o "$test_rc" = skipped ] && [ "$bench_rc" = 0 -o "$bench_rc" = skipped ]
