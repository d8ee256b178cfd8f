"""The CUDA extension: built, importable, registers CUDA kernels; on a GPU its gate kernels match torch."""
import os

import pytest
import torch
from conftest import assert_within_3x, requires_cuda

import personafuse_kernels as pfk
from personafuse_kernels._extension import load_extension
from personafuse_kernels.ops.routed_lora_torch import TorchGateOps

OPS = ("gate_forward", "gate_backward", "lora_decode_", "lora_decode_linear", "lora_shrink", "lora_dhg")


def _built() -> bool:
    return bool(pfk.build_info().get("extension_built"))


def test_build_facts_are_recorded():
    info = pfk.build_info()
    assert "extension_built" in info
    if info["extension_built"]:
        assert info["torch_version"] and info["cuda_arch_list"]
    else:
        assert info["skip_reason"]


def test_extension_required_where_the_build_can_compile_it():
    """The test script sets PERSONAFUSE_REQUIRE_EXTENSION=1 with a CUDA torch: CI must compile and link it."""
    if os.environ.get("PERSONAFUSE_REQUIRE_EXTENSION") != "1":
        pytest.skip("PERSONAFUSE_REQUIRE_EXTENSION is not set")
    module, error = load_extension()
    assert module is not None, error


def test_extension_registers_cuda_kernels():
    if not _built():
        pytest.skip(f"extension not built: {pfk.build_info().get('skip_reason')}")
    module, error = load_extension()
    assert module is not None, error
    for op in OPS:
        name = f"personafuse::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
        assert hasattr(torch.ops.personafuse, op)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,E,r,seq_len", [(1, 1, 1, 1), (7, 3, 4, 1), (133, 10, 16, 1), (12, 64, 2, 4),
                                           (4096, 10, 16, 2048)])
def test_gate_kernels_match_torch(dtype, T, E, r, seq_len):
    load_extension()
    dev = "cuda"
    H = torch.randn(T, E * r, device=dev, dtype=dtype)
    dHg = torch.randn(T, E * r, device=dev, dtype=dtype)
    gates = torch.rand(T // seq_len, E, device=dev)
    scaling = torch.linspace(0.5, 2.0, E, device=dev)
    Hg = torch.ops.personafuse.gate_forward(H, gates, scaling, seq_len)
    Hg_ref = TorchGateOps.forward(H, gates, scaling, seq_len)
    torch.testing.assert_close(Hg, Hg_ref)
    dH, dg = torch.ops.personafuse.gate_backward(dHg, H, gates, scaling, seq_len)
    dH_ref, dg_ref = TorchGateOps.backward(dHg, H, gates, scaling, seq_len)
    torch.testing.assert_close(dH, dH_ref)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-4, atol=1e-4)
    dH2, dg2 = torch.ops.personafuse.gate_backward(dHg, H, gates, scaling, seq_len)
    assert torch.equal(dg, dg2), "gate_backward must be deterministic"


@requires_cuda
def test_gate_kernels_reject_bad_input():
    load_extension()
    H = torch.randn(8, 6, device="cuda")
    gates = torch.rand(8, 3, device="cuda")
    s = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.personafuse.gate_forward(H.cpu(), gates, s, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.personafuse.gate_forward(H.t(), torch.rand(6, 3, device="cuda"), s, 1)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.personafuse.gate_forward(H, gates.half(), s, 1)
    with pytest.raises(RuntimeError, match="seq_len"):
        torch.ops.personafuse.gate_forward(H, gates, s, 3)


@requires_cuda
@pytest.mark.parametrize("gate_mode", ["token", "sequence"])
def test_cuda_backend_matches_torch_backend(gate_mode):
    from helpers import make_inputs

    if "cuda" not in pfk.available_backends():
        pytest.skip(str(pfk.unavailable_reasons().get("cuda")))
    inputs = make_inputs(133, 45, 33, 10, 16, device="cuda", gate_mode=gate_mode)
    outs = {}
    for backend in ("torch", "cuda"):
        for t in inputs.values():
            if t is not None:
                t.grad = None
        y = pfk.routed_lora(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"],
                            inputs["gates"], scaling=2.0, backend=backend)
        y.backward(torch.ones_like(y))
        outs[backend] = [y.detach()] + [inputs[k].grad.clone() for k in ("x", "lora_A", "lora_B", "gates")]
    for a, b in zip(outs["cuda"], outs["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,K,N,E,r,seq_len", [(1, 4096, 4096, 10, 16, 1), (16, 4096, 4096, 10, 16, 8),
                                               (64, 4096, 4096, 10, 16, 1), (7, 45, 33, 3, 4, 7), (5, 96, 40, 64, 2, 1),
                                               (3, 200, 130, 2, 128, 3), (1, 33, 45, 1, 1, 1)])
def test_decode_kernel_matches_torch_backend(dtype, T, K, N, E, r, seq_len):
    """One cooperative launch (base GEMV + shrink + gate + expand), and the same kernel adding the LoRA term into a
    base output computed elsewhere (routed_lora_delta), against the stacked torch path."""
    from personafuse_kernels.ops import routed_lora_cuda, routed_lora_torch

    load_extension()
    g = torch.Generator(device="cuda").manual_seed(T * 7 + E)
    x = torch.randn(T, K, device="cuda", dtype=dtype, generator=g)
    W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / K**0.5
    b = torch.randn(N, device="cuda", dtype=dtype, generator=g)
    A = torch.randn(E, r, K, device="cuda", dtype=dtype, generator=g) / K**0.5
    B = torch.randn(E, N, r, device="cuda", dtype=dtype, generator=g) / r**0.5
    gates = torch.rand(T // seq_len, E, device="cuda", generator=g)
    s = torch.linspace(0.5, 2.0, E, device="cuda")
    seed = torch.empty(0, dtype=torch.int64, device="cuda")
    assert routed_lora_cuda.use_decode_kernel(x, A, 0.0)
    y, H = routed_lora_cuda.forward(x, W, b, A, B, gates, s, seed, seq_len, 0.0)
    y_ref, H_ref = routed_lora_torch.forward(x, W, b, A, B, gates, s, seed, seq_len, 0.0)
    y64 = routed_lora_torch.forward(*(t.double() for t in (x, W, b, A, B, gates, s)), seed, seq_len, 0.0)[0]
    assert_within_3x(y, y_ref, y64, "y")
    torch.testing.assert_close(H, H_ref, rtol=2e-2, atol=2e-2)
    y2, _ = routed_lora_cuda.forward(x, W, b, A, B, gates, s, seed, seq_len, 0.0)
    assert torch.equal(y, y2), "the decode kernel must be deterministic"
    out = torch.nn.functional.linear(x, W, b)
    H3 = routed_lora_cuda.delta_forward(out, x, A, B, gates, s, seed, seq_len, 0.0)
    assert_within_3x(out, y_ref, y64, "y (LoRA term into a given base output)")
    torch.testing.assert_close(H3, H_ref, rtol=2e-2, atol=2e-2)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,K,N,E,r,gate_mode,dropout_p", [
    (133, 45, 33, 10, 16, "token", 0.0),
    (1024, 256, 320, 10, 16, "sequence", 0.0),
    (700, 96, 72, 64, 2, "token", 0.3),
    (300, 40, 50, 2, 128, "single", 0.0),
    (97, 130, 66, 5, 24, "token", 0.1),
    (65, 64, 64, 1, 1, "sequence", 0.0),
])
def test_tensor_core_path_within_3x_of_torch_same_dtype(dtype, T, K, N, E, r, gate_mode, dropout_p):
    """The cuda backend's large-T path (tensor-core shrink and dHg kernels + cuBLAS): output and every gradient
    within 3x the error of the same-dtype torch backend against float64 (the 3x rule of docs/testing.md), same
    dropout mask."""
    from helpers import backward_grads, make_inputs

    from personafuse_kernels.ops import routed_lora_cuda

    if "cuda" not in pfk.available_backends():
        pytest.skip(str(pfk.unavailable_reasons().get("cuda")))
    inputs = make_inputs(T, K, N, E, r, dtype=dtype, device="cuda", gate_mode=gate_mode, gate_dtype=torch.float32,
                         batch=2 if gate_mode == "sequence" else None)
    x2 = inputs["x"].reshape(-1, K)
    assert routed_lora_cuda.use_tensor_core_kernels(x2, r) and not (
        dropout_p == 0.0 and routed_lora_cuda.use_decode_kernel(x2, inputs["lora_A"], 0.0))
    scaling = torch.linspace(0.5, 2.0, E, device="cuda")

    def run(backend, leaves, dy=None):
        torch.manual_seed(5)  # the same dropout seed for every backend
        y = pfk.routed_lora(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                            leaves["gates"], scaling=scaling, dropout_p=dropout_p, backend=backend)
        dy = torch.randn_like(y) if dy is None else dy
        return y, backward_grads(y, leaves, dy.to(y.dtype)), dy

    def copy(dt=None):
        return {k: (None if v is None else v.detach().to(dt or v.dtype).requires_grad_(True))
                for k, v in inputs.items()}

    y, g, dy = run("cuda", copy())
    y_lp, g_lp, _ = run("torch", copy(), dy)
    y64, g64, _ = run("torch", copy(torch.float64), dy)
    assert y.dtype == dtype
    assert_within_3x(y, y_lp, y64, "y")
    for name, ref in g64.items():
        assert_within_3x(g[name], g_lp[name], ref, name)
    y2, g2, _ = run("cuda", copy(), dy)
    assert torch.equal(y, y2) and all(torch.equal(g[k], g2[k]) for k in g), "the cuda path must be deterministic"


@requires_cuda
def test_tensor_core_kernels_reject_bad_input():
    load_extension()
    x = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(2, 4, 16, device="cuda", dtype=torch.bfloat16)
    gates = torch.rand(8, 2, device="cuda")
    s = torch.ones(2, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    op = torch.ops.personafuse.lora_shrink
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        op(x.float(), A.float(), gates, s, seed, 1, 0.0)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, A.half(), gates, s, seed, 1, 0.0)
    with pytest.raises(RuntimeError, match="ranks 1 to 128"):
        op(x, torch.randn(2, 129, 16, device="cuda", dtype=torch.bfloat16), gates, s, seed, 1, 0.0)
    with pytest.raises(RuntimeError, match="dropout_p"):
        op(x, A, gates, s, seed, 1, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.t().contiguous().t(), A, gates, s, seed, 1, 0.0)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.personafuse.lora_dhg(x, torch.randn(2, 15, 4, device="cuda", dtype=torch.bfloat16),
                                       torch.randn(8, 8, device="cuda", dtype=torch.bfloat16), gates, s, 1)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K,N,E,r,k,pattern,dropout_p", [
    (133, 64, 48, 8, 16, 2, "uniform", 0.0),
    (1024, 256, 320, 64, 16, 2, "zipf", 0.0),
    (300, 96, 72, 128, 8, 1, "skewed", 0.2),
    (77, 40, 50, 16, 72, 4, "all_to_one", 0.0),
    (50, 33, 45, 32, 5, 2, "empty_experts", 0.1),
])
def test_topk_grouped_cuda_within_3x_of_torch_same_dtype(monkeypatch, dtype, T, K, N, E, r, k, pattern, dropout_p):
    """The cuda backend's grouped top-k kernels (csrc/topk/): output and every gradient within 3x the error of
    the same-dtype torch reference (dense gates with zeros off the top-k) against float64, same dropout mask;
    deterministic."""
    from test_topk import NAMES, inputs, run

    if "cuda" not in pfk.available_backends():
        pytest.skip(str(pfk.unavailable_reasons().get("cuda")))
    monkeypatch.setenv("PERSONAFUSE_TOPK_PATH", "grouped")
    ins, idx = inputs(T, K, N, E, r, k, pattern, dtype=dtype, seed=E + k)
    out = run(ins, idx, "cuda", dropout_p)
    out_lp = run(ins, idx, "torch", dropout_p)
    ins64 = {name: v.detach().double().requires_grad_(True) for name, v in ins.items()}
    out64 = run(ins64, idx, "torch", dropout_p)
    for got, same_dtype, ref, name in zip(out, out_lp, out64, NAMES):
        assert got.dtype == same_dtype.dtype, name
        assert_within_3x(got, same_dtype, ref, name)
    again = run(ins, idx, "cuda", dropout_p)
    assert all(torch.equal(a, b) for a, b in zip(out, again)), "the grouped cuda path must be deterministic"


def test_python_limits_match_the_cuda_sources():
    """The Python side's copies of csrc's limits (which path a call takes) agree with the C++ constants."""
    import re
    from pathlib import Path

    from personafuse_kernels.dispatch import BACKENDS
    from personafuse_kernels.ops import routed_lora_cuda

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    text = (csrc / "include" / "pfk_lora.h").read_text() + (csrc / "topk" / "topk_block.cuh").read_text()

    def const(name):
        return int(re.search(rf"constexpr int(?:64_t)? {name} = (\d+);", text).group(1))

    assert const("kTensorCoreMaxRank") == routed_lora_cuda.TENSOR_CORE_MAX_RANK
    assert const("kDecodeMaxTokens") == routed_lora_cuda.DECODE_MAX_TOKENS
    assert const("kDecodeMaxWidth") == routed_lora_cuda.DECODE_MAX_WIDTH
    assert const("kMaxBlockPairs") == BACKENDS["cuda"].topk_max_block
