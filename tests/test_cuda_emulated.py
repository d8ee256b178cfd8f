"""The CUDA extension's kernels (csrc/) run on the CPU through tests/cuda_emu and match the torch reference.

Same launchers, same kernels, compiled by g++ against an emulated CUDA runtime (see tests/emu.py): CI checks the
kernels' indexing, tiling, bounds and reductions on odd shapes. The GPU tests in tests/test_extension.py check
the same kernels compiled by nvcc on a real card.
"""
import os
import subprocess
import sys
from pathlib import Path

import emu
import pytest
import torch
from conftest import REL_TOL, assert_close, rel_err
from profile_plugin import PROFILE

from personafuse_kernels.ops.routed_lora_torch import TorchGateOps, _b_cat
from personafuse_kernels.perf import cuda_launches

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no C++ compiler")

LOW = [torch.float16, torch.bfloat16]


def _gates(T, E, seq_len):
    return torch.rand(T // seq_len, E), torch.linspace(0.5, 2.0, E)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("T,E,r,seq_len", [(1, 1, 1, 1), (7, 3, 5, 1), (133, 10, 16, 1), (12, 64, 2, 4),
                                           (40, 2, 128, 20)])
def test_gate_kernels(dtype, T, E, r, seq_len):
    H = torch.randn(T, E * r).to(dtype)
    dHg = torch.randn(T, E * r).to(dtype)
    gates, scaling = _gates(T, E, seq_len)
    Hg = emu.poisoned(T, E * r, dtype=dtype)
    emu.check(emu.lib().pfk_emu_gate_forward(emu.DTYPES[dtype], emu.ptr(H), emu.ptr(gates), emu.ptr(scaling),
                                             emu.ptr(Hg), emu.i64(T), emu.i64(E), emu.i64(r), emu.i64(seq_len)),
              "gate_forward")
    torch.testing.assert_close(Hg, TorchGateOps.forward(H, gates, scaling, seq_len), rtol=0, atol=0)

    dH = emu.poisoned(T, E * r, dtype=dtype)
    dg_tok = emu.poisoned(T, E, dtype=torch.float32)
    dgates = dg_tok if seq_len == 1 else emu.poisoned(T // seq_len, E, dtype=torch.float32)
    emu.check(emu.lib().pfk_emu_gate_backward(emu.DTYPES[dtype], emu.ptr(dHg), emu.ptr(H), emu.ptr(gates),
                                              emu.ptr(scaling), emu.ptr(dH), emu.ptr(dg_tok), emu.ptr(dgates),
                                              emu.i64(T), emu.i64(E), emu.i64(r), emu.i64(seq_len)), "gate_backward")
    dH_ref, dg_ref = TorchGateOps.backward(dHg, H, gates, scaling, seq_len)
    torch.testing.assert_close(dH, dH_ref, rtol=0, atol=0)
    torch.testing.assert_close(dgates, dg_ref, rtol=1e-5, atol=1e-5)


def _decode(x, A, B, gates, scaling, y, seq_len, num_sms, vectorized, W=None, bias=None):
    """The decode launch: y = x W^T + b + LoRA term when W is given, else y += LoRA term. Returns H."""
    T, K = x.shape
    E, r, _ = A.shape
    H = emu.poisoned(T, E * r, dtype=x.dtype)
    Hg = emu.poisoned(T, E * r, dtype=x.dtype)
    emu.check(emu.lib().pfk_emu_lora_decode(
        emu.DTYPES[x.dtype], emu.i32(vectorized), emu.ptr(x), emu.ptr(W), emu.ptr(bias), emu.ptr(A), emu.ptr(B),
        emu.ptr(gates), emu.ptr(scaling), emu.ptr(y), emu.ptr(H), emu.ptr(Hg), emu.i32(T), emu.i32(K),
        emu.i32(B.shape[1]), emu.i32(E), emu.i32(r), emu.i32(seq_len), emu.i32(num_sms)), "lora_decode")
    return H


def _decode_plan(T, K, E, r):
    plan = (emu.ctypes.c_int64 * 3)()
    emu.lib().pfk_emu_decode_plan(emu.i64(T), emu.i64(K), emu.i64(E), emu.i64(r), plan)
    return {"k_chunk": plan[0], "c_chunk": plan[1], "smem_bytes": plan[2]}


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("base", ["given", "fused", "fused+bias"])
@pytest.mark.parametrize("T,K,N,E,r,seq_len,vectorized", [
    (1, 64, 48, 10, 16, 1, True),
    (7, 72, 40, 3, 5, 7, False),
    (16, 200, 130, 10, 16, 8, True),
    (64, 96, 33, 64, 1, 1, True),  # 4 passes of 16 tokens
    (5, 37, 19, 2, 128, 1, False),
    # fused: 20 row groups, rows cut evenly, x staged in 2 chunks (1024 + a tail of 80), 3 passes (16, 16, 8
    # tokens); given: 1 row group, T K under the slicing threshold: rows cut evenly over the blocks
    (40, 1104, 300, 1, 8, 20, True),
    # phase 1 over (16-row group, K slice) pairs (18 blocks on the emulator's 3 SMs): given base, 8 groups x 2
    # slices of 1536 (chunks 1024 + 512, then 1024 + 40); fused, W's and A's rows sharing a group, 9 slices of 256
    # (the last 152)
    (64, 2600, 16, 10, 12, 1, True),
    (60, 2200, 24, 2, 4, 3, False),
])
def test_decode_kernel(dtype, base, T, K, N, E, r, seq_len, vectorized):
    """One launch: the base (given in y, or computed from W and b) plus the routed LoRA term."""
    x = torch.randn(T, K).to(dtype)
    A = (torch.randn(E, r, K) / K**0.5).to(dtype)
    B = torch.randn(E, N, r).to(dtype)
    gates, scaling = _gates(T, E, seq_len)
    W = (torch.randn(N, K) / K**0.5).to(dtype) if base != "given" else None
    bias = torch.randn(N).to(dtype) if base == "fused+bias" else None
    y0 = torch.randn(T, N).to(dtype) if base == "given" else emu.poisoned(T, N, dtype=dtype)
    y = y0.clone()
    H = _decode(x, A, B, gates, scaling, y, seq_len, num_sms=3, vectorized=vectorized, W=W, bias=bias)
    H_ref = x.double() @ A.reshape(E * r, K).double().t()
    assert_close(H, H_ref, REL_TOL[dtype], "H")
    # from the kernel's own rounded H, with Hg rounded to the dtype as the torch backend does
    Hg = TorchGateOps.forward(H, gates, scaling, seq_len).double()
    if W is None:
        y_base = y0.double()
    else:  # rounded to the dtype, as F.linear's output is before the LoRA term goes in
        y_base = torch.nn.functional.linear(x.double(), W.double(), None if bias is None else bias.double())
        y_base = y_base.to(dtype).double()
    y_ref = y_base + Hg @ _b_cat(B).double().t()
    assert_close(y, y_ref, REL_TOL[dtype], "y")
    y2 = y0.clone()
    H2 = _decode(x, A, B, gates, scaling, y2, seq_len, num_sms=3, vectorized=vectorized, W=W, bias=bias)
    assert torch.equal(H, H2) and torch.equal(y, y2), "the decode kernel must be deterministic"


def _decode_cut(with_base, T, N, K, C, max_blocks):
    out = (emu.ctypes.c_int64 * 4)()
    emu.lib().pfk_emu_decode_cut(emu.i32(with_base), emu.i64(T), emu.i64(N), emu.i64(K), emu.i64(C),
                                 emu.i32(max_blocks), out)
    return tuple(out)


@pytest.mark.parametrize("with_base,T,N,K,C,max_blocks,expected", [
    (True, 1, 4096, 4096, 160, 264, (264, 1, 4096, 0)),  # 266 row groups: rows cut evenly, no partial sums
    (False, 64, 4096, 4096, 160, 264, (256, 16, 256, 16 * 64 * 160)),  # 10 groups x 16 slices; phase 2 wants 256
    # 26 slices would fit; whole 256-column steps make them 19 of 768 (the last 512)
    (False, 16, 4096, 14336, 160, 264, (256, 19, 768, 19 * 16 * 160)),
    (True, 32, 512, 4096, 160, 264, (252, 6, 768, 6 * 32 * 672)),  # a narrow fused base: 42 groups x 6 slices
    (False, 64, 40, 2100, 24, 18, (18, 9, 256, 9 * 64 * 24)),
    (True, 5, 300, 600, 24, 18, (18, 1, 600, 0)),  # 21 groups: more than half the grid
    (False, 1, 4096, 4096, 160, 264, (256, 1, 4096, 0)),  # T K = 4096: under the threshold
    (False, 31, 40, 4096, 24, 18, (3, 1, 4096, 0)),  # T K = 126976, just under it
    (False, 32, 40, 4096, 24, 18, (16, 8, 512, 8 * 32 * 24)),  # T K = 131072: sliced
])
def test_decode_cut(with_base, T, N, K, C, max_blocks, expected):
    """The cut of phase 1, in C++ (the launcher's) and in the cost model's mirror: the same, and as the rule says."""
    got = _decode_cut(with_base, T, N, K, C, max_blocks)
    assert got == expected
    assert cuda_launches.decode_cut(with_base, T, N, K, C, max_blocks) == got
    grid, slices, length, _ = got
    assert grid <= max_blocks and (slices == 1 or (length % 256 == 0 and (slices - 1) * length < K <= slices * length
                                                   and T * K >= 131072))


@pytest.mark.parametrize("T,K,E,r,k_chunk,c_chunk", [
    (1, 4096, 10, 16, 4096, 256),  # decode: all of x in one stage
    (16, 4096, 10, 16, 1024, 256),
    (64, 14336, 64, 16, 1024, 1024),
    (3, 37, 1, 1, 256, 256),
])
def test_decode_plan_stages_within_budget(T, K, E, r, k_chunk, c_chunk):
    """The staged chunks are whole warp steps (256 elements), fit 32 KiB for min(T, 16) tokens, and shared memory
    stays under the 48 KiB a launch gets without raising its limit."""
    plan = _decode_plan(T, K, E, r)
    assert (plan["k_chunk"], plan["c_chunk"]) == (k_chunk, c_chunk)
    tok = min(T, 16)
    assert plan["k_chunk"] % 256 == 0 and 2 * tok * plan["k_chunk"] <= plan["smem_bytes"] <= 48 * 1024


@pytest.mark.skipif(sys.platform != "linux", reason="AddressSanitizer runtime preload is set up for Linux")
def test_emulated_kernels_under_address_sanitizer(tmp_path):
    """A CPU memcheck: this file's kernel tests (and in the long profile the emulated cuda backend's tests) again,
    with the kernels (and personafuse_ops.cpp) built with ASan + UBSan (out-of-bounds reads and writes, misaligned
    vector loads); any report fails the run."""
    if os.environ.get("PFK_EMU_SANITIZE") == "1":
        pytest.skip("already running under the sanitizer")
    cc = emu.compiler()
    asan = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not asan or not os.path.isabs(asan):
        pytest.skip("the compiler has no libasan")
    env = dict(os.environ, PFK_EMU_SANITIZE="1", LD_PRELOAD=asan,
               ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:log_path={tmp_path / 'asan'}",
               UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:log_path={tmp_path / 'ubsan'}")
    # C++ exceptions thrown from libraries loaded before the sanitized one (triton at import, c10's TORCH_CHECK,
    # torch.compile probing CUDA) hit an ASan CHECK in its __cxa_throw interceptor in this setup: triton stays
    # unimported (nothing here needs it), and the bad-input and torch.compile tests run only in the normal pass.
    # The kernels in every profile; the C++ glue (personafuse_ops.cpp, whose build with the sanitizers and torch's
    # headers is the slowest compile of the suite) in the long profile. The glue runs unsanitized in every profile.
    files = [__file__] + ([str(Path(__file__).with_name("test_cuda_backend_emulated.py"))] if PROFILE == "long" else [])
    args = ["-q", "-x", "-p", "no:cacheprovider", *files, "-k", "not sanitizer and not reject and not compiled"]
    run = f"import sys, pytest; sys.modules['triton'] = None; sys.exit(pytest.main({args!r}))"
    res = subprocess.run([sys.executable, "-c", run], cwd=emu.ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    reports = "".join(p.read_text()[:3000] for p in sorted(tmp_path.iterdir()))
    assert not reports, f"sanitizer report:\n{reports}"
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


# Tensor-core (WMMA) kernels of the large-T path: rank buckets (r <= 64: 64-column tiles, 64 < r <= 128: 128),
# ranks that do not divide the tile, one expert per tile, 64 experts in one tile, unaligned K / N (scalar loads),
# a T that is not a multiple of the 64-row tile.
TC_SHAPES = [  # T, K (or N), E, r, seq_len
    (1, 64, 1, 1, 1),
    (7, 100, 3, 5, 7),
    (133, 72, 10, 16, 1),
    (70, 40, 64, 1, 1),
    (65, 33, 2, 128, 13),
    (20, 48, 3, 72, 4),
    (9, 130, 5, 24, 3),
]


def _shrink(x, A, gates, scaling, seq_len, p=0.0, seed=None):
    T, K = x.shape
    E, r, _ = A.shape
    H = emu.poisoned(T, E * r, dtype=x.dtype)
    Hg = emu.poisoned(T, E * r, dtype=x.dtype)
    seed = torch.zeros(1, dtype=torch.int64) if seed is None else seed
    emu.check(emu.lib().pfk_emu_lora_shrink(emu.DTYPES[x.dtype], emu.ptr(x), emu.ptr(A), emu.ptr(gates),
                                            emu.ptr(scaling), emu.ptr(seed), emu.ptr(H), emu.ptr(Hg), emu.i64(T),
                                            emu.i64(K), emu.i32(E), emu.i32(r), emu.i64(seq_len),
                                            emu.ctypes.c_float(p)), "lora_shrink")
    return H, Hg


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("T,K,E,r,seq_len", TC_SHAPES)
def test_tensor_core_shrink(dtype, T, K, E, r, seq_len):
    x = torch.randn(T, K).to(dtype)
    A = (torch.randn(E, r, K) / K**0.5).to(dtype)
    gates, scaling = _gates(T, E, seq_len)
    H, Hg = _shrink(x, A, gates, scaling, seq_len)
    assert_close(H, x.double() @ A.reshape(E * r, K).double().t(), REL_TOL[dtype], "H")
    torch.testing.assert_close(Hg, TorchGateOps.forward(H, gates, scaling, seq_len), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("T,K,E,r", [(7, 100, 3, 5), (70, 64, 4, 16)])
def test_tensor_core_shrink_dropout_matches_the_torch_mask(dtype, T, K, E, r):
    from personafuse_kernels.ops.dropout import apply_dropout

    x = torch.randn(T, K).to(dtype)
    A = (torch.randn(E, r, K) / K**0.5).to(dtype)
    gates, scaling = _gates(T, E, 1)
    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)
    H, _ = _shrink(x, A, gates, scaling, 1, p=0.3, seed=seed)
    H_ref = apply_dropout(x, seed, 0.3).double() @ A.reshape(E * r, K).double().t()
    assert_close(H, H_ref, REL_TOL[dtype], "H with dropout")
    H0, _ = _shrink(x, A, gates, scaling, 1)
    assert rel_err_big(H, H0), "dropout had no effect"


def rel_err_big(a, b):
    return rel_err(a, b) > 0.1


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("T,N,E,r,seq_len", TC_SHAPES)
def test_tensor_core_dhg(dtype, T, N, E, r, seq_len):
    dy = torch.randn(T, N).to(dtype)
    B = (torch.randn(E, N, r) / N**0.5).to(dtype)
    H = torch.randn(T, E * r).to(dtype)
    gates, scaling = _gates(T, E, seq_len)
    dH = emu.poisoned(T, E * r, dtype=dtype)
    dg_tok = emu.poisoned(T, E, dtype=torch.float32)
    dgates = dg_tok if seq_len == 1 else emu.poisoned(T // seq_len, E, dtype=torch.float32)

    def run():
        emu.check(emu.lib().pfk_emu_lora_dhg(emu.DTYPES[dtype], emu.ptr(dy), emu.ptr(B), emu.ptr(H), emu.ptr(gates),
                                             emu.ptr(scaling), emu.ptr(dH), emu.ptr(dg_tok), emu.ptr(dgates),
                                             emu.i64(T), emu.i64(N), emu.i32(E), emu.i32(r), emu.i64(seq_len)),
                  "lora_dhg")
        return dH.clone(), dgates.clone()

    dH1, dg1 = run()
    dHg = (dy.double() @ _b_cat(B).double()).to(dtype)  # the reference's dHg, rounded as torch's GEMM rounds it
    dH_ref, dg_ref = TorchGateOps.backward(dHg, H, gates, scaling, seq_len)
    assert_close(dH1, dH_ref.double(), REL_TOL[dtype], "dH")
    assert_close(dg1, dg_ref.double(), REL_TOL[dtype], "dgates")
    dH2, dg2 = run()
    assert torch.equal(dH1, dH2) and torch.equal(dg1, dg2), "lora_dhg must be deterministic"


def _async_probe(steps, in_flight, exit_wait):
    src = torch.randn(steps * 32 * 4)
    dst = torch.zeros_like(src)
    rc = emu.lib().pfk_emu_async_probe(emu.ptr(src), emu.ptr(dst), emu.i32(steps), emu.i32(in_flight),
                                       emu.i32(exit_wait))
    return rc, src, dst


def test_emulated_cp_async_lands_only_at_the_wait():
    """The emulator's cp.async semantics (tests/cuda_emu/include/cuda_runtime.h), on which the tests of the
    tensor-core kernels' 3-stage pipeline rely: a copy lands at the wait that retires its group and not before (its
    destination reads as NaN until then)."""
    rc, src, dst = _async_probe(6, 1, 1)  # the right wait for 3 stages
    emu.check(rc, "async_probe")
    assert torch.equal(dst, src)
    rc, src, dst = _async_probe(6, 2, 1)  # one group too many left in flight: every tile is read before it lands
    emu.check(rc, "async_probe")
    assert torch.isnan(dst).all()


def test_emulated_cp_async_rejects_copies_in_flight_at_exit():
    """A thread that exits without waiting for its copies fails the launch (named `reject`: the sanitizer pass
    skips it, as the throw it needs trips ASan's __cxa_throw interceptor here)."""
    rc, _, _ = _async_probe(6, 8, 0)
    assert rc != 0 and "in flight" in emu.lib().pfk_emu_failure().decode()


def test_cuda_philox_is_the_torch_philox():
    """csrc's philox_uniform (dropout inside the CUDA kernels) is bit-identical to ops/dropout.py and tl.rand,
    also for offsets past 2**32 (the counter's high word)."""
    from personafuse_kernels.ops.dropout import philox_uniform

    for seed, off0 in [(0, 0), (0x1234_5678_9ABC, 3_000_000_000), (2**62 - 1, 2**40 + 17)]:
        out = torch.empty(1000)
        emu.lib().pfk_emu_philox(emu.ctypes.c_uint64(seed), emu.ctypes.c_uint64(off0), emu.i64(1000), emu.ptr(out))
        ref = philox_uniform(torch.tensor([seed]), torch.arange(1000, dtype=torch.int64) + off0)
        assert torch.equal(out, ref), (seed, off0)


# Top-k grouped kernels (csrc/topk/) over the routing metadata of routing/topk.py, against per-pair float64
# references, for the routing patterns of tests/test_topk.py (empty experts, everything on one expert, ...).
TOPK_CASES = [  # T, K, N, E, r, k, pattern, block_m
    (1, 33, 45, 4, 4, 1, "uniform", 16),
    (7, 40, 24, 6, 5, 2, "skewed", 16),
    (70, 48, 72, 8, 16, 2, "zipf", 64),
    (40, 64, 40, 16, 8, 4, "empty_experts", 16),
    (33, 24, 20, 3, 72, 2, "all_to_one", 16),
    (50, 72, 33, 64, 2, 2, "uniform", 64),
    (24, 40, 36, 4, 40, 2, "skewed", 16),  # 32 < r <= 64: the 64-column tile (r <= 32 use 32, r > 64 use 128)
]


def _topk_routing(T, E, k, pattern, block_m):
    from test_topk import routing

    from personafuse_kernels.routing.topk import build_routing_metadata

    idx = routing(T, E, k, pattern, torch.Generator().manual_seed(T + E))
    meta = build_routing_metadata(idx, E, block_m)
    return idx, meta


def _route_args(meta):
    return [emu.ptr(meta.sorted_pairs), emu.ptr(meta.group_start), emu.ptr(meta.block_group),
            emu.ptr(meta.block_start), emu.i32(meta.block_group.numel()), emu.i32(meta.block_m), emu.i32(meta.k)]


def _topk_setup(T, K, N, E, r, k, pattern, block_m, dtype):
    idx, meta = _topk_routing(T, E, k, pattern, block_m)
    P = T * k
    t = {
        "x": torch.randn(T, K).to(dtype), "dy": torch.randn(T, N).to(dtype),
        "A": (torch.randn(E, r, K) / K**0.5).to(dtype), "B": (torch.randn(E, N, r) / r**0.5).to(dtype),
        "w": torch.rand(P), "s": torch.linspace(0.5, 2.0, E), "H": torch.randn(P, r).to(dtype),
    }
    tok = torch.arange(P) // k
    e_of = idx.reshape(-1)
    coef = t["w"] * t["s"][e_of]  # w_p * s_e, fp32
    return idx, meta, t, tok, e_of, coef


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("T,K,N,E,r,k,pattern,block_m", TOPK_CASES)
def test_topk_pair_gemm(dtype, T, K, N, E, r, k, pattern, block_m):
    idx, meta, t, tok, e_of, coef = _topk_setup(T, K, N, E, r, k, pattern, block_m, dtype)
    P = T * k
    seed = torch.tensor([77], dtype=torch.int64)
    for p in (0.0, 0.25):
        H = emu.poisoned(P, r, dtype=dtype)
        Hg = emu.poisoned(P, r, dtype=dtype)
        emu.check(emu.lib().pfk_emu_topk_pair_gemm(
            emu.DTYPES[dtype], 0, emu.ptr(t["x"]), emu.ptr(t["A"]), emu.ptr(t["w"]), emu.ptr(t["s"]), emu.ptr(seed),
            None, emu.ptr(H), emu.ptr(Hg), None, emu.i64(K), E, r, emu.ctypes.c_float(p), *_route_args(meta)),
            "topk_pair_gemm forward")
        from personafuse_kernels.ops.dropout import apply_dropout

        xd = apply_dropout(t["x"], seed, p).double()
        H_ref = torch.einsum("pk,pjk->pj", xd[tok], t["A"].double()[e_of])
        assert_close(H, H_ref, REL_TOL[dtype], f"H p={p}")
        torch.testing.assert_close(Hg, (H.float() * coef[:, None]).to(dtype), rtol=0, atol=0)

    dH = emu.poisoned(P, r, dtype=dtype)
    dw = emu.poisoned(P, dtype=torch.float32)
    emu.check(emu.lib().pfk_emu_topk_pair_gemm(
        emu.DTYPES[dtype], 1, emu.ptr(t["dy"]), emu.ptr(t["B"]), emu.ptr(t["w"]), emu.ptr(t["s"]), None,
        emu.ptr(t["H"]), None, emu.ptr(dH), emu.ptr(dw), emu.i64(N), E, r, emu.ctypes.c_float(0.0),
        *_route_args(meta)), "topk_pair_gemm backward")
    dHg = torch.einsum("pn,pnj->pj", t["dy"].double()[tok], t["B"].double()[e_of]).to(dtype)
    assert_close(dH, (dHg.float() * coef[:, None]).double(), REL_TOL[dtype], "dH")
    dw_ref = (dHg.double() * t["H"].double()).sum(-1) * t["s"].double()[e_of]
    assert_close(dw, dw_ref, REL_TOL[dtype], "dw")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("T,K,N,E,r,k,pattern,block_m", TOPK_CASES)
def test_topk_expand(dtype, T, K, N, E, r, k, pattern, block_m):
    from personafuse_kernels.ops.dropout import keep_mask

    idx, meta, t, tok, e_of, coef = _topk_setup(T, K, N, E, r, k, pattern, block_m, dtype)
    P = T * k
    X2 = torch.randn(P, r).to(dtype)
    seed = torch.tensor([1234], dtype=torch.int64)
    for mode, M, n_out, p in ((0, t["B"], N, 0.0), (1, t["A"], K, 0.0), (1, t["A"], K, 0.4)):
        out0 = torch.randn(T, n_out).to(dtype)
        out = out0.clone()
        emu.check(emu.lib().pfk_emu_topk_expand(emu.DTYPES[dtype], mode, emu.ptr(X2), emu.ptr(M), emu.ptr(out),
                                                emu.ptr(seed), emu.i64(n_out), E, r, emu.ctypes.c_float(p),
                                                *_route_args(meta)), "topk_expand")
        Me = M.double()[e_of]  # [P, N, r] or [P, r, K]
        contrib = (torch.einsum("pj,pnj->pn", X2.double(), Me) if mode == 0
                   else torch.einsum("pj,pjn->pn", X2.double(), Me))
        lora = torch.zeros(T, n_out, dtype=torch.float64).index_add_(0, tok, contrib)
        if p > 0:
            lora = lora * keep_mask(seed, T, n_out, p).double() / (1 - p)
        assert_close(out, out0.double() + lora, REL_TOL[dtype], f"expand mode {mode} p={p}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("T,K,N,E,r,k,pattern,block_m", TOPK_CASES)
def test_topk_wgrad(dtype, T, K, N, E, r, k, pattern, block_m):
    from personafuse_kernels.ops.dropout import apply_dropout

    idx, meta, t, tok, e_of, coef = _topk_setup(T, K, N, E, r, k, pattern, block_m, dtype)
    P = T * k
    seed = torch.tensor([99], dtype=torch.int64)
    dB = emu.poisoned(E, N, r, dtype=dtype)
    emu.check(emu.lib().pfk_emu_topk_wgrad(emu.DTYPES[dtype], 0, emu.ptr(t["dy"]), emu.ptr(t["H"]), emu.ptr(t["w"]),
                                           emu.ptr(t["s"]), None, emu.ptr(dB), emu.i64(N), E, r,
                                           emu.ctypes.c_float(0.0), emu.ptr(meta.sorted_pairs),
                                           emu.ptr(meta.group_start), emu.i32(k)), "topk_wgrad dB")
    Hg = (t["H"].float() * coef[:, None]).to(dtype).double()
    dB_ref = torch.zeros(E, N, r, dtype=torch.float64).index_add_(
        0, e_of, torch.einsum("pn,pj->pnj", t["dy"].double()[tok], Hg))
    assert_close(dB, dB_ref, REL_TOL[dtype], "dB")
    dH = torch.randn(P, r).to(dtype)
    for p in (0.0, 0.3):
        dA = emu.poisoned(E, r, K, dtype=dtype)
        emu.check(emu.lib().pfk_emu_topk_wgrad(emu.DTYPES[dtype], 1, emu.ptr(dH), emu.ptr(t["x"]), emu.ptr(t["w"]),
                                               emu.ptr(t["s"]), emu.ptr(seed), emu.ptr(dA), emu.i64(K), E, r,
                                               emu.ctypes.c_float(p), emu.ptr(meta.sorted_pairs),
                                               emu.ptr(meta.group_start), emu.i32(k)), "topk_wgrad dA")
        xd = apply_dropout(t["x"], seed, p).double()
        dA_ref = torch.zeros(E, r, K, dtype=torch.float64).index_add_(
            0, e_of, torch.einsum("pj,pk->pjk", dH.double(), xd[tok]))
        assert_close(dA, dA_ref, REL_TOL[dtype], f"dA p={p}")
        unused = torch.ones(E, dtype=torch.bool)
        unused[e_of] = False
        assert torch.all(dA[unused] == 0), "experts without pairs must get zero gradients"
