"""Serving inputs of the top-k op: index -1 (a slot with no adapter) mixed with real slots, rows that are all -1,
and int32 indices, on every backend (torch; Triton in the interpreter, grouped and dense; cuda in the emulator),
forward and every gradient, against a per-expert loop in float64 whose gates are built slot by slot by hand.
The cuda backend's case is in test_cuda_backend_emulated.py (test_cuda_topk_no_adapter_slots_int32)."""
import pytest
import torch

import personafuse_kernels as pfk
from personafuse_kernels.ops.routed_lora_torch import routed_lora_reference

TRITON = "triton" in pfk.available_backends()
NAMES = ["y", "x", "weight", "bias", "lora_A", "lora_B", "weights"]


def serving_indices(T, E, k, gen, dtype=torch.int64):
    """k distinct experts per token, then about a third of the slots set to -1, token 0 all -1 and token 1 with
    one real slot."""
    idx = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    drop = torch.rand(T, k, generator=gen) < 0.35
    idx = torch.where(drop, torch.full_like(idx, -1), idx)
    idx[0] = -1
    if T > 1 and k > 1:
        idx[1, 1:] = -1
    return idx.to(dtype)


def make(T, K, N, E, r, k, seed=0, idx_dtype=torch.int64, all_none=False):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).requires_grad_()  # noqa: E731
    ins = {"x": t(T, K), "weight": t(N, K, scale=K**-0.5), "bias": t(N), "lora_A": t(E, r, K, scale=K**-0.5),
           "lora_B": t(E, N, r, scale=r**-0.5),
           "weights": torch.rand(T, k, generator=gen).requires_grad_()}
    idx = serving_indices(T, E, k, gen, idx_dtype)
    if all_none:
        idx = torch.full_like(idx, -1)
    return ins, idx


def by_hand_reference(ins, idx, scaling, dy):
    """float64 per-expert loop; gates[t, e] += weights[t, s] for every real slot, built element by element."""
    d = {n: v.detach().double().requires_grad_() for n, v in ins.items()}
    T, k = idx.shape
    E = d["lora_A"].shape[0]
    rows = []
    for t in range(T):
        row = [torch.zeros((), dtype=torch.float64)] * E
        for s in range(k):
            e = int(idx[t, s])
            if e >= 0:
                row[e] = row[e] + d["weights"][t, s]
        rows.append(torch.stack(row))
    gates = torch.stack(rows)
    y = routed_lora_reference(d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], gates, scaling.double())
    wrt = [d[n] for n in NAMES[1:]]
    grads = torch.autograd.grad(y, wrt, dy.double(), allow_unused=True)  # all -1: the weights are unused
    return [y.detach(), *(torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt))]


def ours(ins, idx, scaling, dy, backend):
    y = pfk.routed_lora(ins["x"], ins["weight"], ins["bias"], ins["lora_A"], ins["lora_B"],
                        pfk.TopKGates(idx, ins["weights"]), scaling=scaling, backend=backend)
    grads = torch.autograd.grad(y, [ins[n] for n in NAMES[1:]], dy)
    return [y.detach(), *grads]


BACKENDS = ["torch"] + (["triton-grouped", "triton-dense"] if TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("T,K,N,E,r,k", [(7, 33, 45, 8, 4, 2), (133, 40, 24, 16, 8, 3), (1, 24, 20, 4, 16, 2)])
def test_no_adapter_slots_and_int32_indices(monkeypatch, backend, idx_dtype, T, K, N, E, r, k):
    name, _, path = backend.partition("-")
    if path:
        monkeypatch.setenv("PERSONAFUSE_TOPK_PATH", path)
    ins, idx = make(T, K, N, E, r, k, seed=T + k, idx_dtype=idx_dtype)
    scaling = torch.linspace(0.5, 2.0, E)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(3))
    got = ours(ins, idx, scaling, dy, name)
    ref = by_hand_reference(ins, idx, scaling, dy)
    for a, b, n in zip(got, ref, NAMES):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4, msg=lambda m: f"{backend} {n}: {m}")
    dw = got[-1]
    assert torch.all(dw[idx < 0] == 0), "a slot with no adapter gets no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_no_adapter_are_the_base_alone(monkeypatch, backend):
    name, _, path = backend.partition("-")
    if path:
        monkeypatch.setenv("PERSONAFUSE_TOPK_PATH", path)
    ins, idx = make(9, 24, 20, 6, 8, 2, all_none=True)
    scaling = torch.ones(6)
    dy = torch.randn(9, 20)
    y, dx, dW, db, dA, dB, dw = ours(ins, idx, scaling, dy, name)
    base = torch.nn.functional.linear(ins["x"], ins["weight"], ins["bias"]).detach()
    torch.testing.assert_close(y, base, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dy @ ins["weight"].detach(), rtol=1e-5, atol=1e-5)
    assert not dA.any() and not dB.any() and not dw.any()


def test_grouped_metadata_leaves_no_adapter_pairs_out():
    from personafuse_kernels.routing.topk import build_routing_metadata

    idx = torch.tensor([[0, -1], [-1, -1], [1, 0]], dtype=torch.int32)
    meta = build_routing_metadata(idx, 2, 16)
    G = 2 * 2
    assert int(meta.group_start[G]) == 3  # three real pairs in groups; the -1 pairs sort after them
    assert sorted(meta.sorted_pairs[3:].tolist()) == [1, 2, 3]  # pairs (0, 1), (1, 0), (1, 1)
    blocks = meta.block_group[meta.block_group >= 0]
    assert len(blocks) == 3  # groups (e0, s0), (e1, s0) and (e0, s1): one block each


def test_validation_of_no_adapter_indices():
    w = torch.rand(2, 2)
    pfk.TopKGates(torch.tensor([[-1, -1], [0, 1]]), w).check(2)  # two -1 slots in a token are not a repeat
    with pytest.raises(ValueError, match="-1 for no adapter"):
        pfk.TopKGates(torch.tensor([[-2, 0], [0, 1]]), w).check(2)
    with pytest.raises(ValueError, match="repeat an expert"):
        pfk.TopKGates(torch.tensor([[1, 1], [0, -1]]), w).check(2)
    with pytest.raises(TypeError, match="int32 or int64"):
        pfk.TopKGates(torch.tensor([[0, 1], [0, 1]], dtype=torch.int16), w).check(2)


@pytest.mark.skipif(not TRITON, reason="triton backend unavailable")
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_dense_rows_without_adapters_skip_the_lora_segment(dropout_p):
    """Dense gates whose rows are all zero for whole row tiles (requests without an adapter): the Triton dual GEMM
    checks each tile's gates and skips its LoRA segment; the result and every gradient match the torch backend."""
    from personafuse_kernels.perf.dryrun import recording

    T, K, N, E, r = 133, 40, 24, 4, 8
    gen = torch.Generator().manual_seed(5)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).requires_grad_()  # noqa: E731
    ins = {"x": t(T, K), "weight": t(N, K, scale=K**-0.5), "bias": t(N), "lora_A": t(E, r, K, scale=K**-0.5),
           "lora_B": t(E, N, r, scale=r**-0.5)}
    gates = torch.rand(T, E, generator=gen)
    gates[:70] = 0.0  # the first row tile (and part of the second) has no adapter
    gates.requires_grad_()
    outs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(3)
        with recording(None, aten=False, passthrough=True) as launches:
            y = pfk.routed_lora(*ins.values(), gates, scaling=2.0, dropout_p=dropout_p, backend=backend)
            grads = torch.autograd.grad(y.sum(), [*ins.values(), gates])
        outs.append([y.detach(), *grads])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    dual = [launch for launch in launches if launch.name == "_dual_gemm_kernel"]
    assert dual and dual[0].args["SKIP_IDLE"]
