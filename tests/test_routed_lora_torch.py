"""The torch backend (the oracle of every kernel) against the per-expert loop, and gradcheck in float64."""
import pytest
import torch
from conftest import REL_TOL, assert_close
from helpers import backward_grads, make_inputs, reference

import personafuse_kernels as pfk
from personafuse_kernels.ops.dropout import keep_mask, new_seed

SHAPES = [  # T, K, N, E, r
    (1, 33, 45, 1, 1),
    (7, 33, 45, 3, 4),
    (133, 45, 33, 10, 16),
    (7, 20, 24, 64, 2),
    (5, 16, 40, 2, 128),
]
GATE_MODES = ["token", "sequence", "single"]


def run_op(inputs, scaling, dropout_p=0.0, backend="torch"):
    return pfk.routed_lora(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"],
                           inputs["gates"], scaling=scaling, dropout_p=dropout_p, backend=backend)


@pytest.mark.parametrize("T,K,N,E,r", SHAPES)
@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_forward_and_grads_match_per_expert_loop(T, K, N, E, r, gate_mode):
    inputs = make_inputs(T, K, N, E, r, gate_mode=gate_mode)
    scaling = torch.linspace(0.5, 2.0, E)  # per-expert scaling
    y = run_op(inputs, scaling)
    y_ref, leaves = reference(inputs, scaling)
    assert_close(y, y_ref, REL_TOL[torch.float32], "y")
    dy = torch.randn_like(y)
    grads = backward_grads(y, inputs, dy)
    ref_grads = backward_grads(y_ref, leaves, dy.double())
    for name in ("x", "weight", "bias", "lora_A", "lora_B", "gates"):
        assert_close(grads[name], ref_grads[name], REL_TOL[torch.float32], f"d{name}")


@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(gate_mode, bias):
    inputs = make_inputs(5, 9, 7, 3, 2, dtype=torch.float64, gate_mode=gate_mode, bias=bias)
    names = [k for k, v in inputs.items() if v is not None]
    scaling = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)

    def fn(*tensors):
        return run_op(dict(zip(names, tensors), **({} if bias else {"bias": None})), scaling)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names))


def test_gradcheck_float64_with_dropout():
    inputs = make_inputs(6, 8, 5, 2, 3, dtype=torch.float64)
    names = list(inputs)

    def fn(*tensors):
        torch.manual_seed(123)  # same seed every evaluation: same mask
        return run_op(dict(zip(names, tensors)), 1.5, dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names))


@pytest.mark.parametrize("gate_mode", ["token", "sequence"])
def test_dropout_mask_same_in_forward_and_backward(gate_mode):
    T, K, N, E, r, p = 7, 33, 45, 3, 4, 0.25
    inputs = make_inputs(T, K, N, E, r, gate_mode=gate_mode)
    torch.manual_seed(7)
    seed = new_seed(torch.device("cpu"))
    rows = inputs["x"].reshape(-1, K).shape[0]
    keep = keep_mask(seed, rows, K, p)
    assert 0.6 < keep.float().mean() < 0.9, "the mask should keep about 1 - p of the inputs"
    torch.manual_seed(7)
    y = run_op(inputs, 2.0, dropout_p=p)
    y_ref, leaves = reference(inputs, 2.0, keep=keep, dropout_p=p)
    assert_close(y, y_ref, REL_TOL[torch.float32], "y")
    dy = torch.randn_like(y)
    grads = backward_grads(y, inputs, dy)
    ref_grads = backward_grads(y_ref, leaves, dy.double())
    for name in ("x", "lora_A", "lora_B", "gates", "weight", "bias"):
        assert_close(grads[name], ref_grads[name], REL_TOL[torch.float32], f"d{name}")


def test_dropout_differs_between_calls_and_is_identity_at_zero():
    inputs = make_inputs(16, 32, 24, 2, 4)
    a = run_op(inputs, 1.0, dropout_p=0.5)
    b = run_op(inputs, 1.0, dropout_p=0.5)
    assert not torch.equal(a, b)
    assert torch.equal(run_op(inputs, 1.0), run_op(inputs, 1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_torch_rule(dtype):
    """Error of the op in dtype vs float64 is at most 3x that of the plain same-dtype per-expert loop."""
    inputs = make_inputs(33, 64, 48, 4, 8, dtype=dtype)
    scaling = 2.0
    y = run_op(inputs, scaling)
    assert y.dtype == dtype
    y64, leaves64 = reference(inputs, scaling)
    y_lp, leaves_lp = reference(inputs, scaling, dtype=dtype)
    dy = torch.randn_like(y)
    grads = backward_grads(y, inputs, dy)
    g64 = backward_grads(y64, leaves64, dy.double())
    glp = backward_grads(y_lp, leaves_lp, dy)
    from conftest import assert_within_3x

    assert_within_3x(y, y_lp, y64, "y", floor=1e-3)
    for name in ("x", "lora_A", "lora_B", "gates", "weight", "bias"):
        assert grads[name].dtype == inputs[name].dtype
        assert_within_3x(grads[name], glp[name], g64[name], name, floor=1e-3)


def test_float32_gates_with_bf16_inputs():
    inputs = make_inputs(7, 33, 45, 3, 4, dtype=torch.bfloat16, gate_dtype=torch.float32)
    y = run_op(inputs, 1.0)
    y.float().sum().backward()
    assert inputs["gates"].grad.dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_frozen_base_gets_no_grad_and_only_needed_grads_run():
    inputs = make_inputs(7, 33, 45, 3, 4)
    inputs["weight"].requires_grad_(False)
    inputs["bias"].requires_grad_(False)
    y = run_op(inputs, 1.0)
    y.sum().backward()
    assert inputs["weight"].grad is None and inputs["bias"].grad is None
    assert inputs["lora_A"].grad is not None and inputs["gates"].grad is not None


def test_leading_dims_are_kept():
    inputs = make_inputs(5, 16, 12, 2, 2, batch=3)
    y = run_op(inputs, 1.0)
    assert y.shape == (3, 5, 12)


def test_unit_gate_single_expert_equals_plain_lora():
    """E = 1 with gate 1: y = x W^T + b + s (x A^T) B^T exactly."""
    inputs = make_inputs(7, 33, 45, 1, 4)
    with torch.no_grad():
        inputs["gates"].fill_(1.0)
    y = run_op(inputs, 0.5)
    x, A, B = inputs["x"], inputs["lora_A"][0], inputs["lora_B"][0]
    expect = x @ inputs["weight"].t() + inputs["bias"] + 0.5 * (x @ A.t()) @ B.t()
    assert_close(y, expect, 1e-6, "y")


def test_autocast_runs_in_the_autocast_dtype():
    inputs = make_inputs(7, 32, 24, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run_op(inputs, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert inputs["lora_A"].grad.dtype == torch.float32  # gradients reach the fp32 leaves through the casts


def test_non_contiguous_inputs_give_the_same_result():
    inputs = make_inputs(7, 33, 45, 3, 4)
    y = run_op(inputs, 1.0)
    nc = {k: (v.detach().t().contiguous().t() if v.dim() == 2 else v.detach()) for k, v in inputs.items()}
    nc["lora_A"] = inputs["lora_A"].detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided
    assert not nc["weight"].is_contiguous() and not nc["lora_A"].is_contiguous()
    assert_close(run_op(nc, 1.0), y, 1e-6, "y")


def test_fake_tensor_shapes_without_compute():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, W = torch.randn(3, 5, 16), torch.randn(12, 16)
        A, B = torch.randn(4, 2, 16), torch.randn(4, 12, 2)
        y = pfk.routed_lora(x, W, None, A, B, torch.rand(3, 4), scaling=2.0)
    assert y.shape == (3, 5, 12)
