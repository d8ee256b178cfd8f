"""Guarded import of the compiled extension ``personafuse_kernels._C``.

Importing it loads csrc/ and registers its ops under torch.ops.personafuse. When it is missing or fails to
load, ``extension_error()`` says why and how to rebuild, and the `cuda` backend is reported unavailable.
"""
from __future__ import annotations

import functools

REBUILD_HINT = (
    "rebuild it with a CUDA build of torch and nvcc present: "
    "`pip install --no-build-isolation --no-deps -e .` (set CUDA_HOME if nvcc is a wrapper script; "
    "PERSONAFUSE_FORCE_CUDA_BUILD=1 makes a failed build an error)"
)


@functools.lru_cache(maxsize=None)
def load_extension():
    """Return (module or None, error message or None)."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.personafuse.gate_*)
    except ImportError as exc:
        from .build_info import build_info

        info = build_info()
        if not info.get("extension_built", False):
            reason = info.get("skip_reason") or "this install was made without it"
            return None, f"the CUDA extension was not built ({reason}); {REBUILD_HINT}"
        return None, f"the CUDA extension failed to load ({exc}); {REBUILD_HINT}"
    return _C, None


def extension_error() -> str | None:
    return load_extension()[1]


def require_extension():
    module, error = load_extension()
    if module is None:
        raise RuntimeError(error)
    return module
