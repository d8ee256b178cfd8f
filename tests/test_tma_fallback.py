"""The TMA dual GEMM falls back to the pointer kernel only when its config fails to compile, records why (for
`personafuse check` and the bench rows), and lets every other error through."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import personafuse_kernels as pfk

pytestmark = pytest.mark.skipif("triton" not in pfk.available_backends(), reason="triton backend unavailable")


class _FakeKernel:
    """Stands in for tk._dual_gemm_tma_kernel: `kernel[grid](...)` raises the given exception."""

    def __init__(self, exc):
        self.exc = exc

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise self.exc

        return launch


def _call(monkeypatch, exc):
    from personafuse_kernels.ops import routed_lora_triton as rt
    from personafuse_kernels.ops import triton_kernels as tk

    monkeypatch.setattr(tk, "_dual_gemm_tma_kernel", _FakeKernel(exc))
    monkeypatch.setattr(rt, "TMA_FALLBACKS", {})
    cfg = replace(rt.get_config("gemm", 4096, 64, 64, 32, "NVIDIA H200", False), tma=True, warp_specialize=False)
    out, x1, m1 = torch.empty(128, 64), torch.randn(128, 64), torch.randn(64, 64)
    x2, m2 = torch.randn(128, 32), torch.randn(64, 32)
    ok = rt.dual_gemm_tma(out, x1=x1, m1=m1, x2=x2, m2=m2, bias=None, seed=torch.empty(0, dtype=torch.int64),
                          dropout_p=0.0, cfg=cfg, m_trans=True, dropout_term2=False)
    return ok, rt.TMA_FALLBACKS, cfg


def test_compile_failure_falls_back_and_is_recorded(monkeypatch):
    from triton.compiler.errors import CompilationError

    exc = CompilationError("kernel.py", None, "wgmma needs more registers")
    with pytest.warns(UserWarning, match="failed to compile"):
        ok, fallbacks, cfg = _call(monkeypatch, exc)
    assert ok is False and cfg in fallbacks and "CompilationError" in fallbacks[cfg]


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: an illegal memory access"), ValueError("bad stride"),
                                 torch.OutOfMemoryError("out of memory")])
def test_other_errors_propagate(monkeypatch, exc):
    with pytest.raises(type(exc)):
        _call(monkeypatch, exc)
