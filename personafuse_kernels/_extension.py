"""Import of the compiled extension ``personafuse_kernels._C``, built ahead of time or, failing that, on first use.

Importing it loads csrc/ and registers its ops under torch.ops.personafuse. When the install has no extension
(torch was absent at build time, an isolated `pip install`, or no nvcc then) and this machine has a CUDA build
of torch, nvcc and a GPU, the extension is compiled on first use with torch.utils.cpp_extension (ninja), from the
sources the package carries (personafuse_kernels/_csrc in an install, csrc/ in a checkout). The build is cached
per torch version, CUDA version, target archs and source hash under PERSONAFUSE_CACHE_DIR (default
~/.cache/personafuse_kernels) and locked against concurrent builds. PERSONAFUSE_JIT=0 turns the JIT path off.

When the extension cannot be had, ``extension_error()`` says why and what to do, and the `cuda` backend is
reported unavailable.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import time
from pathlib import Path
from unittest import mock

from ._buildtools import CXX_FLAGS, DEFAULT_ARCH_LIST, NVCC_FLAGS, extension_sources, find_cuda_home, include_dirs

REBUILD_HINT = (
    "build it with a CUDA build of torch and nvcc present: `pip install --no-build-isolation .` (or `-e .` in a "
    "checkout; set CUDA_HOME if nvcc is a wrapper script; PERSONAFUSE_FORCE_CUDA_BUILD=1 makes a failed build an "
    "error), or let it compile on first use on a GPU machine (the JIT path; PERSONAFUSE_JIT=1)"
)


def sources_dir() -> Path | None:
    """The extension's C++/CUDA sources: shipped inside an installed package, or the checkout's csrc/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "personafuse_ops.cpp").is_file():
            return candidate
    return None


def jit_unavailable(need_gpu: bool = True) -> str | None:
    """Why the extension cannot be compiled here and now, or None when it can."""
    if os.environ.get("PERSONAFUSE_JIT", "1") == "0":
        return "PERSONAFUSE_JIT=0"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if find_cuda_home() is None:
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit folder)"
    if sources_dir() is None:
        return "this install carries no csrc/ sources"
    if need_gpu and not torch.cuda.is_available():
        return "no CUDA GPU is visible (the JIT build runs on first use on a GPU machine)"
    return None


def _arch_list() -> str:
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return DEFAULT_ARCH_LIST


def jit_cache_dir(arch_list: str) -> Path:
    """One folder per torch version, CUDA version, arch list and hash of the sources and flags."""
    import torch

    csrc = sources_dir()
    digest = hashlib.sha256(" ".join(CXX_FLAGS + NVCC_FLAGS).encode())
    for p in sorted(q for q in csrc.rglob("*") if q.is_file()):
        digest.update(p.relative_to(csrc).as_posix().encode() + p.read_bytes())
    base = Path(os.environ.get("PERSONAFUSE_CACHE_DIR", Path.home() / ".cache" / "personafuse_kernels"))
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{arch_list.replace(';', '_').replace('.', '')}"
    return base / "jit" / f"{tag}-{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock across processes (two workers starting at once build once; the second waits)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def jit_build(verbose: bool = False, need_gpu: bool = True):
    """Compile (or load the cached build of) the extension now and register it as personafuse_kernels._C.
    Raises RuntimeError saying why when it cannot."""
    why = jit_unavailable(need_gpu=need_gpu)
    if why is not None:
        raise RuntimeError(f"cannot JIT-build the CUDA extension: {why}")
    cuda_home = find_cuda_home()
    os.environ.setdefault("CUDA_HOME", cuda_home)  # read by torch.utils.cpp_extension when it is imported
    from torch.utils import cpp_extension

    arch_list = _arch_list()
    build_dir = jit_cache_dir(arch_list)
    build_dir.mkdir(parents=True, exist_ok=True)
    csrc = sources_dir()
    # cpp_extension reads the arch list from the environment: set for this build only
    with mock.patch.dict(os.environ, {"TORCH_CUDA_ARCH_LIST": arch_list}):
        with _file_lock(build_dir / "build.lock"):  # a second process waits here, then loads the first one's build
            cached = (build_dir / "_C.so").exists()
            print(f"[personafuse-kernels] {'loading the cached' if cached else 'compiling the'} CUDA extension for "
                  f"sm {arch_list} in {build_dir}" + ("" if cached else " (first use: minutes; later runs load it)"),
                  file=sys.stderr, flush=True)
            start = time.monotonic()
            module = cpp_extension.load(
                name="_C", sources=[str(p) for p in extension_sources(csrc)], extra_include_paths=include_dirs(csrc),
                extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS, build_directory=str(build_dir),
                verbose=verbose, is_python_module=True)
            if not cached:
                print(f"[personafuse-kernels] CUDA extension built in {time.monotonic() - start:.0f} s",
                      file=sys.stderr, flush=True)
    sys.modules[f"{__package__}._C"] = module
    return module


@functools.lru_cache(maxsize=None)
def load_extension():
    """Return (module or None, error message or None). Tries the installed _C, then the JIT build. Either way the
    ops' fake implementations (ops/cuda_fakes.py) are registered beside them."""
    module, error = _load_module()
    if module is not None:
        from .ops.cuda_fakes import register

        register("personafuse")
    return module, error


def _load_module():
    try:
        from . import _C  # noqa: F401  (registers torch.ops.personafuse.*)
    except ImportError as exc:
        from .build_info import build_info

        info = build_info()
        if info.get("extension_built", False):
            error = f"the CUDA extension failed to load ({exc})"
        else:
            reason = info.get("skip_reason") or "this install was made without it"
            error = f"the CUDA extension was not built ({reason})"
    else:
        return _C, None
    why_not = jit_unavailable()
    if why_not is None:
        try:
            return jit_build(), None
        except Exception as exc:  # reported as the reason the cuda backend is unavailable, with the build's error
            return None, f"{error}, and the JIT build failed: {str(exc).strip()[-2000:]}; {REBUILD_HINT}"
    return None, f"{error}; no JIT build either ({why_not}); {REBUILD_HINT}"


def extension_error() -> str | None:
    return load_extension()[1]


def require_extension():
    module, error = load_extension()
    if module is None:
        raise RuntimeError(error)
    return module
