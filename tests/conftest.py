import os
import random

import pytest
import torch
from profile_plugin import (  # noqa: F401  (hooks: --profile, the `long` marker, the time budget)
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_sessionfinish,
)

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from personafuse_kernels.selftest import rel_err  # noqa: E402  (after TRITON_INTERPRET is set; tests import it)

# Tolerances of a low-precision result against the float64 reference, relative to the reference's norm.
# flash-attention's rule for gradients is applied in tests: kernel error <= 3x the error of the same-dtype
# torch computation (plus a small absolute floor).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


def assert_within_3x(out: torch.Tensor, same_dtype: torch.Tensor, ref: torch.Tensor, name: str = "tensor",
                     floor: float = 1e-4):
    """The 3x rule for low precision (docs/testing.md): the error of `out` against the float64 reference `ref` is
    at most 3x the error of the same computation in torch in the same dtype (`same_dtype`), plus a small absolute
    floor."""
    err, err_same = rel_err(out, ref), rel_err(same_dtype, ref)
    assert err <= 3 * err_same + floor, f"{name}: relative error {err:.3e} > 3 x {err_same:.3e} + {floor:g}"


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, name: str = "tensor", atol: float = 0.0):
    """Relative-norm check that, on failure, prints where the worst elements are."""
    out, ref = out.detach(), ref.detach()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err = rel_err(out, ref)
    if err > rtol and float((out.double() - ref.double()).abs().max()) > atol:
        diff = (out.double() - ref.double()).abs()
        flat = diff.flatten().topk(min(5, diff.numel()))
        where = [tuple(int(i) for i in torch.unravel_index(idx, diff.shape)) for idx in flat.indices]
        details = ", ".join(
            f"{w}: {float(out.double()[w]):.6g} vs {float(ref.double()[w]):.6g}" for w in where
        )
        raise AssertionError(f"{name}: relative error {err:.3e} > {rtol:.1e}; worst at {details}")
