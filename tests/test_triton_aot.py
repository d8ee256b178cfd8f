"""The sm_90a compile gate: every Triton kernel that a default call of the op launches is compiled ahead of time,
without a GPU, at the production launch configs and with the arguments the launchers pass (tests/aot_compile.py),
under two Tritons: the one the package's environment installs, and Triton 3.6.0 (the GPU machine's) in a side
environment without torch (scripts/setup_env.sh makes it). ptxas's report then decides:

- every case compiles, and its shared memory fits the card;
- a hot-path kernel has no spill and no ptxas performance warning (C7510-C7515: serialized wgmma among them).
  Hot-path kernels get no exemptions; fallbacks (the pointer dual GEMM where TMA runs, A100 configs) are compiled
  and reported in the long profile, never gated;
- the big Hopper GEMMs emit wgmma.

Default profile: the sm_90a hot matrix under both Tritons. Long profile: sm_90a and sm_80, fallbacks included.
benchmarks/static_report.py writes the same rows as the committed tables under benchmarks/results/static/.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from profile_plugin import PROFILE

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")
sys.path.insert(0, str(ROOT / "tests"))
SIDE_TRITON = "3.6.0"


def side_python() -> Path:
    return Path(os.environ.get("PERSONAFUSE_TRITON36_PYTHON", ROOT / f".venv-triton{SIDE_TRITON}" / "bin" / "python"))


def run_gate(python: str, arch: str, matrix: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    res = subprocess.run([python, str(ROOT / "tests" / "aot_compile.py"), "--arch", arch, "--matrix", matrix,
                          "--jobs", str(min(4, os.cpu_count() or 1))], capture_output=True, text=True, env=env,
                         timeout=1800, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


ARCH, MATRIX = ("90a,80", "all") if PROFILE == "long" else ("90a", "hot")


@pytest.fixture(scope="module", params=["installed", SIDE_TRITON])
def rows(request):
    if request.param == "installed":
        return run_gate(sys.executable, ARCH, MATRIX)
    python = side_python()
    if not python.exists():
        message = (f"no side environment with Triton {SIDE_TRITON} at {python} (scripts/setup_env.sh makes it; "
                   f"PERSONAFUSE_STATIC_TRITON=0 turned it off?)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    out = run_gate(str(python), ARCH, MATRIX)
    assert {r["triton"] for r in out} == {SIDE_TRITON}
    return out


def _where(r: dict) -> str:
    return f"{r['case']} [{r['regime']}, {r['dtype']}, {r['arch']}, Triton {r['triton']}]"


def test_every_case_compiles(rows):
    assert len(rows) >= 60
    failed = [f"{_where(r)}: {r.get('error')}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_shared_memory_fits_the_card(rows):
    over = [f"{_where(r)}: {r['shared']} > {r['smem_limit']}" for r in rows
            if r["ok"] and r["shared"] > r["smem_limit"]]
    assert not over, "\n".join(over)


def test_hot_path_kernels_do_not_spill(rows):
    spills = [f"{_where(r)}: {r['registers']} registers, {r['spill_stores']} B spill stores, {r['spill_loads']} B "
              f"spill loads" for r in rows if r["hot"] and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, "\n".join(spills)


def test_hot_path_kernels_have_no_ptxas_performance_warning(rows):
    warned = [f"{_where(r)}: {w}" for r in rows if r["hot"] for w in r["warnings"]]
    assert not warned, "\n".join(warned)


def test_hopper_gemms_use_wgmma(rows):
    """The big GEMMs of the large-T regime run on wgmma. Not required of the shrink with dropout: its masked x tile
    enters as the B operand of acc^T [C tile, T tile], whose 32 rows (C = 160 in tiles of 32) are below wgmma's 64,
    so it runs mma.sync; it is a 4 % side kernel."""
    big = [r for r in rows if r["arch"] == "sm_90a" and r["regime"] == "large" and r["hot"]
           and r["kernel"] in ("_dual_gemm_tma_kernel", "_tn_gemm_kernel", "_shrink_kernel", "_dhg_kernel")
           and not (r["kernel"] == "_shrink_kernel" and r["config"].get("HAS_DROPOUT"))]
    assert big and all(r["wgmma"] for r in big), [_where(r) for r in big if not r["wgmma"]]


def test_the_matrix_covers_every_regime_path_and_flag(rows):
    hot = [r for r in rows if r["hot"]]
    assert {(r["regime"], r["path"]) for r in hot} == {(g, p) for g in ("decode", "large")
                                                       for p in ("dense", "topk", "router")}
    assert {r["dtype"] for r in hot if r["regime"] == "large"} == {"bf16", "fp16"}
    tma = {r["case"] for r in hot if r["kernel"] == "_dual_gemm_tma_kernel"}
    assert {"dual_gemm_tma y bias=True dropout=False", "dual_gemm_tma y bias=False dropout=False",
            "dual_gemm_tma dx bias=False dropout=True"} <= tma
    assert {r["config"]["HAS_DROPOUT"] for r in hot if r["kernel"] == "_shrink_kernel"} == {True, False}


def test_gate_flags_what_it_should():
    """The parser behind the gate, on ptxas's own words (the two-accumulator dual GEMM of 2026-11 under Triton
    3.6: 255 registers, 1596 B of spills and C7512) and on a clean report."""
    import aot_compile as ac

    bad = ("ptxas info    : Compiling entry function '_dual_gemm_tma_kernel' for 'sm_90a'\n"
           "ptxas warning : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
           "insufficient register resources for the function '_dual_gemm_tma_kernel'\n"
           "ptxas info    : Function properties for _dual_gemm_tma_kernel\n"
           "    1596 bytes stack frame, 1596 bytes spill stores, 1596 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1596 bytes cumulative stack size\n")
    report = ac.parse_ptxas(bad)
    assert (report["registers"], report["spill_stores"], report["spill_loads"]) == (255, 1596, 1596)
    assert len(report["warnings"]) == 1 and ac.serialized_wgmma(report["warnings"])
    good = ac.parse_ptxas("ptxas info    : Function properties for k\n    0 bytes stack frame, 0 bytes spill stores, "
                          "0 bytes spill loads\nptxas info    : Used 160 registers, used 1 barriers\n")
    assert (good["registers"], good["spill_stores"], good["warnings"]) == (160, 0, [])
    assert ac.occupancy("90a", 160, 213016, 8) == 1 and ac.occupancy("90a", 64, 40960, 4) == 5
