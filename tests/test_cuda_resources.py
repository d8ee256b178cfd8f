"""The CUDA kernels of csrc/ compile for sm_80 and sm_90 without register spills or local-memory stack frames
(ptxas -v), checked without a GPU wherever nvcc is installed."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else shutil.which("nvcc"))
pytestmark = pytest.mark.skipif(not NVCC or not os.path.exists(NVCC), reason="nvcc not found")
SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_no_spills(source, arch, tmp_path):
    res = subprocess.run([NVCC, "-O3", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", f"-arch={arch}", "-Xptxas",
                          "-v", "-c", str(source), "-o", str(tmp_path / "k.o")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    assert frames, "ptxas printed no resource usage"
    assert all(f == ("0", "0", "0") for f in frames), f"{source.name} {arch}: stack/spills {frames}"


@pytest.mark.parametrize("source", ["lora/shrink_kernel.cu", "lora/dhg_kernel.cu", "topk/pair_gemm_kernel.cu",
                                    "topk/expand_kernel.cu", "topk/wgrad_kernel.cu"])
def test_tensor_core_kernels_use_tensor_cores(source, tmp_path):
    """The large-T and top-k kernels multiply on tensor cores (WMMA lowers to mma.sync / HMMA), fp16 and bf16."""
    ptx = tmp_path / "k.ptx"
    res = subprocess.run([NVCC, "-O3", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", "-arch=sm_80", "-ptx",
                          str(ROOT / "csrc" / source), "-o", str(ptx)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    text = ptx.read_text()
    assert re.search(r"wmma\.mma\.sync\.aligned\.(row|col)\.(row|col)\.m16n16k16\.f32\.bf16\.bf16\.f32", text), \
        "no bf16 mma"
    assert re.search(r"wmma\.mma\.sync\.aligned\.(row|col)\.(row|col)\.m16n16k16\.f32\.f32", text), "no fp16 mma"
