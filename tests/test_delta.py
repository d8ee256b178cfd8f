"""routed_lora_delta: the routed term alone, added in place into an output another kernel computed (a quantized
base, an engine's GEMM, an fp32 accumulator), on every backend and gate layout, forward and every gradient,
against routed_lora minus its base (the same op's reference)."""
import pytest
import torch
from helpers import make_inputs

import personafuse_kernels as pfk

BACKENDS = ["torch"] + (["triton"] if "triton" in pfk.available_backends() else [])


def reference(ins, gates, scaling, dropout_p, seed):
    """routed_lora(...) - x W^T - b, and its gradients (dx without the base's dY W)."""
    torch.manual_seed(seed)
    y = pfk.routed_lora(ins["x"], ins["weight"], ins["bias"], ins["lora_A"], ins["lora_B"], gates, scaling=scaling,
                        dropout_p=dropout_p, backend="torch")
    base = torch.nn.functional.linear(ins["x"], ins["weight"], ins["bias"])
    return y - base


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_mode", ["token", "sequence", "single", "topk"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64, torch.bfloat16, None])
def test_delta_matches_routed_lora_minus_base(backend, gate_mode, out_dtype):
    T, K, N, E, r = 7, 33, 45, 4, 8
    mode = "token" if gate_mode == "topk" else gate_mode
    ins = make_inputs(T, K, N, E, r, gate_mode=mode, batch=3 if mode == "sequence" else None)
    gates = ins["gates"]
    if gate_mode == "topk":
        idx = torch.tensor([[0, 2], [1, -1], [-1, -1], [3, 0], [2, 1], [0, -1], [1, 3]])
        gates = pfk.TopKGates(idx, torch.rand(T, 2).requires_grad_())
    wrt = [ins["x"], ins["lora_A"], ins["lora_B"], gates.weights if gate_mode == "topk" else gates]
    ref = reference(ins, gates, 2.0, 0.1, seed=11)
    dy = torch.randn(ref.shape)
    ref_grads = torch.autograd.grad(ref, wrt, dy)

    base = torch.randn(ref.shape).to(out_dtype or torch.float32)
    out = None if out_dtype is None else base.clone()
    torch.manual_seed(11)
    got = pfk.routed_lora_delta(ins["x"], ins["lora_A"], ins["lora_B"], gates, scaling=2.0, dropout_p=0.1,
                                backend=backend, out=out)
    if out is not None:
        assert got is out and got.dtype == out_dtype
        delta = got.double() - base.double()
    else:
        assert got.dtype == ins["x"].dtype
        delta = got.double()
    grads = torch.autograd.grad(got, wrt, dy.to(got.dtype))
    if out_dtype == torch.bfloat16:
        # a bf16 accumulator rounds base + delta to 8 bits of mantissa, and dout reaches the gradients in bf16:
        # compare normwise, within a few bf16 roundings of the largest value
        for a, b, name in zip([delta, *grads], [ref, *ref_grads], ["delta", "x", "lora_A", "lora_B", "gates"]):
            err = (a.double() - b.double()).abs().max() / b.double().abs().max()
            assert err < 2e-2, f"{name}: normwise error {err:.2e}"
        return
    torch.testing.assert_close(delta, ref.double(), rtol=1e-4, atol=1e-5)
    for g, want, name in zip(grads, ref_grads, ["x", "lora_A", "lora_B", "gates"]):
        torch.testing.assert_close(g.double(), want.double(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_out_keeps_its_own_gradient_path():
    """out's earlier value gets dout (an in-place add), and the result is what out.add_(delta) would give."""
    ins = make_inputs(5, 16, 12, 3, 4)
    w = torch.randn(12, 16, requires_grad=True)
    out = ins["x"].detach() @ w.t()  # out depends on w: its gradient must flow through the in-place add
    pfk.routed_lora_delta(ins["x"], ins["lora_A"], ins["lora_B"], ins["gates"], out=out)
    dy = torch.randn(5, 12)
    (gw,) = torch.autograd.grad(out, [w], dy)
    torch.testing.assert_close(gw, dy.t() @ ins["x"].detach())


def test_delta_second_order():
    ins = make_inputs(5, 16, 12, 3, 4, dtype=torch.float64)
    out = torch.zeros(5, 12, dtype=torch.float64)
    y = pfk.routed_lora_delta(ins["x"], ins["lora_A"], ins["lora_B"], ins["gates"], out=out, backend="torch")
    (gx,) = torch.autograd.grad(y.sum(), [ins["x"]], create_graph=True)
    (gA,) = torch.autograd.grad(gx.pow(2).sum(), [ins["lora_A"]])
    assert torch.isfinite(gA).all() and gA.abs().sum() > 0


def test_delta_rejects_bad_out():
    ins = make_inputs(5, 16, 12, 3, 4)
    args = (ins["x"], ins["lora_A"], ins["lora_B"], ins["gates"])
    with pytest.raises(RuntimeError, match="leaf that requires grad"):
        pfk.routed_lora_delta(*args, out=torch.zeros(5, 12, requires_grad=True))
    with pytest.raises(ValueError, match=r"\(5, 12\)"):
        pfk.routed_lora_delta(*args, out=torch.zeros(5, 13))
    with pytest.raises(TypeError, match="floating-point"):
        pfk.routed_lora_delta(*args, out=torch.zeros(5, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        pfk.routed_lora_delta(*args, out=torch.zeros(12, 5).t())


def test_delta_empty_and_meta():
    ins = make_inputs(0, 16, 12, 3, 4)
    out = torch.zeros(0, 12)
    assert pfk.routed_lora_delta(ins["x"], ins["lora_A"], ins["lora_B"], ins["gates"], out=out) is out
    x = torch.empty(4, 16, device="meta")
    y = pfk.routed_lora_delta(x, torch.empty(3, 4, 16, device="meta"), torch.empty(3, 12, 4, device="meta"),
                              torch.empty(4, 3, device="meta"))
    assert y.shape == (4, 12) and y.device.type == "meta"
