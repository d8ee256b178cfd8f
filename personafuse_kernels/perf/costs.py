"""What each recorded launch costs: FLOPs, DRAM bytes, and a roofline time under written efficiency assumptions.

    time(launch) = max(flops / (peak * compute_eff), bytes / (bandwidth * memory_eff)) / wave_eff + gap
    time(call)   = the end of a two-lane timeline: the host issues the launches one after another (each costs its
                   host time), and the GPU starts each kernel when both it is free and the launch has been issued

- flops: the MMA work the kernel does, padding included (a 160-wide C tiled by 128 does 256 columns of work);
- bytes: DRAM traffic. An operand that fits a quarter of L2 is read from DRAM once; a larger one once per
  program tile that reads it when those tiles run far apart in launch order, once when they are adjacent (the
  shrink's C tiles and dHg's expert blocks of one row block are: grid axis 0);
- wave_eff: tiles / (waves * slots) for the big GEMMs (a partial last wave still takes a whole wave);
- gap: the GPU's idle time between two dependent kernels of one stream;
- host time: what the CPU spends issuing each launch (Python, the dispatcher, autograd's engine); a stretch of
  kernels shorter than their host time runs at the host's pace.

The assumptions (ASSUMPTIONS) are fixed numbers with the measurement that fixed each. They were set once from
the H200 anchor rows of the providers the model does not own (cuBLAS F.linear, stacked torch, the per-expert loop)
and the one-accumulator TMA probe; tests/test_explain.py holds the model to those rows within 15 %. They are
never adjusted to make this package's kernels look good: explain's predictions for them use the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cards import Card
from .dryrun import Launch

ASSUMPTIONS = {
    # cuBLAS on a large GEMM (every dim >= 1024): the H200 base, 4096^3 bf16 in 0.196 ms = 701 TFLOP/s = 0.71 of
    # 989 (anchor rows, 2026-11-26).
    "cublas_compute_eff": 0.71,
    # GEMMs with a dim under 1024 (N = E*r = 160 shrinks, K = 160 expands, the weight gradients' 160-row outputs)
    # are bandwidth-bound; cuBLAS reaches about this share of HBM bandwidth on them.
    "cublas_skinny_memory_eff": 0.55,
    "cublas_skinny_compute_eff": 0.35,
    # elementwise, copies, reductions, fills: share of HBM bandwidth of a large streaming kernel.
    "stream_memory_eff": 0.80,
    # Triton GEMMs: the persistent TMA kernel of the H200 calibration reached 1.03x cuBLAS at T = 16384 (4096^2),
    # the plain pointer kernel 1.16x: their compute efficiency relative to cuBLAS's.
    "triton_tma_compute_eff": 0.71 / 1.03,
    "triton_pointer_compute_eff": 0.71 / 1.16,
    "triton_memory_eff": 0.70,
    # Fixed cost of the TMA probe beyond its roofline: descriptor set-up and the persistent kernel's pipeline fill
    # and drain; the probe's 1.17x at T = 4096 against 1.03x at T = 16384 is a near-constant 0.02-0.03 ms.
    "triton_tma_fixed_ms": 0.025,
    # GPU idle time between two dependent kernels of a stream (launch latency hidden by the queue).
    "gap_ms": 0.003,
    # Host time, from the H200 rows at T = 16, where every provider is host-bound (the GPU work is microseconds):
    # F.linear forward 0.042 ms for one launch; stacked forward 0.180 ms for 7 launches (0.024 each); the base's
    # backward 0.118 ms for one node; stacked backward 0.657 ms for 14 launches. A call's fixed cost (the
    # benchmark loop), one eager aten op, backward's fixed cost (autograd engine), one launch inside backward.
    "host_call_ms": 0.010,
    "host_aten_ms": 0.024,
    "host_backward_fixed_ms": 0.075,
    "host_backward_node_ms": 0.042,
    # One Triton launch from Python (argument binding, the cache lookup): about the cost of an eager aten op.
    "host_triton_ms": 0.024,
    # The CUDA extension's kernels. No measured row fixes these yet (no GPU has run them), so they borrow the
    # figures above rather than take new ones: the tensor-core tile kernels (shrink, dHg, the grouped top-k
    # kernels) are held to the skinny cuBLAS GEMMs' compute share and the Triton small kernels' bandwidth share;
    # the decode kernel streams its weights at what cuBLAS's GEMV reaches on the same stream (the base at
    # T <= 64 is a cublas_skinny GEMM), never better.
    "cuda_mma_compute_eff": 0.35,
    "cuda_mma_memory_eff": 0.70,
    "cuda_decode_memory_eff": 0.55,
    # The decode kernel's dot products are fp32 FMAs on CUDA cores: half of the card's fp32 peak (lane sums,
    # shared-memory staging and the bf16 -> fp32 converts take the other issue slots). An estimate.
    "cuda_core_fp32_eff": 0.50,
    # Its grid-wide barriers (cooperative launch, grid.sync()): a few microseconds on Hopper-class cards in
    # published microbenchmarks; an estimate until a GPU times it.
    "grid_sync_ms": 0.002,
    # L2 -> SM bandwidth as a multiple of the card's HBM bandwidth, for the operands the decode kernel re-reads
    # from L2 (x staged by every block that takes rows, Hg by every block of phase 2, the slices' partial sums).
    # An order of magnitude from published microbenchmarks of Hopper-class L2, not a measurement of ours.
    "l2_over_hbm": 2.0,
}

# Kinds whose efficiency no measured row has fixed: an explanation whose GPU time is mostly theirs says so.
UNMEASURED_KINDS = ("cuda_mma", "cuda_decode")


@dataclass
class Cost:
    flops: float
    bytes: float
    kind: str  # cublas, cublas_skinny, stream, triton_tma, triton_pointer, triton_small, cuda_mma, cuda_decode
    waves: float = 1.0  # wave efficiency (<= 1) of the big GEMMs
    grid_syncs: int = 0  # grid-wide barriers inside the kernel (cooperative launches)
    l2_bytes: float = 0.0  # operands re-read from L2 (priced where a kernel's design makes them matter)


def _elt(t: torch.Tensor) -> int:
    return t.element_size()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _gemm_kind(M: int, N: int, K: int) -> str:
    return "cublas" if min(M, N, K) >= 1024 else "cublas_skinny"


def aten_cost(launch: Launch) -> Cost:
    """FLOPs and bytes of one aten op from its input and output tensors."""
    name = launch.name
    ins, outs = launch.args["inputs"], launch.args["outputs"]
    if name in ("mm", "addmm", "bmm", "baddbmm", "addmm_", "linear", "matmul"):
        mats = [t for t in ins if t.dim() >= 2]
        a, b = mats[-2], mats[-1]
        batch = a.shape[0] if a.dim() == 3 else 1
        M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
        out_bytes = sum(_nbytes(t) for t in outs)
        extra = 0
        if name == "addmm" and ins[0].dim() == 2 and tuple(ins[0].shape) == (M, N):
            # out-of-place onto a full matrix: ATen copies `self` into the result, then a beta = 1 GEMM reads it
            # (a 1-D self is F.linear's bias, applied in the GEMM's epilogue)
            extra = 2 * out_bytes + out_bytes
        elif name == "addmm_":
            extra = out_bytes
        bytes_ = _nbytes(a) + _nbytes(b) + out_bytes + extra
        return Cost(2.0 * batch * M * N * K, bytes_, _gemm_kind(M, N, K))
    # everything else streams its operands: read the inputs once, write the outputs
    bytes_ = sum(_nbytes(t) for t in ins if t.numel() > 1) + sum(_nbytes(t) for t in outs)
    if name in ("zero_", "fill_", "zeros", "zeros_like", "ones", "full"):
        bytes_ = sum(_nbytes(t) for t in outs)
    return Cost(0.0, bytes_, "stream")


def _fits_l2(nbytes: float, card: Card) -> bool:
    return nbytes <= card.l2_mib * 2**20 / 4


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def triton_cost(launch: Launch, card: Card) -> Cost:
    """FLOPs and DRAM bytes of one Triton launch of the package, from its bound arguments and constexprs."""
    a, n = launch.args, launch.name
    if n == "_shrink_kernel":
        T, K = _shape(a["X"])
        C = a["C"]
        gc, gm, split = launch.grid  # C tiles of one row block adjacent: x read from DRAM once
        e = _elt(a["X"])
        flops = 2.0 * gm * a["BLOCK_M"] * gc * a["BLOCK_C"] * K
        out = split * T * C * 4 if split > 1 else 2 * T * C * e
        return Cost(flops, T * K * e + C * K * e + out, "triton_small")
    if n == "_shrink_finalize_kernel":
        T, C = a["T"], a["C"]
        return Cost(0.0, a["SPLIT_K"] * T * C * 4 + 2 * T * C * _elt(a["H"]), "stream")
    if n in ("_dual_gemm_kernel", "_dual_gemm_tma_kernel"):
        M, N, K1, K2 = a["M"], a["N"], a["K1"], a["K2"]
        if n == "_dual_gemm_kernel" and not a.get("HAS_TERM1", True):
            K1 = 0
        BM, BN, BK2 = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K2"]
        e = _elt(a["OUT"])
        tiles = math.ceil(M / BM) * math.ceil(N / BN)
        k2_pad = math.ceil(K2 / BK2) * BK2
        flops = 2.0 * tiles * BM * BN * (K1 + k2_pad)
        bytes_ = (M * K1 + N * K1 + M * K2 + N * K2 + M * N) * e
        if a.get("ACCUMULATE"):
            bytes_ += M * N * e
        slots = card.sms  # one 128x256 (or 128x128) tile per SM at a time: 1 CTA per SM at these tiles
        waves = tiles / (math.ceil(tiles / slots) * slots)
        kind = "triton_tma" if n == "_dual_gemm_tma_kernel" else "triton_pointer"
        if M <= 64:  # decode: narrow tiles streaming W, bandwidth-bound
            kind, waves = "triton_small", 1.0
        return Cost(flops, bytes_, kind, waves)
    if n == "_dhg_kernel":
        T, N = _shape(a["DY"])
        ge = launch.grid[0]  # expert blocks of one row block adjacent: dY read from DRAM once
        width = a["EXPERTS_PER_BLOCK"] * a["R_PAD"]
        e = _elt(a["DY"])
        C = _shape(a["H"])[1]
        return Cost(2.0 * T * N * ge * width, T * N * e + _nbytes(a["B"]) + 2 * T * C * e + T * a["E"] * 4,
                    "triton_small")
    if n == "_tn_gemm_kernel":
        T, I = _shape(a["P"])
        J = _shape(a["Q"])[1]
        gi, gj, split = launch.grid
        e = _elt(a["P"])
        p_reads = 1 if _fits_l2(T * I * e, card) else gj
        q_reads = 1 if _fits_l2(T * J * e, card) else gi
        flops = 2.0 * T * gi * a["BLOCK_I"] * gj * a["BLOCK_J"]
        return Cost(flops, p_reads * T * I * e + q_reads * T * J * e + split * I * J * 4, "triton_small")
    if n == "_grouped_pair_gemm_kernel":
        P, R = _shape(a["H"])
        L = a["L"]
        e = _elt(a["X"])
        return Cost(2.0 * P * L * a["R_PAD"], P * L * e + _nbytes(a["M"]) + 2 * P * R * e, "triton_small")
    if n == "_grouped_expand_kernel":
        P, R = _shape(a["X2"])
        T, N = _shape(a["OUT"])
        e = _elt(a["OUT"])
        return Cost(2.0 * T * a["R_PAD"] * N, T * R * e + _nbytes(a["M"]) + 2 * T * N * e, "triton_small")
    if n == "_grouped_wgrad_kernel":
        P_rows = _shape(a["Q"])[0] if a["MODE"] == 0 else _shape(a["P"])[0]
        I, J = a["I"], a["J"]
        e = _elt(a["P"])
        return Cost(2.0 * P_rows * I * J, _nbytes(a["P"]) + _nbytes(a["Q"]) + _nbytes(a["OUT"]), "triton_small")
    if n == "_topk_router_fwd_kernel":
        T, K = a["T"], a["K"]
        E = a["E"]
        return Cost(2.0 * T * K * E, T * K * _elt(a["X"]) + E * K * _elt(a["W"]) + T * E * 4, "triton_small")
    if n in ("_route_count_kernel", "_route_scatter_kernel"):  # read the indices, write counts or positions
        return Cost(0.0, a["P"] * (_elt(a["IDX"]) + 4) + launch.programs() * (a["G"] + 1) * 4, "stream")
    if n == "_route_scan_kernel":  # one program: the counts table, then the block table
        return Cost(0.0, a["NCHUNK"] * (a["G"] + 1) * 8 + a["MAXB"] * 8, "stream")
    if n == "_topk_router_bwd_kernel":
        return Cost(0.0, 4 * a["T"] * a["E"] * 4, "stream")
    raise KeyError(f"no cost function for Triton kernel {n}")


def launch_time_ms(cost: Cost, card: Card, dtype_bytes: int = 2) -> float:
    """Roofline time of one launch under ASSUMPTIONS (fp32 GEMMs run at half the 16-bit tensor peak: tf32)."""
    A = ASSUMPTIONS
    peak = card.bf16_tflops * 1e12 * (1.0 if dtype_bytes <= 2 else 0.5)
    bw = card.hbm_tbps * 1e12
    compute_eff, memory_eff, fixed = {
        "cublas": (A["cublas_compute_eff"], A["stream_memory_eff"], 0.0),
        "cublas_skinny": (A["cublas_skinny_compute_eff"], A["cublas_skinny_memory_eff"], 0.0),
        "stream": (1.0, A["stream_memory_eff"], 0.0),
        "triton_tma": (A["triton_tma_compute_eff"], A["triton_memory_eff"], A["triton_tma_fixed_ms"]),
        "triton_pointer": (A["triton_pointer_compute_eff"], A["triton_memory_eff"], 0.0),
        "triton_small": (A["cublas_skinny_compute_eff"], A["triton_memory_eff"], 0.0),
        "cuda_mma": (A["cuda_mma_compute_eff"], A["cuda_mma_memory_eff"], 0.0),
        "cuda_decode": (A["cuda_core_fp32_eff"], A["cuda_decode_memory_eff"], 0.0),
    }[cost.kind]
    if cost.kind == "cuda_decode":  # its dot products are fp32 FMAs on CUDA cores, not tensor-core MMAs
        peak = card.fp32_tflops * 1e12
    fixed += cost.grid_syncs * A["grid_sync_ms"]
    t = max(cost.flops / (peak * compute_eff), cost.bytes / (bw * memory_eff), cost.l2_bytes / (bw * A["l2_over_hbm"]))
    t *= 1e3
    return t / max(cost.waves, 1e-9) + fixed + A["gap_ms"]


def host_time_ms(launch: Launch, in_backward: bool) -> float:
    A = ASSUMPTIONS
    if launch.source == "triton":
        return A["host_triton_ms"]
    return A["host_backward_node_ms"] if in_backward else A["host_aten_ms"]


def timeline_ms(rows: list, autograd_backward: bool) -> tuple[float, float, float]:
    """(time per call, total GPU busy time, total host time) of launches issued in order, in a loop of calls (as a
    benchmark or a training loop runs them): the host's latency before the first kernel overlaps the previous
    call, so a call costs the longer of its GPU timeline from the first kernel on and its host time. rows: objects
    with .phase, .ms (GPU) and .host_ms. autograd_backward: the backward phase runs in autograd's engine (its fixed
    cost is paid once, when the first backward launch is issued)."""
    A = ASSUMPTIONS
    host = A["host_call_ms"]
    gpu_free = 0.0
    busy = 0.0
    first = None
    engine_started = False
    for row in rows:
        if row.phase == "bwd" and autograd_backward and not engine_started:
            host += A["host_backward_fixed_ms"]
            engine_started = True
        host += row.host_ms
        first = host if first is None else first
        gpu_free = max(gpu_free, host) + row.ms
        busy += row.ms
    return max(gpu_free - (first or 0.0), host), busy, host
