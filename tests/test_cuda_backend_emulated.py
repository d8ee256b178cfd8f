"""The whole cuda backend without a GPU: ops/routed_lora_cuda.py and ops/routed_lora_topk_cuda.py run on
csrc/personafuse_ops.cpp (argument checks, allocation, launches) and csrc/'s kernels, built against the CPU
emulation of CUDA (tests/emu.py) and registered as torch.ops.personafuse_emu for CPU tensors. Forward and every
gradient, on every path (decode kernel, tensor-core kernels, gate kernels, grouped top-k), within 3x the error of
the same-dtype torch backend against float64 (the 3x rule of docs/testing.md)."""
import emu
import pytest
import torch
from conftest import assert_within_3x

from personafuse_kernels.dispatch import topk_block_m
from personafuse_kernels.ops import routed_lora_cuda, routed_lora_topk_cuda, routed_lora_topk_torch, routed_lora_torch
from personafuse_kernels.routing.topk import build_routing_metadata

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no C++ compiler")
NEEDS = (True,) * 6


@pytest.fixture(autouse=True)
def emulated_ops(monkeypatch):
    ops = emu.load_ops()
    monkeypatch.setattr(routed_lora_cuda, "kernel_ops", lambda: ops)
    return ops


def _within_3x(got, same_dtype, ref, names):
    for g, s, r, name in zip(got, same_dtype, ref, names):
        if r.numel() == 0:
            continue
        assert g.shape == r.shape and g.dtype == s.dtype, name
        assert not torch.isnan(g).any(), name
        assert_within_3x(g, s, r, name)


def _dense_case(T, K, N, E, r, seq_len, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    return dict(x=rnd(T, K), weight=rnd(N, K, scale=K**-0.5), bias=rnd(N), lora_A=rnd(E, r, K, scale=K**-0.5),
                lora_B=rnd(E, N, r, scale=r**-0.5), gates=torch.rand(T // seq_len, E, generator=g),
                scaling=torch.linspace(0.5, 2.0, E), dy=rnd(T, N))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,K,N,E,r,seq_len,dropout_p,path", [
    (7, 40, 24, 3, 4, 7, 0.0, "decode"),
    (64, 72, 33, 10, 16, 1, 0.0, "decode"),
    (133, 45, 33, 10, 16, 1, 0.0, "tensor cores"),
    (70, 64, 40, 2, 128, 35, 0.0, "tensor cores"),
    (9, 40, 24, 5, 24, 3, 0.3, "tensor cores"),  # dropout: not the decode kernel
    (66, 24, 20, 2, 136, 1, 0.0, "gate kernels"),  # r > 128
])
def test_cuda_backend_forward_backward(dtype, T, K, N, E, r, seq_len, dropout_p, path):
    c = _dense_case(T, K, N, E, r, seq_len, dtype)
    seed = torch.tensor([4242], dtype=torch.int64)
    x2 = c["x"]
    if dtype != torch.float32:
        expected = ("decode" if routed_lora_cuda.use_decode_kernel(x2, c["lora_A"], dropout_p) else
                    "tensor cores" if routed_lora_cuda.use_tensor_core_kernels(x2, r) else "gate kernels")
        assert expected == path

    def run(mod, cast=None):
        t = {k: (v.to(cast) if cast is not None and v.is_floating_point() and k not in ("gates", "scaling") else v)
             for k, v in c.items()}
        args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["gates"], t["scaling"], seed)
        y, H = mod.forward(*args, seq_len, dropout_p)
        grads = mod.backward(t["dy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], t["gates"], t["scaling"], seed,
                             H, seq_len, dropout_p, NEEDS)
        return [y, *grads]

    got = run(routed_lora_cuda)
    same = run(routed_lora_torch)
    ref = run(routed_lora_torch, torch.float64)
    _within_3x(got, same, ref, ["y", "dx", "dW", "db", "dA", "dB", "dgates"])
    again = run(routed_lora_cuda)
    assert all(torch.equal(a, b) for a, b in zip(got, again)), "the cuda backend must be deterministic"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,K,N,E,r,k,pattern,dropout_p", [
    (33, 40, 24, 8, 16, 2, "uniform", 0.0),
    (70, 48, 40, 16, 8, 1, "skewed", 0.2),
    (40, 24, 20, 32, 5, 4, "empty_experts", 0.0),
    (20, 32, 24, 4, 72, 2, "all_to_one", 0.1),
])
def test_cuda_topk_forward_backward(dtype, T, K, N, E, r, k, pattern, dropout_p):
    from test_topk import routing

    g = torch.Generator().manual_seed(T * k)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    c = dict(x=rnd(T, K), weight=rnd(N, K, scale=K**-0.5), bias=rnd(N), lora_A=rnd(E, r, K, scale=K**-0.5),
             lora_B=rnd(E, N, r, scale=r**-0.5), dy=rnd(T, N))
    idx = routing(T, E, k, pattern, g)
    weights = torch.rand(T, k, generator=g)
    scaling = torch.linspace(0.5, 2.0, E)
    seed = torch.tensor([99], dtype=torch.int64)
    block_m = topk_block_m("cuda", T, k)

    def run(mod, cast=None):
        t = {key: v.to(cast) if cast is not None else v for key, v in c.items()}
        w = weights.to(cast) if cast is not None else weights
        args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], idx, w, scaling, seed)
        y, saved, meta = mod.forward(*args, dropout_p, block_m)
        grads = mod.backward(t["dy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], idx, w, scaling, seed, saved,
                             dropout_p, meta, NEEDS)
        return [y, *grads]

    got = run(routed_lora_topk_cuda)
    same = run(routed_lora_topk_torch)
    ref = run(routed_lora_topk_torch, torch.float64)
    _within_3x(got, same, ref, ["y", "dx", "dW", "db", "dA", "dB", "dweights"])


def test_emulated_ops_reject_bad_input(emulated_ops):
    """The C++ argument checks of personafuse_ops.cpp, exercised on the CPU."""
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    A = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    gates, s = torch.rand(8, 2), torch.ones(2)
    seed = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        emulated_ops.lora_shrink(x.float(), A.float(), gates, s, seed, 1, 0.0)
    with pytest.raises(RuntimeError, match="ranks 1 to 128"):
        emulated_ops.lora_shrink(x, torch.randn(2, 129, 16, dtype=torch.bfloat16), gates, s, seed, 1, 0.0)
    with pytest.raises(RuntimeError, match="dropout_p"):
        emulated_ops.lora_shrink(x, A, gates, s, seed, 1, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        emulated_ops.lora_shrink(x.t().contiguous().t(), A, gates, s, seed, 1, 0.0)
    with pytest.raises(RuntimeError, match="seq_len"):
        emulated_ops.gate_forward(torch.randn(8, 8), gates, s, 3)
    idx = torch.tensor([[0, 1]] * 8)
    meta = build_routing_metadata(idx, 2, 16)
    w = torch.rand(16)
    with pytest.raises(RuntimeError, match="int32"):
        emulated_ops.topk_pair_shrink(x, A, w, s, seed, meta.sorted_pairs.long(), meta.group_start,
                                      meta.block_group, meta.block_start, 16, 2, 0.0)
    with pytest.raises(RuntimeError, match="block_m"):
        emulated_ops.topk_pair_shrink(x, A, w, s, seed, meta.sorted_pairs, meta.group_start,
                                      meta.block_group, meta.block_start, 128, 2, 0.0)
    with pytest.raises(RuntimeError, match="T \\* k"):
        emulated_ops.topk_pair_shrink(x, A, w, s, seed, meta.sorted_pairs[:-1].contiguous(),
                                      meta.group_start, meta.block_group, meta.block_start, 16, 2, 0.0)


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch, emulated_ops):
    """backend="cuda" accepted for CPU tensors, running on the emulated ops: the public API end to end."""
    from personafuse_kernels import dispatch

    cpu_cuda = dispatch.BACKENDS["cuda"]._replace(devices=("cpu",), unavailable=lambda: None)
    monkeypatch.setitem(dispatch.BACKENDS, "cuda", cpu_cuda)
    dispatch._resolve.cache_clear()
    yield
    dispatch._resolve.cache_clear()


@pytest.mark.parametrize("gates_kind", ["token", "sequence", "top-2 grouped"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_public_api_with_the_cuda_backend(cuda_backend_on_cpu, monkeypatch, gates_kind, compiled):
    """pfk.routed_lora(backend="cuda") through functional.py, autograd.py (custom ops and their fake shapes under
    torch.compile(fullgraph=True)) and the cuda ops modules, in bfloat16, against the torch backend."""
    import personafuse_kernels as pfk

    monkeypatch.setenv("PERSONAFUSE_TOPK_PATH", "grouped")
    g = torch.Generator().manual_seed(3)
    B, S, K, N, E, r = 2, 40, 48, 40, 8, 16
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    leaves = dict(x=rnd(B, S, K), weight=rnd(N, K, scale=K**-0.5), bias=rnd(N), lora_A=rnd(E, r, K, scale=K**-0.5),
                  lora_B=rnd(E, N, r, scale=r**-0.5))
    top = torch.rand(B, S, E, generator=g).topk(2, dim=-1)
    if gates_kind.startswith("top"):
        leaves["gates"] = top.values / top.values.sum(-1, keepdim=True)
    else:
        shape = (B, E) if gates_kind == "sequence" else (B, S, E)
        leaves["gates"] = torch.rand(*shape, generator=g)
    dy = rnd(B, S, N)

    def call(x, weight, bias, lora_A, lora_B, gates, backend):
        if gates_kind.startswith("top"):
            gates = pfk.TopKGates(top.indices, gates)
        return pfk.routed_lora(x, weight, bias, lora_A, lora_B, gates, scaling=2.0, backend=backend)

    def run(backend, dtype, fn):
        ins = {k: v.detach().clone().to(torch.float32 if k == "gates" else dtype).requires_grad_(True)
               for k, v in leaves.items()}
        y = fn(*ins.values(), backend)
        y.backward(dy.to(dtype))
        return [y.detach()] + [ins[k].grad for k in leaves]

    fn = torch.compile(call, fullgraph=True, dynamic=False) if compiled else call
    got = run("cuda", torch.bfloat16, fn)
    _within_3x(got, run("torch", torch.bfloat16, call), run("torch", torch.float64, call),
               ["y"] + [f"d{k}" for k in leaves])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_topk_no_adapter_slots_int32(dtype):
    """Serving inputs on the grouped kernels: int32 indices with -1 slots (no adapter), one token all -1. Those
    pairs are in no group, so no kernel computes them; their dweights stay 0."""
    from test_serving_slots import serving_indices

    T, K, N, E, r, k = 40, 32, 24, 8, 16, 2
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    c = dict(x=rnd(T, K), weight=rnd(N, K, scale=K**-0.5), bias=rnd(N), lora_A=rnd(E, r, K, scale=K**-0.5),
             lora_B=rnd(E, N, r, scale=r**-0.5), dy=rnd(T, N))
    idx = serving_indices(T, E, k, g, torch.int32)
    weights = torch.rand(T, k, generator=g)
    scaling = torch.linspace(0.5, 2.0, E)
    seed = torch.tensor([5], dtype=torch.int64)
    block_m = topk_block_m("cuda", T, k)

    def run(mod, cast=None):
        t = {key: v.to(cast) if cast is not None else v for key, v in c.items()}
        w = weights.to(cast) if cast is not None else weights
        y, saved, meta = mod.forward(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], idx, w, scaling,
                                     seed, 0.0, block_m)
        grads = mod.backward(t["dy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], idx, w, scaling, seed, saved,
                             0.0, meta, NEEDS)
        return [y, *grads]

    got = run(routed_lora_topk_cuda)
    _within_3x(got, run(routed_lora_topk_torch), run(routed_lora_topk_torch, torch.float64),
               ["y", "dx", "dW", "db", "dA", "dB", "dweights"])
    assert torch.all(got[-1][idx < 0] == 0)


@pytest.mark.parametrize("T", [16, 70])  # the decode kernel (T <= 64) and the tensor-core kernels
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_cuda_delta_into_out(cuda_backend_on_cpu, T, out_dtype):
    """pfk.routed_lora_delta(backend="cuda", out=...): bf16 operands added into a bf16 output (the decode kernel
    adds in place) or an fp32 accumulator, forward and every gradient, by the 3x rule."""
    import personafuse_kernels as pfk

    g = torch.Generator().manual_seed(4)
    K, N, E, r = 48, 40, 8, 16
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    leaves = dict(x=rnd(T, K), lora_A=rnd(E, r, K, scale=K**-0.5), lora_B=rnd(E, N, r, scale=r**-0.5),
                  gates=torch.rand(T, E, generator=g))
    base, dy = rnd(T, N), rnd(T, N)

    def run(backend, dtype, odt):
        ins = {k: v.to(torch.float32 if k == "gates" else dtype, copy=True).requires_grad_(True)
               for k, v in leaves.items()}
        out = base.to(odt, copy=True)
        y = pfk.routed_lora_delta(*ins.values(), scaling=2.0, backend=backend, out=out)
        y.backward(dy.to(odt))
        return [y.detach().float() - base.to(odt).float()] + [ins[k].grad for k in leaves]

    got = run("cuda", torch.bfloat16, out_dtype)
    same = run("torch", torch.bfloat16, out_dtype)
    ref = run("torch", torch.float64, torch.float64)
    for gv, s, rv, name in zip(got, same, ref, ["delta", "x", "lora_A", "lora_B", "gates"]):
        assert_within_3x(gv.float(), s.float(), rv, name)


def _public_api_within_3x(leaves: dict, dy, **kwargs) -> list:
    """pfk.routed_lora(backend="cuda", **kwargs) in bfloat16 against the torch backend in bfloat16 and float64 by the
    3x rule, forward and every gradient; returns the cuda backend's [y, grads...]."""
    import personafuse_kernels as pfk

    def run(backend, dtype):
        ins = {k: v.to(torch.float32 if k == "gates" else dtype, copy=True).requires_grad_(True)
               for k, v in leaves.items()}
        y = pfk.routed_lora(*ins.values(), scaling=2.0, backend=backend, **kwargs)
        y.backward(dy.to(dtype))
        return [y.detach()] + [ins[k].grad for k in leaves]

    got, same, ref = run("cuda", torch.bfloat16), run("torch", torch.bfloat16), run("torch", torch.float64)
    for gv, s, rv, name in zip(got, same, ref, ["y", *leaves]):
        assert_within_3x(gv.float(), s.float(), rv, name)
    return got


@pytest.mark.parametrize("lengths", [[1, 7, 0, 13], [1, 7, 0, 133]])  # the decode kernel (T <= 64), tensor cores
def test_cuda_packed_sequences(cuda_backend_on_cpu, lengths):
    """cu_seqlens on the cuda backend: its kernels take per-token gates gathered by the row map, and the gates'
    gradient is summed back per sequence; bf16 by the 3x rule against the torch backend."""

    g = torch.Generator().manual_seed(6)
    T, K, N, E, r = sum(lengths), 48, 40, 8, 16
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    leaves = dict(x=rnd(T, K), weight=rnd(N, K, scale=K**-0.5), bias=rnd(N), lora_A=rnd(E, r, K, scale=K**-0.5),
                  lora_B=rnd(E, N, r, scale=r**-0.5), gates=torch.rand(len(lengths), E, generator=g))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    _public_api_within_3x(leaves, rnd(T, N), cu_seqlens=cu)


def test_cuda_unequal_ranks(cuda_backend_on_cpu):
    """ranks (1, 4, 16, 64) in one layer on the cuda backend: its kernels run the sum(ranks) rank-1 columns; bf16
    by the 3x rule, and the padding columns get no gradient."""

    ranks = [1, 4, 16, 64]
    g = torch.Generator().manual_seed(8)
    T, K, N, E, r = 70, 48, 40, 4, 64
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    leaves = dict(x=rnd(T, K), weight=rnd(N, K, scale=K**-0.5), bias=rnd(N), lora_A=rnd(E, r, K, scale=K**-0.5),
                  lora_B=rnd(E, N, r, scale=r**-0.5), gates=torch.rand(T, E, generator=g))
    got = _public_api_within_3x(leaves, rnd(T, N), ranks=ranks)
    for e, n in enumerate(ranks):
        assert not got[4][e, n:].any() and not got[5][e, :, n:].any()


def test_decode_ops_name_the_operands_of_their_mode(emulated_ops):
    """A dtype mismatch names the operands the op takes: no weight or bias in the LoRA-only mode."""
    c = _dense_case(3, 16, 8, 2, 4, 1, torch.bfloat16)
    y = torch.zeros(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"lora_decode_: y, lora_A and lora_B must have x's dtype"):
        emulated_ops.lora_decode_(y, c["x"], c["lora_A"], c["lora_B"].half(), c["gates"], c["scaling"], 1)
    with pytest.raises(RuntimeError, match=r"lora_decode_linear: y, weight, bias, lora_A and lora_B must have"):
        emulated_ops.lora_decode_linear(c["x"], c["weight"].half(), None, c["lora_A"], c["lora_B"], c["gates"],
                                        c["scaling"], 1)
