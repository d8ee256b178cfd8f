"""Loads csrc/ compiled for the CPU against tests/cuda_emu (an emulation of the CUDA runtime, fp16/bf16 and WMMA),
so the extension's kernels and launchers run in CI without a GPU, compared with the torch reference like the
Triton kernels under TRITON_INTERPRET=1.

The library is built once per source hash with g++ (a few seconds) into .pytest_cache. PFK_EMU_SANITIZE=1 builds
it with AddressSanitizer and UBSan (run python with the ASan runtime preloaded: tests/test_cuda_emulated.py's
memcheck test does this in a subprocess).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
KERNEL_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
HEADERS = (sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh"))
           + sorted((EMU / "include").glob("*")))
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/include/pfk_common.h DType
SANITIZE = os.environ.get("PFK_EMU_SANITIZE") == "1"

_LIB = None
_OPS_LOADED = False


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _build(entry: Path, name: str, extra: list[str] = (), link: list[str] = ()) -> Path:
    """g++ builds csrc/'s kernels (as C++) plus `entry` into a shared library, once per hash of its inputs."""
    digest = hashlib.sha256()
    for p in KERNEL_SOURCES + HEADERS + [entry]:
        digest.update(p.read_bytes())
    flags = ["-std=c++20", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing", "-DPFK_CUDA_EMULATION",
             f"-I{EMU / 'include'}", f"-I{ROOT / 'csrc' / 'include'}", *extra]
    flags += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if SANITIZE else ["-O2"]
    digest.update(" ".join(flags + list(link)).encode())
    out_dir = ROOT / ".pytest_cache" / "cuda_emu"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"lib{name}_{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler(), *flags, "-x", "c++", *map(str, KERNEL_SOURCES), "-x", "none", str(entry), *link,
               "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if res.returncode != 0:
            raise RuntimeError(f"building the emulated kernels failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, lib)
    return lib


def load_ops() -> object:
    """csrc/personafuse_ops.cpp itself (checks, allocation, launches) built against the emulator and registered
    as torch.ops.personafuse_emu for CPU tensors: the cuda backend's Python code runs on it in tests."""
    global _OPS_LOADED
    if not _OPS_LOADED:
        import sysconfig

        from torch.utils import cpp_extension

        includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        torch_lib = Path(torch.__file__).parent / "lib"
        link = [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
        torch.ops.load_library(str(_build(ROOT / "csrc" / "personafuse_ops.cpp", "pfk_emu_ops", [*includes, abi],
                                          link)))
        _OPS_LOADED = True
    return torch.ops.personafuse_emu


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = ctypes.CDLL(str(_build(EMU / "entry.cpp", "pfk_emu")))
        _LIB.pfk_emu_failure.restype = ctypes.c_char_p
    return _LIB


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    if t is None:
        return ctypes.c_void_p(0)
    assert t.device.type == "cpu" and t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def i64(v: int) -> ctypes.c_int64:
    return ctypes.c_int64(int(v))


def i32(v: int) -> ctypes.c_int:
    return ctypes.c_int(int(v))


def check(rc: int, what: str) -> None:
    """A non-zero cudaError_t from an emulated launcher raises, with the device-side failure if there was one."""
    if rc != 0:
        raise RuntimeError(f"{what}: cudaError {rc} {lib().pfk_emu_failure().decode()}")


def poisoned(*shape, dtype) -> torch.Tensor:
    """An output buffer full of NaN: elements a kernel forgets to write stay NaN and fail the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype)
