"""personafuse explain on the cuda backend: the extension's ops dry-run on meta tensors through their fake
implementations, and perf/cuda_launches.py expands each op into the kernels its C++ launcher starts. Held to:
- golden kernel lists written from the design (a launch that appears or disappears fails);
- real runs of the same Python and C++ in the CUDA emulator: the same ops in the same order, the fakes' outputs
  shaped like the real ones, and every modeled launch's grid, block, shared memory and cooperativeness equal to
  what the emulated launchers started (its launch log)."""
import emu
import pytest
import torch

from personafuse_kernels._extension import load_extension
from personafuse_kernels.autograd import Needs
from personafuse_kernels.dispatch import topk_block_m
from personafuse_kernels.ops import routed_lora_cuda, routed_lora_topk_cuda
from personafuse_kernels.perf import cuda_launches, dry_run, explain
from personafuse_kernels.perf.dryrun import recording

has_extension = pytest.mark.skipif(load_extension()[0] is None, reason="the CUDA extension is not built here")
has_compiler = pytest.mark.skipif(emu.compiler() is None, reason="no C++ compiler for the CUDA emulator")
NEEDS = Needs(True, False, False, True, True, True)
EMULATED_SMS = 4  # tests/cuda_emu/include/cuda_runtime.h cudaDeviceGetAttribute
# its occupancy rule for the decode kernel: min(2048 / 256 threads, 228 KiB / (33 KiB + 1 KiB), 32) blocks per SM
EMULATED_DECODE_BLOCKS_PER_SM = 6


def names(launches):
    return [launch.name for _, launch in launches]


def kernel_names(expl, phase):
    return [row.name for row in expl.kernels if row.phase == phase]


# Written from the design (docs/design.md, docs/backends.md), not from the code. K = N = 4096, r = 16; E = 10 dense,
# E = 64 top-2 grouped; H200, bf16.
GOLDEN = {
    # one cooperative launch: base, shrink, gate and expand, W streamed once
    ("dense", "fwd", 1): ["lora_decode_kernel"],
    # cuBLAS base, then the decode kernel adds the LoRA term in place
    ("dense", "fwd", 16): ["addmm", "lora_decode_kernel"],
    # cuBLAS base; tensor-core shrink with the gate in its epilogue; B_cat laid out; the expand added into y
    ("dense", "fwd", 4096): ["addmm", "lora_shrink_kernel", "clone", "addmm_"],
    # Hg recomputed for dB; dB = dY^T Hg; B_cat; dHg -> (dH, dgates) on tensor cores; dA; the LoRA part of dx;
    # dx += dY W in place
    ("dense", "bwd", 4096): ["gate_forward_kernel", "mm", "clone", "lora_dhg_kernel", "mm", "mm", "addmm_"],
    # base first, then the routing metadata on the device (count table, count, scan, scatter), the pair shrink
    # and the expand into y, one launch per slot (k = 2)
    ("topk", "fwd", 8192): ["addmm", "zeros", "_route_count_kernel", "_route_scan_kernel", "_route_scatter_kernel",
                            "topk_pair_gemm_kernel", "topk_expand_kernel", "topk_expand_kernel"],
    # dH and dweights per pair; dB and dA per expert; dx = dY W; drop'(dH A_e) added into dx, one launch per slot
    ("topk", "bwd", 8192): ["topk_pair_gemm_kernel", "topk_wgrad_kernel", "topk_wgrad_kernel", "mm",
                            "topk_expand_kernel", "topk_expand_kernel"],
}


@has_extension
@pytest.mark.parametrize("key", list(GOLDEN))
def test_kernel_lists_match_the_golden_lists(key):
    path, mode, T = key
    E, k = (64, 2) if path == "topk" else (10, 0)
    expl = explain(T, 4096, 4096, E, 16, k, "bf16", "cuda", mode, "H200")
    assert kernel_names(expl, mode) == GOLDEN[key]


@has_extension
def test_decode_launch_geometry_at_production_size():
    """T = 1 at 4096 x 4096, E r = 160: 4256 rows of [W; A_cat] in groups of 16 -> 266 blocks wanted, capped at 2
    co-resident blocks on each of the H200's 132 SMs."""
    (row,) = explain(1, 4096, 4096, 10, 16, backend="cuda").kernels
    assert row.grid == [264] and row.config["cooperative"] and row.config["smem"] == 33792
    # W (33.5 MB) + A and B (1.3 MB each) once, and the activations
    assert 36.1 < row.mbytes < 36.3


@has_extension
def test_extension_kernels_are_flagged_as_unmeasured():
    expl = explain(1, 4096, 4096, 10, 16, backend="cuda")
    assert not expl.calibrated and "no measured row" in expl.uncalibrated_reason
    assert 1.0 < expl.gpu_ratio < 1.5 and expl.base_gpu_ms > 0


# ------------------------------------------------------------------ real runs in the CUDA emulator


@pytest.fixture
def emulated(monkeypatch):
    ops = emu.load_ops()
    monkeypatch.setattr(routed_lora_cuda, "kernel_ops", lambda: ops)
    emu.take_launch_log()  # drop what earlier tests launched
    return ops


def _case(T, K, N, E, r, dtype, k=0, seq_len=1):
    g = torch.Generator().manual_seed(T * 31 + E)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)  # noqa: E731
    x, W, b, A, B = rnd(T, K), rnd(N, K), rnd(N), rnd(E, r, K), rnd(E, N, r)
    if k:
        top = torch.rand(T, E, generator=g).topk(k)
        gates = (top.indices, top.values)
    else:
        gates = torch.rand(T // seq_len, E, generator=g)
    return x, W, b, A, B, gates, torch.linspace(0.5, 2.0, E)


def _run(inputs, k, seq_len, dtype):
    """Forward then backward of the cuda backend on CPU tensors with the emulated ops: (recorded launches, the
    emulator's launch log)."""
    x, W, b, A, B, gates, scaling = inputs
    seed = torch.empty(0, dtype=torch.int64)
    with recording(None, triton=False) as launches:
        if k:
            indices, weights = gates
            y, saved, meta = routed_lora_topk_cuda.forward(x, W, b, A, B, indices, weights, scaling, seed, 0.0,
                                                           topk_block_m("cuda", *indices.shape))
            routed_lora_topk_cuda.backward(torch.ones_like(y), x, W, A, B, indices, weights, scaling, seed, saved,
                                           0.0, meta, NEEDS)
        else:
            y, saved = routed_lora_cuda.forward(x, W, b, A, B, gates, scaling, seed, seq_len, 0.0)
            routed_lora_cuda.backward(torch.ones_like(y), x, W, A, B, gates, scaling, seed, saved, seq_len, 0.0, NEEDS)
    return launches, emu.take_launch_log()


CASES = [  # T, K, N, E, r, k, seq_len, dtype: every op of the extension at least once
    (1, 72, 40, 3, 8, 0, 1, torch.bfloat16),  # fused decode (base in the kernel)
    (7, 45, 33, 64, 1, 0, 7, torch.float16),  # fused decode, E = 64, r = 1; sequence gates: sequence_sum
    (40, 64, 24, 5, 24, 0, 1, torch.bfloat16),  # cuBLAS base + decode delta
    (64, 2100, 40, 5, 16, 0, 1, torch.float16),  # decode delta over (row group, K slice) pairs: 5 groups x 3 slices
    (133, 40, 33, 10, 16, 0, 1, torch.bfloat16),  # tensor-core shrink and dHg (4 experts per 64-wide tile)
    (70, 48, 40, 2, 128, 0, 35, torch.float16),  # 128-wide tiles; dHg's sequence_sum
    (66, 24, 20, 2, 136, 0, 1, torch.bfloat16),  # r > 128: gate kernels
    (9, 24, 20, 3, 4, 0, 3, torch.float32),  # float32: gate kernels with sequence gates
    (133, 40, 33, 6, 16, 2, 1, torch.bfloat16),  # grouped top-k: pair GEMMs, expand, both weight gradients
    (40, 72, 24, 4, 100, 1, 1, torch.float16),  # grouped top-k, 128-wide tiles
]


@has_compiler
@pytest.mark.parametrize("T,K,N,E,r,k,seq_len,dtype", CASES)
def test_modeled_launches_are_the_emulated_launches(emulated, T, K, N, E, r, k, seq_len, dtype):
    launches, log = _run(_case(T, K, N, E, r, dtype, k, seq_len), k, seq_len, dtype)
    ops = [launch for launch in launches if launch.source == "cuda"]
    assert ops, "the case ran no extension op"
    modeled = [(kern.grid, kern.threads, kern.smem, bool(kern.config.get("cooperative", False)))
               for launch in ops
               for kern in cuda_launches.kernels(launch.name, launch.args, EMULATED_SMS, EMULATED_DECODE_BLOCKS_PER_SM)]
    assert modeled == log, [launch.name for launch in ops]


@has_compiler
@pytest.mark.parametrize("T,K,N,E,r,k,seq_len,dtype", CASES)
def test_fakes_shape_outputs_like_the_ops(emulated, T, K, N, E, r, k, seq_len, dtype):
    """Each extension op the run called, called again on meta copies of its arguments (its fake implementation):
    the same output shapes and dtypes."""
    launches, _ = _run(_case(T, K, N, E, r, dtype, k, seq_len), k, seq_len, dtype)
    for launch in (lnch for lnch in launches if lnch.source == "cuda"):
        args = {key: v for key, v in launch.args.items() if key != "outputs"}
        meta = {key: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v
                for key, v in args.items()}
        out = getattr(emulated, launch.name)(*meta.values())
        fake = [t for t in (out if isinstance(out, tuple) else [out]) if isinstance(t, torch.Tensor)]
        assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in launch.args["outputs"]], launch.name


@has_extension
@has_compiler
@pytest.mark.parametrize("T,k", [(1, 0), (40, 0), (133, 0), (133, 2)])
def test_dry_run_calls_the_ops_a_real_run_calls(emulated, T, k):
    """explain's dry run (meta tensors, the real extension's fakes) against the emulated run of the same shape:
    the same extension ops in the same order."""
    K, N, E, r = 40, 33, 6, 16
    real, _ = _run(_case(T, K, N, E, r, torch.bfloat16, k), k, 1, torch.bfloat16)
    dry = dry_run(T, K, N, E, r, k, "bf16", "cuda", "fwdbwd", "H200")
    assert [ln.name for ln in real if ln.source == "cuda"] == [ln.name for _, ln in dry if ln.source == "cuda"]


@has_extension
def test_explain_cli_on_the_cuda_backend(capsys):
    import json

    from personafuse_kernels.cli import main

    assert main(["explain", "--shape", "1,4096,4096,10,16", "--backend", "cuda", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == 3 and [k["name"] for k in data["kernels"]] == ["lora_decode_kernel"]
    assert data["kernels"][0]["source"] == "cuda" and data["kernels"][0]["config"]["op"] == "lora_decode_linear"
