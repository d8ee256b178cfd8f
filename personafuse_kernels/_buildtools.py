"""How the CUDA extension is compiled: shared by setup.py (ahead of time) and the JIT build on first use
(_extension.py), so both compile the same sources with the same flags.

setup.py loads this file by path, before the package can be imported: it must import nothing but the standard
library at the top.
"""
from __future__ import annotations

import os
import re
import shutil
import sysconfig
from pathlib import Path

DEFAULT_ARCH_LIST = "8.0;9.0"  # A100 and H100/H200: the cards the kernels are written for
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def real_nvcc(path: str) -> str:
    """Follow symlinks and tiny wrapper scripts (`exec /path/to/nvcc "$@"`) to the real nvcc binary."""
    real = os.path.realpath(path)
    try:
        if os.path.getsize(real) < 4096:
            text = Path(real).read_text(errors="ignore")
            match = re.search(r"exec\s+(\S*nvcc)\b", text)
            if match and os.path.exists(match.group(1)):
                return real_nvcc(match.group(1))
    except OSError:
        pass
    return real


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: CUDA_HOME / CUDA_PATH, else the folder of the real nvcc on PATH (torch's own guess
    goes wrong when nvcc is a wrapper script), else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    if nvcc is None:
        return None
    home = os.path.dirname(os.path.dirname(real_nvcc(nvcc)))
    return home if os.path.isdir(os.path.join(home, "include")) else None


def default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    return max(1, min(cores, int(mem_gib // 3)))  # nvcc with torch headers peaks near 3 GiB per job


def nvidia_wheel_includes() -> list[str]:
    """Header folders of the nvidia-* wheels that CUDA builds of torch pull in (cublas, cusparse, ...): the toolkit's
    include/ may lack them."""
    found = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        root = Path(base) / "nvidia"
        if root.is_dir():
            found += sorted(str(p) for p in root.glob("*/include") if p.is_dir())
    return found


def extension_sources(csrc: Path) -> list[Path]:
    """Every translation unit of the extension: the .cpp registration file and the .cu kernels."""
    return sorted(csrc.rglob("*.cpp")) + sorted(csrc.rglob("*.cu"))


def include_dirs(csrc: Path) -> list[str]:
    return [str(csrc / "include")] + nvidia_wheel_includes()
