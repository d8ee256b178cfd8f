"""Property-based tests (hypothesis): random shapes, strides, gate layouts, top-k patterns, dtypes and dropout,
forward and every gradient against the per-expert loop through autograd in float64.

    torch backend                 float64, the public routed_lora
    triton backend                float32, the public routed_lora (the interpreter on CPU)
    cuda backend (CPU emulation)  float16/bfloat16/float32, ops/routed_lora_cuda.py on the emulated ops, 3x rule

The default profile runs a CI-sized number of examples (derandomized: the same examples every run); the long
profile (`bash scripts/test.sh --long`) ten times as many, with fresh randomness.
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from conftest import assert_close  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from profile_plugin import PROFILE, examples  # noqa: E402

import personafuse_kernels as pfk  # noqa: E402
from personafuse_kernels.ops.dropout import keep_mask, new_seed  # noqa: E402
from personafuse_kernels.ops.routed_lora_torch import routed_lora_reference  # noqa: E402
from personafuse_kernels.routing.gates import normalize_gates, token_gates  # noqa: E402

SEED = 77
TRITON = "triton" in pfk.available_backends()


def _settings(n: int):
    return settings(max_examples=examples(n), deadline=None, derandomize=PROFILE != "long",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def cases(draw, max_dim=40, max_e=8, max_r=8):
    """A call: shapes, gate layout (token, sequence, single mix, top-k with a routing pattern), dropout and
    whether x is a non-contiguous view."""
    T = draw(st.integers(1, max_dim))
    K = draw(st.integers(1, max_dim))
    N = draw(st.integers(1, max_dim))
    E = draw(st.integers(1, max_e))
    r = draw(st.integers(1, max_r))
    layout = draw(st.sampled_from(["token", "sequence", "single", "topk"]))
    k = draw(st.integers(1, E)) if layout == "topk" else 0
    pattern = draw(st.sampled_from(["random", "all_to_one", "skewed"])) if layout == "topk" else ""
    batch = draw(st.integers(1, 3)) if layout == "sequence" else 1
    return {"T": T, "K": K, "N": N, "E": E, "r": r, "layout": layout, "k": k, "pattern": pattern, "batch": batch,
            "dropout_p": draw(st.sampled_from([0.0, 0.0, 0.3])), "transposed": draw(st.booleans()),
            "bias": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


def _make(c, dtype):
    g = torch.Generator().manual_seed(c["seed"])
    T, K, N, E, r = c["T"], c["K"], c["N"], c["E"], c["r"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    lead = (c["batch"], T) if c["layout"] == "sequence" else (T,)
    x = rnd(*lead, K)
    if c["transposed"]:  # the same values as a non-contiguous view
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    leaves = {"x": x, "weight": rnd(N, K, scale=K ** -0.5), "bias": rnd(N) if c["bias"] else None,
              "lora_A": rnd(E, r, K, scale=K ** -0.5), "lora_B": rnd(E, N, r, scale=r ** -0.5)}
    if c["layout"] == "topk":
        kk = c["k"]
        if c["pattern"] == "all_to_one":
            first = torch.zeros(T, 1, dtype=torch.int64)
        elif c["pattern"] == "skewed":
            first = (torch.rand(T, 1, generator=g) ** 4 * E).long().clamp(max=E - 1)
        else:
            first = torch.randint(0, E, (T, 1), generator=g)
        idx = (first + torch.randperm(E, generator=g)[:kk].sort().values[None, :]) % E  # distinct per token
        leaves["weights"] = torch.rand(T, kk, generator=g).to(dtype)
        leaves["indices"] = idx
    elif c["layout"] == "sequence":
        leaves["gates"] = torch.rand(c["batch"], E, generator=g).to(dtype)
    elif c["layout"] == "single":
        leaves["gates"] = torch.rand(E, generator=g).to(dtype)
    else:
        leaves["gates"] = torch.rand(T, E, generator=g).to(dtype)
    for name, t in leaves.items():
        if t is not None and t.is_floating_point():
            t.requires_grad_(True)
    return leaves


def _call(c, leaves, fn):
    gates = (pfk.TopKGates(leaves["indices"], leaves["weights"]) if c["layout"] == "topk" else leaves["gates"])
    torch.manual_seed(SEED)  # the op's dropout seed comes from torch's generator
    return fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"], gates)


def _reference(c, leaves):
    """Per-expert loop in float64 through autograd, with the mask drawn from the same seed."""
    up = {k: (v.detach().double().requires_grad_(True) if v is not None and v.is_floating_point() else v)
          for k, v in leaves.items()}
    x = up["x"]
    K, E = x.shape[-1], up["lora_A"].shape[0]
    x2 = x.reshape(-1, K)
    if c["layout"] == "topk":
        g_tok = up["weights"].new_zeros(x2.shape[0], E).scatter_add(1, up["indices"], up["weights"])
    else:
        norm = normalize_gates(up["gates"], x.shape, E)
        g_tok = token_gates(norm.gates, norm.seq_len)
    keep = None
    if c["dropout_p"] > 0:
        torch.manual_seed(SEED)
        keep = keep_mask(new_seed(x.device), x2.shape[0], K, c["dropout_p"])
    y = routed_lora_reference(x2, up["weight"], up["bias"], up["lora_A"], up["lora_B"], g_tok,
                              torch.full((E,), 1.25, dtype=torch.float64), keep=keep, dropout_p=c["dropout_p"])
    return y.view(*x.shape[:-1], -1), up


def _check(c, backend, dtype, tol):
    leaves = _make(c, dtype)
    y = _call(c, leaves, lambda *a: pfk.routed_lora(*a, scaling=1.25, dropout_p=c["dropout_p"], backend=backend))
    ref_y, up = _reference(c, leaves)
    assert_close(y, ref_y, tol, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy.to(dtype))
    ref_grads = torch.autograd.grad(ref_y, [up[k] for k in names], dy)
    for name, got, ref in zip(names, grads, ref_grads):
        assert_close(got, ref, tol, f"d{name}", atol=tol)


@_settings(40)
@given(cases())
def test_torch_backend_matches_the_per_expert_loop(c):
    _check(c, "torch", torch.float64, 1e-9)


@pytest.mark.skipif(not TRITON, reason="triton backend unavailable")
@_settings(8)
@given(cases(max_dim=24, max_e=6, max_r=6))
def test_triton_backend_matches_the_per_expert_loop(c):
    _check(c, "triton", torch.float32, 5e-5)


@st.composite
def cuda_cases(draw):
    return {"T": draw(st.integers(1, 70)), "K": draw(st.integers(1, 48)), "N": draw(st.integers(1, 40)),
            "E": draw(st.integers(1, 6)), "r": draw(st.sampled_from([1, 3, 8, 16, 24])),
            "seq_len": draw(st.sampled_from([1, 1, 2, 3])), "dropout_p": draw(st.sampled_from([0.0, 0.2])),
            "dtype": draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
            "seed": draw(st.integers(0, 2**16))}


@_settings(6)
@given(cuda_cases())
def test_emulated_cuda_backend_within_3x_of_torch(c):
    """Every path the case lands on (decode kernel, tensor-core kernels, gate kernels), forward and gradients."""
    import emu
    from conftest import assert_within_3x

    from personafuse_kernels.ops import routed_lora_cuda, routed_lora_torch

    if emu.compiler() is None:
        pytest.skip("no C++ compiler")
    ops = emu.load_ops()
    T = c["T"] - c["T"] % c["seq_len"] or c["seq_len"]
    K, N, E, r, dtype = c["K"], c["N"], c["E"], c["r"], c["dtype"]
    g = torch.Generator().manual_seed(c["seed"])

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=g) * scale

    base = {"x": rnd(T, K), "weight": rnd(N, K, scale=K ** -0.5), "bias": rnd(N),
            "lora_A": rnd(E, r, K, scale=K ** -0.5), "lora_B": rnd(E, N, r, scale=r ** -0.5), "dy": rnd(T, N)}
    gates, scaling = torch.rand(T // c["seq_len"], E, generator=g), torch.linspace(0.5, 2.0, E)
    seed = torch.tensor([c["seed"]], dtype=torch.int64)

    def run(mod, cast):
        t = {k: v.to(cast) for k, v in base.items()}
        y, H = mod.forward(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], gates, scaling, seed,
                           c["seq_len"], c["dropout_p"])
        grads = mod.backward(t["dy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], gates, scaling, seed, H,
                             c["seq_len"], c["dropout_p"], (True,) * 6)
        return [y, *grads]

    original = routed_lora_cuda.kernel_ops
    routed_lora_cuda.kernel_ops = lambda: ops
    try:
        got = run(routed_lora_cuda, dtype)
    finally:
        routed_lora_cuda.kernel_ops = original
    same = run(routed_lora_torch, dtype)
    ref = run(routed_lora_torch, torch.float64)
    for name, a, s, f in zip(["y", "dx", "dW", "db", "dA", "dB", "dgates"], got, same, ref):
        assert a.shape == f.shape and not torch.isnan(a).any(), name
        assert_within_3x(a, s, f, name, floor=1e-4 if dtype == torch.float32 else 2e-3)
