"""Facts about how this copy of personafuse-kernels was built (written by setup.py into _build_info.py)."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    try:
        from . import _build_info
    except ImportError:
        return {"extension_built": False, "skip_reason": "no build facts: the package was not installed by setup.py"}
    return {k: v for k, v in vars(_build_info).items() if not k.startswith("_")}
