"""The CUDA kernels of csrc/ compile for sm_90a (H100/H200) and sm_80 (A100) without register spills or local-memory
stack frames (ptxas -v), checked without a GPU wherever nvcc is installed, and each entry function's occupancy by
registers and threads is reported (dynamic shared memory is sized at launch, so it is not in ptxas's figure)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from profile_plugin import PROFILE

ROOT = Path(__file__).resolve().parents[1]
NVCC = (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else shutil.which("nvcc"))
pytestmark = pytest.mark.skipif(not NVCC or not os.path.exists(NVCC), reason="nvcc not found")
SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
REGS_PER_SM, MAX_THREADS_PER_SM = 65536, 2048  # compute capability 8.0 and 9.0
ARCHS = ["sm_90a", "sm_80"] if PROFILE == "long" else ["sm_90a"]  # sm_80 in the long profile


def threads_per_block(source: Path) -> int:
    """The block size a source's kernels launch with: MmaTile's kThreads for the tensor-core kernels, else the
    file's own kThreads (its __launch_bounds__ or launch configuration)."""
    text = source.read_text()
    if "MmaTile<" in text:
        mma = (ROOT / "csrc" / "include" / "pfk_mma.cuh").read_text()
        return int(re.search(r"kThreads = (\d+)", mma).group(1))
    return int(re.search(r"constexpr int kThreads = (\d+)", text).group(1))


def ctas_per_sm(registers: int, threads: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256) and threads."""
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return min(REGS_PER_SM // (per_warp * warps), MAX_THREADS_PER_SM // threads)


def ptxas_report(source: Path, arch: str, tmp_path: Path) -> list[dict]:
    res = subprocess.run([NVCC, "-O3", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", f"-arch={arch}", "-Xptxas",
                          "-v", "-c", str(source), "-o", str(tmp_path / "k.o")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = []
    for block in res.stderr.split("Compiling entry function")[1:]:
        name = re.search(r"'([^']+)'", block).group(1)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        smem = re.search(r"(\d+) bytes smem", block)
        rows.append({"function": name, "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
                     "spill_loads": int(frame.group(3)), "registers": int(regs.group(1)),
                     "static_smem": int(smem.group(1)) if smem else 0,
                     "warnings": re.findall(r"\(C\d{4}\)[^\n]*", block)})
    assert rows, "ptxas printed no resource usage"
    return rows


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_no_spills_and_occupancy(source, arch, tmp_path):
    rows = ptxas_report(source, arch, tmp_path)
    threads = threads_per_block(source)
    bad = [r for r in rows if r["stack"] or r["spill_stores"] or r["spill_loads"] or r["warnings"]]
    assert not bad, f"{source.name} {arch}: " + "; ".join(
        f"{r['function'][:60]} stack {r['stack']} spills {r['spill_stores']}/{r['spill_loads']} {r['warnings']}"
        for r in bad)
    for r in rows:  # every kernel keeps at least one block of `threads` resident, and the report says how many
        ctas = ctas_per_sm(r["registers"], threads)
        print(f"{source.name} {arch} {r['function'][:70]}: {r['registers']} registers x {threads} threads -> "
              f"{ctas} blocks per SM by registers")
        assert ctas >= 1, f"{r['function']}: {r['registers']} registers x {threads} threads do not fit an SM"


def test_occupancy_arithmetic():
    assert ctas_per_sm(128, 128) == 4 and ctas_per_sm(255, 256) == 1 and ctas_per_sm(32, 256) == 8


@pytest.mark.parametrize("source", ["lora/shrink_kernel.cu", "lora/dhg_kernel.cu", "topk/pair_gemm_kernel.cu",
                                    "topk/expand_kernel.cu", "topk/wgrad_kernel.cu"])
def test_tensor_core_kernels_use_tensor_cores_and_cp_async(source, tmp_path):
    """The large-T and top-k kernels multiply on tensor cores (WMMA lowers to mma.sync / HMMA), fp16 and bf16, and
    every one of them feeds its tiles through the cp.async pipeline of pfk_mma.cuh: 16-byte copies that bypass L1
    (cp.async.cg), and a wait that keeps one younger group in flight (wait_group 1: 3 stages)."""
    ptx = tmp_path / "k.ptx"
    res = subprocess.run([NVCC, "-O3", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", "-arch=sm_80", "-ptx",
                          str(ROOT / "csrc" / source), "-o", str(ptx)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    text = ptx.read_text()
    assert re.search(r"wmma\.mma\.sync\.aligned\.(row|col)\.(row|col)\.m16n16k16\.f32\.bf16\.bf16\.f32", text), \
        "no bf16 mma"
    assert re.search(r"wmma\.mma\.sync\.aligned\.(row|col)\.(row|col)\.m16n16k16\.f32\.f32", text), "no fp16 mma"
    entries = re.split(r"\.entry\s+", text)[1:]
    assert entries
    for body in entries:
        name = body.split("(", 1)[0]
        assert "cp.async.cg.shared.global" in body, f"{name}: tiles are not loaded with cp.async"
        assert re.search(r"cp\.async\.wait_group\s+1;", body), f"{name}: no 3-stage wait (wait_group 1)"
