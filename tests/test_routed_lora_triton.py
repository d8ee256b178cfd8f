"""The triton backend against the torch reference: forward and every gradient, odd shapes, every gating mode,
dropout, dtypes, the split-K / unfused / atomic paths. On CPU this runs under TRITON_INTERPRET=1 (CI)."""
import dataclasses

import pytest
import torch
from conftest import HAS_CUDA, assert_close, assert_within_3x, requires_cuda
from helpers import backward_grads, make_inputs, reference

import personafuse_kernels as pfk
from personafuse_kernels.ops import routed_lora_triton as rlt
from personafuse_kernels.ops.dropout import philox_uniform

pytestmark = pytest.mark.skipif("triton" not in pfk.available_backends(),
                                reason=f"triton backend unavailable: {pfk.unavailable_reasons().get('triton')}")
DEVICE = "cuda" if HAS_CUDA else "cpu"
# fp32 on a GPU: tl.dot follows torch's allow_tf32 (off by default), so the ieee tolerance holds there too.
FP32_TOL = 2e-5

SHAPES = [  # T, K, N, E, r
    (1, 33, 45, 1, 1),
    (7, 33, 45, 3, 4),
    (133, 45, 33, 10, 16),
    (1, 45, 33, 10, 16),
    (7, 45, 33, 3, 64),
    (133, 33, 45, 1, 64),
    (7, 33, 45, 64, 2),
    (5, 20, 24, 2, 128),
]
GRADS = ("x", "weight", "bias", "lora_A", "lora_B", "gates")


def run(inputs, scaling, backend, dropout_p=0.0):
    return pfk.routed_lora(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"],
                           inputs["gates"], scaling=scaling, dropout_p=dropout_p, backend=backend)


def check_against_reference(inputs, scaling, tol, dropout_p=0.0, seed=0):
    torch.manual_seed(seed)
    y = run(inputs, scaling, "triton", dropout_p)
    dy = torch.randn_like(y)
    grads = backward_grads(y, inputs, dy)
    ref_in = {k: (None if v is None else v.detach().clone().requires_grad_(True)) for k, v in inputs.items()}
    torch.manual_seed(seed)  # the same dropout seed is drawn: the same mask
    y_ref = run(ref_in, scaling, "torch", dropout_p)
    ref_grads = backward_grads(y_ref, ref_in, dy)
    assert_close(y, y_ref, tol, "y")
    for name in GRADS:
        if inputs.get(name) is not None:
            assert_close(grads[name], ref_grads[name], tol, f"d{name}")


@pytest.mark.parametrize("T,K,N,E,r", SHAPES)
@pytest.mark.parametrize("gate_mode", ["token", "sequence"])
def test_matches_torch_fp32(T, K, N, E, r, gate_mode):
    batch = 2 if gate_mode == "sequence" else None
    inputs = make_inputs(T, K, N, E, r, gate_mode=gate_mode, device=DEVICE, batch=batch)
    check_against_reference(inputs, torch.linspace(0.5, 2.0, E, device=DEVICE), FP32_TOL)


def test_matches_per_expert_loop_in_float64_reference():
    """Not only the torch backend: also the independent per-expert loop, in float64."""
    inputs = make_inputs(7, 33, 45, 3, 4, device=DEVICE, batch=2)
    y = run(inputs, 1.5, "triton")
    y_ref, leaves = reference(inputs, 1.5)
    assert_close(y, y_ref, FP32_TOL, "y")
    dy = torch.randn_like(y)
    g = backward_grads(y, inputs, dy)
    gr = backward_grads(y_ref, leaves, dy.double())
    for name in GRADS:
        assert_close(g[name], gr[name], FP32_TOL, f"d{name}")


@pytest.mark.parametrize("gate_mode", ["token", "sequence", "single"])
def test_gating_modes_and_no_bias(gate_mode):
    inputs = make_inputs(7, 33, 45, 3, 4, gate_mode=gate_mode, bias=False, device=DEVICE)
    check_against_reference(inputs, 2.0, FP32_TOL)


@pytest.mark.parametrize("T,gate_mode", [(7, "token"), (133, "sequence"), (1, "token")])
def test_dropout_same_mask_as_reference_forward_and_backward(T, gate_mode):
    inputs = make_inputs(T, 45, 33, 3, 16, gate_mode=gate_mode, device=DEVICE)
    check_against_reference(inputs, 2.0, FP32_TOL, dropout_p=0.3, seed=11)


def test_in_kernel_rng_is_the_torch_philox():
    """tl.rand in our kernels and ops/dropout.philox_uniform give bit-identical uniforms."""
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(SEED, OUT, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs64 = offs.to(tl.int64) + 3_000_000_000  # also exercise offsets past 2**32 (the high word)
        tl.store(OUT + offs, tl.rand(tl.load(SEED), offs64), mask=offs < n)

    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64, device=DEVICE)
    out = torch.empty(1000, device=DEVICE)
    rand_kernel[(4,)](seed, out, 1000, BLOCK=256)
    ref = philox_uniform(seed, torch.arange(1000, device=DEVICE, dtype=torch.int64) + 3_000_000_000)
    assert torch.equal(out, ref)
    assert 0.45 < float(ref.mean()) < 0.55


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_3x_of_torch_same_dtype(dtype):
    inputs = make_inputs(33, 64, 48, 4, 8, dtype=dtype, device=DEVICE, gate_dtype=torch.float32)
    y = run(inputs, 2.0, "triton")
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    g = backward_grads(y, inputs, dy)
    y64, l64 = reference(inputs, 2.0)
    g64 = backward_grads(y64, l64, dy.double())
    ref_in = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y_lp = run(ref_in, 2.0, "torch")
    g_lp = backward_grads(y_lp, ref_in, dy)
    assert_within_3x(y, y_lp, y64, "y")
    for name in GRADS:
        assert g[name].dtype == inputs[name].dtype
        assert_within_3x(g[name], g_lp[name], g64[name], name)


def force_config(monkeypatch, op, **fields):
    """Every launch of ``op`` in this test gets its heuristic config with ``fields`` replaced."""
    real = rlt.get_config

    def patched(name, *args):
        cfg = real(name, *args)
        return dataclasses.replace(cfg, **fields) if name == op else cfg

    monkeypatch.setattr(rlt, "get_config", patched)


def test_unfused_base_path_matches(monkeypatch):
    """cuBLAS base + LoRA accumulated into y in place (the other forward layout) gives the same result."""
    force_config(monkeypatch, "gemm", fuse_base=False)
    inputs = make_inputs(133, 45, 33, 10, 16, device=DEVICE)
    check_against_reference(inputs, 1.0, FP32_TOL)


@pytest.mark.parametrize("T,K,N,E,r,dropout_p", [(133, 72, 48, 3, 8, 0.0), (133, 64, 40, 10, 16, 0.25),
                                                 (80, 48, 56, 1, 16, 0.0)])
def test_persistent_tma_dual_gemm(monkeypatch, T, K, N, E, r, dropout_p):
    """The Hopper path (persistent kernel, TMA descriptors) for y and dx, on 16-byte aligned shapes."""
    force_config(monkeypatch, "gemm", tma=True, block_m=32, block_n=32, block_k=32, block_k2=16)
    calls = []
    real_launch = rlt.dual_gemm_tma
    monkeypatch.setattr(rlt, "dual_gemm_tma", lambda *a, **k: calls.append(real_launch(*a, **k)) or calls[-1])
    inputs = make_inputs(T, K, N, E, r, device=DEVICE)
    check_against_reference(inputs, 2.0, FP32_TOL, dropout_p=dropout_p, seed=4)
    assert calls == [True, True], "forward y and backward dx should both have run on the TMA kernel"


def test_tma_falls_back_on_misaligned_strides_and_on_compile_failure(monkeypatch):
    force_config(monkeypatch, "gemm", tma=True, block_m=32, block_n=32, block_k=32, block_k2=16)
    inputs = make_inputs(133, 45, 33, 3, 4, device=DEVICE)  # K = 45 floats: rows not 16-byte aligned
    check_against_reference(inputs, 1.0, FP32_TOL)

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    class Broken:
        def __getitem__(self, grid):
            return broken

    monkeypatch.setattr(rlt.tk, "_dual_gemm_tma_kernel", Broken())
    monkeypatch.setattr(rlt, "TMA_FALLBACKS", {})
    inputs = make_inputs(133, 72, 48, 3, 8, device=DEVICE)
    with pytest.warns(UserWarning, match="TMA dual-GEMM kernel failed to compile"):
        check_against_reference(inputs, 1.0, FP32_TOL)
    assert len(rlt.TMA_FALLBACKS) == 1 and "PassManager" in next(iter(rlt.TMA_FALLBACKS.values()))


@pytest.mark.parametrize("split_k", [1, 3])
def test_split_k_shrink(monkeypatch, split_k):
    force_config(monkeypatch, "shrink", split_k=split_k, block_k=16)
    inputs = make_inputs(7, 70, 33, 3, 4, device=DEVICE)
    check_against_reference(inputs, 1.0, FP32_TOL, dropout_p=0.2, seed=3)


def test_atomic_weight_gradient_reduction_behind_flag(monkeypatch):
    monkeypatch.setenv("PERSONAFUSE_ATOMIC_REDUCE", "1")
    assert rlt._atomic_reduce()
    inputs = make_inputs(133, 45, 33, 3, 4, device=DEVICE)
    check_against_reference(inputs, 1.0, FP32_TOL)


def test_default_weight_gradients_are_deterministic():
    inputs = make_inputs(133, 45, 33, 3, 4, device=DEVICE)
    grads = []
    for _ in range(2):
        for t in inputs.values():
            t.grad = None
        run(inputs, 1.0, "triton").sum().backward()
        grads.append([inputs[k].grad.clone() for k in ("lora_A", "lora_B", "gates")])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_empty_batch():
    inputs = make_inputs(0, 16, 12, 2, 4, device=DEVICE)
    y = run(inputs, 1.0, "triton")
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.count_nonzero(inputs["lora_A"].grad) == 0


def test_config_heuristic_is_cached_and_keyed_on_buckets():
    from personafuse_kernels.ops import launch_configs as lc

    lc.get_config.cache_clear()
    a = lc.get_config("shrink", 64, 4096, 4096, 160, "NVIDIA H200", False)
    b = lc.get_config("shrink", 64, 4096, 4096, 160, "NVIDIA H200", False)
    assert a is b and a.split_k > 1  # decode: split-K shrink
    assert lc.get_config("gemm", 64, 4096, 4096, 160, "NVIDIA H200", False).block_m == 16  # narrow tiles
    assert lc.get_config("shrink", 4096, 4096, 4096, 160, "NVIDIA H200", False).split_k == 1
    big = lc.get_config("gemm", 4096, 4096, 4096, 160, "NVIDIA H200", False)
    assert big.block_m == 128 and big.tma
    assert not lc.get_config("gemm", 4096, 4096, 4096, 160, "NVIDIA A100-SXM4-80GB", False).tma
    assert lc.get_config.cache_info().hits >= 1


def test_tuned_tables_override_per_op_and_reject_unknown_fields(monkeypatch, tmp_path):
    from personafuse_kernels.ops import launch_configs as lc

    card = tmp_path / "NVIDIA_H999"
    card.mkdir()
    (card / "gemm.json").write_text('{"T<=4096": {"block_n": 128, "num_stages": 4}}')
    (card / "dhg.json").write_text('{"T<=4096": {"block_q": 1}}')
    monkeypatch.setattr(lc, "TUNED_DIR", tmp_path)
    lc.get_config.cache_clear()
    lc.tuned_table.cache_clear()
    try:
        gemm = lc.get_config("gemm", 4096, 4096, 4096, 160, "NVIDIA H999", False)
        assert (gemm.block_n, gemm.num_stages, gemm.block_m) == (128, 4, 128)
        assert lc.get_config("gemm", 16384, 4096, 4096, 160, "NVIDIA H999", False).block_n == 256  # other bucket
        with pytest.raises(ValueError, match="unknown fields"):
            lc.get_config("dhg", 4096, 4096, 4096, 160, "NVIDIA H999", False)
        with pytest.raises(ValueError, match="unknown op"):
            lc.get_config("gemv", 4096, 4096, 4096, 160, "NVIDIA H999", False)
    finally:
        lc.get_config.cache_clear()
        lc.tuned_table.cache_clear()


def test_launch_configs_import_without_torch():
    """The AOT gate loads launch_configs.py by path under a Triton-only environment: it must not import torch."""
    import subprocess
    import sys

    from personafuse_kernels.ops import launch_configs as lc

    code = ("import sys, importlib.util; sys.modules['torch'] = None; sys.modules['triton'] = None\n"
            f"spec = importlib.util.spec_from_file_location('lc', {str(lc.__file__)!r})\n"
            "m = sys.modules['lc'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(m.get_config('gemm', 4096, 4096, 4096, 160, 'NVIDIA H200'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "GemmConfig(block_m=128" in res.stdout, res.stderr


def test_auto_picks_torch_on_cpu_even_when_interpreting():
    from personafuse_kernels.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"


@requires_cuda
def test_auto_picks_triton_on_cuda():
    from personafuse_kernels.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton"


@requires_cuda
def test_no_host_sync_and_cuda_graph_replay():
    inputs = make_inputs(64, 256, 192, 10, 16, dtype=torch.bfloat16, device="cuda")
    run(inputs, 2.0, "triton", dropout_p=0.1).sum().backward()  # compile kernels outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(inputs, 2.0, "triton", dropout_p=0.1).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x, w, b, A, B, g = (inputs[k].detach() for k in ("x", "weight", "bias", "lora_A", "lora_B", "gates"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = pfk.routed_lora(x, w, b, A, B, g, scaling=2.0, backend="triton")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y_graph, pfk.routed_lora(x, w, b, A, B, g, scaling=2.0, backend="torch"), 2e-2)


@pytest.mark.parametrize("case", range(12))
def test_random_shapes_sweep(case):
    """Seeded random shapes, gate layouts, scalings and dropout: the kernels' masks and tails everywhere."""
    import random

    rng = random.Random(1000 + case)
    T, K, N = rng.randint(1, 150), rng.randint(1, 100), rng.randint(1, 100)
    E, r = rng.randint(1, 12), rng.choice([1, 2, 3, 5, 8, 16, 24, 40])
    mode = rng.choice(["token", "sequence", "single"])
    p = rng.choice([0.0, 0.0, 0.1, 0.5])
    inputs = make_inputs(T, K, N, E, r, gate_mode=mode, device=DEVICE, bias=rng.random() < 0.7,
                         batch=rng.randint(1, 3) if mode == "sequence" else None)
    scaling = rng.choice([1.0, torch.rand(E, device=DEVICE) * 2])
    check_against_reference(inputs, scaling, FP32_TOL, dropout_p=p, seed=case)
