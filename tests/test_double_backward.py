"""Second-order gradients (backward with create_graph=True: gradient penalties, Hessian-vector products).

The fused backward returns gradients with no graph, so under create_graph the op computes them with torch ops
(RoutedLoRAFunction.backward). Checked: torch.autograd.gradgradcheck in float64 (numerical second derivatives,
every input pair, dy included), and the gradient of a random projection of all first-order gradients against
the autograd per-expert loop, on the torch backend and on Triton (interpreter on CPU), dense and top-k gates.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import personafuse_kernels as pfk
from personafuse_kernels.ops.dropout import keep_mask
from personafuse_kernels.ops.routed_lora_torch import routed_lora_reference
from personafuse_kernels.routing.gates import token_gates

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 1234


def _inputs(T, K, N, E, r, dtype, gate_mode="token", B=2):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    x = rnd(B, T, K) if gate_mode == "sequence" else rnd(T, K)
    gates = (torch.rand(B, E, generator=g) if gate_mode == "sequence" else torch.rand(T, E, generator=g))
    leaves = {"x": x, "weight": rnd(N, K, scale=K ** -0.5), "bias": rnd(N), "lora_A": rnd(E, r, K, scale=K ** -0.5),
              "lora_B": rnd(E, N, r, scale=r ** -0.5), "gates": gates.to(dtype).to(DEVICE)}
    return {k: v.requires_grad_(True) for k, v in leaves.items()}


def _ours(backend, dropout_p, topk):
    def f(x, weight, bias, lora_A, lora_B, gates):
        torch.manual_seed(SEED)  # the same dropout seed on every call (gradgradcheck calls it many times)
        if topk:
            E = lora_A.shape[0]
            idx = torch.arange(x.shape[0], device=x.device)[:, None] * 2 + torch.arange(2, device=x.device)
            g = pfk.TopKGates(idx % E, gates[:, :2])
        else:
            g = gates
        return pfk.routed_lora(x, weight, bias, lora_A, lora_B, g, scaling=1.5, dropout_p=dropout_p, backend=backend)

    return f


def _reference(dropout_p, topk, seq_len):
    """The per-expert loop through autograd, with the mask the op draws from the same seed."""
    def f(x, weight, bias, lora_A, lora_B, gates):
        torch.manual_seed(SEED)
        x2 = x.reshape(-1, x.shape[-1])
        E = lora_A.shape[0]
        if topk:
            idx = (torch.arange(x2.shape[0], device=x.device)[:, None] * 2 + torch.arange(2, device=x.device)) % E
            g = gates.new_zeros(x2.shape[0], E).scatter_add(1, idx, gates[:, :2])
        else:
            g = token_gates(gates.reshape(-1, E), seq_len)
        keep = None
        if dropout_p > 0:
            seed = pfk.ops.dropout.new_seed(x.device)
            keep = keep_mask(seed, x2.shape[0], x2.shape[1], dropout_p)
        s = torch.full((E,), 1.5, dtype=x.dtype, device=x.device)
        y = routed_lora_reference(x2, weight, bias, lora_A, lora_B, g, s, keep=keep, dropout_p=dropout_p)
        return y.view(*x.shape[:-1], -1)

    return f


def _second_order(fn, leaves, seed=7):
    """Gradients of S = sum_i <dL/d input_i, R_i> (L = <y, D>, R_i and D random) with respect to every input."""
    names = list(leaves)
    g = torch.Generator().manual_seed(seed)
    y = fn(*leaves.values())
    D = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype).to(y.device)
    first = torch.autograd.grad(y, list(leaves.values()), D, create_graph=True)
    S = sum((gr * torch.randn(gr.shape, generator=g, dtype=torch.float64).to(gr.dtype).to(gr.device)).sum()
            for gr in first)
    second = torch.autograd.grad(S, list(leaves.values()), allow_unused=True)
    return dict(zip(names, first)), dict(zip(names, second))


@pytest.mark.parametrize("gate_mode,topk", [("token", False), ("sequence", False), ("token", True)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_gradgradcheck_torch_backend(gate_mode, topk, dropout_p, monkeypatch):
    if topk:
        monkeypatch.setenv("PERSONAFUSE_TOPK_PATH", "grouped")  # the top-k Function, not the dense fallback
    leaves = _inputs(3, 5, 4, 3, 2, torch.float64, gate_mode)  # top-k: gates[:, :2] are the routing weights
    assert torch.autograd.gradgradcheck(_ours("torch", dropout_p, topk), tuple(leaves.values()), eps=1e-6,
                                        atol=1e-5, rtol=1e-4)


BACKENDS = ["torch"] + (["triton"] if "triton" in pfk.available_backends() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_mode,topk", [("token", False), ("sequence", False), ("token", True)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_second_order_matches_the_per_expert_loop(backend, gate_mode, topk, dropout_p, monkeypatch):
    """Every input pair, including (lora_B, lora_A), (lora_B, x), (gates, x), (gates, lora_A) the issue found off."""
    if topk:
        monkeypatch.setenv("PERSONAFUSE_TOPK_PATH", "grouped")
    dtype = torch.float64 if backend == "torch" else torch.float32
    T, K, N, E, r = 7, 33, 20, 4, 3
    leaves = _inputs(T, K, N, E, r, dtype, gate_mode)
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    first, second = _second_order(_ours(backend, dropout_p, topk), leaves)
    seq_len = T if gate_mode == "sequence" else 1
    ref_first, ref_second = _second_order(_reference(dropout_p, topk, seq_len), ref_leaves)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name in leaves:
        assert_close(first[name], ref_first[name], tol, f"d{name}")
        # a gradient penalty on this gradient must reach the inputs (db = sum dy has no graph in either)
        assert first[name].requires_grad == ref_first[name].requires_grad, f"d{name} lost its graph"
        if ref_second[name] is None:
            assert second[name] is None or float(second[name].abs().max()) == 0.0
        else:
            assert second[name] is not None, f"no second-order gradient for {name}"
            assert_close(second[name], ref_second[name], tol, f"second-order d{name}")


def test_first_order_backward_still_uses_the_fused_path(monkeypatch):
    """Without create_graph nothing changes: the backend's own backward runs, and its gradients have no graph."""
    from personafuse_kernels import autograd

    called = []
    monkeypatch.setattr(autograd, "differentiable_backward", lambda *a: called.append(1))
    leaves = _inputs(3, 5, 4, 3, 2, torch.float64)
    y = _ours("torch", 0.0, False)(*leaves.values())
    grads = torch.autograd.grad(y.sum(), list(leaves.values()))
    assert not called and not any(g.requires_grad for g in grads)
