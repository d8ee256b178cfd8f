"""Loads csrc/ compiled for the CPU against tests/cuda_emu (an emulation of the CUDA runtime, fp16/bf16 and WMMA),
so the extension's kernels and launchers run in CI without a GPU, compared with the torch reference like the
Triton kernels under TRITON_INTERPRET=1.

The library is built once per source hash with g++ into .pytest_cache (each source its own cached object, compiled
in parallel; the kernels' objects are shared by both libraries). PFK_EMU_SANITIZE=1 builds
it with AddressSanitizer and UBSan (run python with the ASan runtime preloaded: tests/test_cuda_emulated.py's
memcheck test does this in a subprocess).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
KERNEL_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
LAUNCH_LOG_SOURCE = EMU / "launch_log.cpp"
HEADERS = (sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh"))
           + sorted((EMU / "include").glob("*")))
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/include/pfk_common.h DType
SANITIZE = os.environ.get("PFK_EMU_SANITIZE") == "1"

_LIB = None
_OPS_LIBRARY: Path | None = None


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _compile(src: Path, flags: list[str], out_dir: Path, headers_digest: bytes) -> Path:
    """One translation unit to an object file, cached by the hash of its source, every header and the flags (so
    the kernels compiled once serve both libraries below)."""
    digest = hashlib.sha256(headers_digest + src.read_bytes() + " ".join(flags).encode())
    obj = out_dir / f"{src.stem}_{digest.hexdigest()[:16]}.o"
    if not obj.exists():
        tmp = obj.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        cmd = [compiler(), *flags, "-c", "-x", "c++", str(src), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if res.returncode != 0:
            raise RuntimeError(f"building the emulated kernels failed ({src.name}):\n{res.stderr[-4000:]}")
        os.replace(tmp, obj)
    return obj


def _build(entry: Path, name: str, extra: list[str] = (), link: list[str] = ()) -> Path:
    """g++ builds csrc/'s kernels (as C++) plus `entry` into a shared library, once per hash of its inputs. Each
    source compiles to its own cached object, as many at a time as there are cores."""
    flags = ["-std=c++20", "-fPIC", "-pthread", "-fno-strict-aliasing", "-DPFK_CUDA_EMULATION",
             f"-I{EMU / 'include'}", f"-I{ROOT / 'csrc' / 'include'}"]
    flags += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if SANITIZE else ["-O2"]
    headers = hashlib.sha256()
    for p in HEADERS:
        headers.update(p.read_bytes())
    out_dir = ROOT / ".pytest_cache" / "cuda_emu"
    out_dir.mkdir(parents=True, exist_ok=True)
    units = [(src, flags) for src in [*KERNEL_SOURCES, LAUNCH_LOG_SOURCE]] + [(entry, flags + list(extra))]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(lambda u: _compile(u[0], u[1], out_dir, headers.digest()), units))
    digest = hashlib.sha256(" ".join(str(o.name) for o in objects).encode() + " ".join(flags + list(link)).encode())
    lib = out_dir / f"lib{name}_{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler(), *flags, "-shared", *map(str, objects), *link, "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if res.returncode != 0:
            raise RuntimeError(f"linking the emulated kernels failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, lib)
    return lib


def load_ops() -> object:
    """csrc/personafuse_ops.cpp itself (checks, allocation, launches) built against the emulator and registered
    as torch.ops.personafuse_emu for CPU tensors: the cuda backend's Python code runs on it in tests."""
    global _OPS_LIBRARY
    if _OPS_LIBRARY is None:
        import sysconfig

        from torch.utils import cpp_extension

        from personafuse_kernels.ops.cuda_fakes import register

        includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        torch_lib = Path(torch.__file__).parent / "lib"
        link = [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
        path = _build(ROOT / "csrc" / "personafuse_ops.cpp", "pfk_emu_ops", [*includes, abi], link)
        torch.ops.load_library(str(path))
        register("personafuse_emu")  # the fake implementations, as the real extension gets them
        _OPS_LIBRARY = path
    return torch.ops.personafuse_emu


def take_launch_log() -> list[tuple[int, int, int, bool]]:
    """The kernel launches the emulated ops made since the last call, in order: (blocks, threads, dynamic shared
    memory bytes, cooperative)."""
    load_ops()
    library = ctypes.CDLL(str(_OPS_LIBRARY))
    library.pfk_emu_launch_log_size.restype = ctypes.c_int64
    library.pfk_emu_take_launch_log.restype = ctypes.c_int64
    capacity = library.pfk_emu_launch_log_size() + 64  # room for launches another thread adds meanwhile
    buf = (ctypes.c_int64 * (4 * capacity))()
    n = library.pfk_emu_take_launch_log(buf, ctypes.c_int64(capacity))
    assert n <= capacity, f"{n} launches in the log, {capacity} read"
    return [(buf[4 * i], buf[4 * i + 1], buf[4 * i + 2], bool(buf[4 * i + 3])) for i in range(n)]


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
