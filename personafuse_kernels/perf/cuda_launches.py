"""The kernels behind each op of the CUDA extension: grid, block, tile, FLOPs and DRAM bytes, for the cost model.

A dry run (perf/dryrun.py) records an extension op, not its kernel launches (those happen in C++); this module
expands one recorded op into the kernels its C++ launcher starts, with the launcher's own geometry. The constants
are csrc/'s, named after their C++ twins. tests/test_explain_cuda.py holds every formula here to the grids,
blocks and shared memory that the same launchers start in the CUDA emulator, so a change on one side fails until
the other follows.

    kernels(op_name, bound_args, num_sms) -> [CudaKernel, ...]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# csrc/include/pfk_mma.cuh MmaTile: 64-row tiles, 4 warps, k-steps of 32, 3 cp.async stages
MMA_BM, MMA_BK, MMA_THREADS, MMA_STAGES = 64, 32, 128, 3
PAIR_ARRAY_BYTES = 768  # pfk_topk.h PairArrays::kBytes
EXPAND_TILE_N = 64  # csrc/topk/expand_kernel.cu kTileN
WGRAD_A_TILE_N = 64  # csrc/topk/wgrad_kernel.cu: dA tiles are 64 wide whatever r
# csrc/lora/decode_kernel.cu and pfk_lora.h
DECODE_THREADS = 256
DECODE_BLOCKS_PER_SM = 2  # __launch_bounds__(kThreads, 2); the grid is sized from the occupancy query
DECODE_GROUP_ROWS = 16  # kDecodeGroupRows
DECODE_TOKENS_PER_PASS = 16  # kDecodeTokensPerPass
DECODE_STAGE_BYTES = 32768  # kDecodeStageBytes
DECODE_REDUCE_BYTES = 33792  # kDecodeReduceBytes
DECODE_SLICE_STEP = 256  # kDecodeSliceStep
DECODE_SLICE_MIN_WORK = 131072  # kDecodeSliceMinWork (T * K)
GATE_THREADS = 256  # csrc/gate/gate_kernels.cu kThreads
GATE_MAX_BLOCKS = 65535 * 8  # grid_for's cap


@dataclass
class CudaKernel:
    """One kernel launch of an extension op. kind: the cost model's efficiency class (perf/costs.py)."""
    name: str
    grid: int
    threads: int
    smem: int
    flops: float
    bytes: float
    kind: str
    config: dict = field(default_factory=dict)
    l2_bytes: float = 0.0  # operands re-read from L2 where the design makes it matter (the decode kernel)


def tile_width(r: int, min_width: int = 32) -> int:
    """dispatch_tile_width: the narrowest column tile of 32, 64 or 128, at least min_width, that holds r."""
    if min_width == 32 and r <= 32:
        return 32
    return 64 if r <= 64 else 128


def experts_per_tile(bn: int, r: int) -> int:
    return 1 if r >= bn else bn // r


def mma_smem(bn: int, elem: int) -> int:
    """MmaTile<BN>::union_bytes(elem): every pipeline stage of the A and B tiles, or the fp32 epilogue tile."""
    a = max(MMA_BM * (MMA_BK + 8), MMA_BK * (MMA_BM + 8))
    b = max(bn * (MMA_BK + 8), MMA_BK * (bn + 8))
    main = MMA_STAGES * (a + b) * elem
    epilogue = MMA_BM * (bn + 4) * 4
    return (max(main, epilogue) + 127) // 128 * 128


def decode_plan(T: int, K: int, C: int) -> tuple[int, int, int]:
    """plan_lora_decode: (k_chunk, c_chunk, shared memory bytes)."""
    tok = min(T, DECODE_TOKENS_PER_PASS)

    def chunk(length: int) -> int:
        fit = max(256, DECODE_STAGE_BYTES // (2 * tok) // 256 * 256)
        return min(fit, (length + 255) // 256 * 256)

    k_chunk, c_chunk = chunk(K), chunk(C)
    return k_chunk, c_chunk, max(DECODE_REDUCE_BYTES, 2 * tok * max(k_chunk, c_chunk))


def decode_cut(with_base: bool, T: int, N: int, K: int, C: int, max_blocks: int) -> tuple[int, int, int, int]:
    """decode_cut: (grid, K slices of phase 1, slice length, fp32 partial sums). Rows of [W; A_cat] cut evenly
    when there are enough of them for the grid or T K is small; else (16-row group, K slice) pairs, one per
    block."""
    rows = (N if with_base else 0) + C
    groups, phase2 = math.ceil(rows / DECODE_GROUP_ROWS), math.ceil(N / DECODE_GROUP_ROWS)
    slices = min(max_blocks // max(groups, 1), math.ceil(K / DECODE_SLICE_STEP))
    if slices < 2 or T * K < DECODE_SLICE_MIN_WORK:
        return min(max(1, groups, phase2), max_blocks), 1, K, 0
    length = math.ceil(math.ceil(K / slices) / DECODE_SLICE_STEP) * DECODE_SLICE_STEP
    slices = math.ceil(K / length)
    return min(max(groups * slices, phase2), max_blocks), slices, length, slices * T * rows


def gate_grid(n: int) -> int:
    return min(max(math.ceil(n / GATE_THREADS), 1), GATE_MAX_BLOCKS)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _decode(a: dict, num_sms: int, with_base: bool, blocks_per_sm: int) -> list[CudaKernel]:
    x, A, B = a["x"], a["lora_A"], a["lora_B"]
    T, K = x.shape
    E, r, _ = A.shape
    N, C, e = B.shape[1], E * r, x.element_size()
    k_chunk, c_chunk, smem = decode_plan(T, K, C)
    grid, slices, slice_len, partials = decode_cut(with_base, T, N, K, C, blocks_per_sm * num_sms)
    rows = (N if with_base else 0) + C
    # fp32 FMAs on CUDA cores, as issued: a block works on 16 rows at a time, 2 per warp; a warp holding one row
    # of its pair still issues both, a warp holding none skips the pass. The busiest block sets the time. Phase 1
    # dots T tokens with the rows of [W; A_cat] over K (or a K slice), phase 2 with B_cat's N rows over C.
    def issued(n_rows: int, blocks: int, length: int) -> float:
        per_block = math.ceil(n_rows / blocks)
        slots = per_block // DECODE_GROUP_ROWS * DECODE_GROUP_ROWS + math.ceil(per_block % DECODE_GROUP_ROWS / 2) * 2
        return 2.0 * blocks * slots * T * length

    phase1 = issued(rows, grid, K) if slices == 1 else 2.0 * math.ceil(rows / 2) * 2 * slices * T * slice_len
    flops = phase1 + issued(N, grid, C)
    weights = (N * K if with_base else 0) * e + _nbytes(A) + _nbytes(B) + _nbytes(a.get("bias"))
    # x read, y written (read too when accumulating), H and Hg written, Hg read back by phase 2, the gates, and
    # the slices' partial sums written and read back
    acts = _nbytes(x) + T * N * e * (1 if with_base else 2) + 3 * T * C * e + _nbytes(a["gates"]) + 2 * partials * 4
    # L2 re-reads: every block that takes rows stages all of x (rows cut evenly) or its slice of x (one per
    # (group, slice) pair); every block of phase 2 stages all of Hg; the partial sums go out and back
    groups = math.ceil(rows / DECODE_GROUP_ROWS)
    x_reads = min(grid, rows) * T * K * e if slices == 1 else groups * T * K * e
    l2 = x_reads + min(grid, N) * T * C * e + 2 * partials * 4
    return [CudaKernel("lora_decode_kernel", grid, DECODE_THREADS, smem, flops, weights + acts, "cuda_decode",
                       {"k_chunk": k_chunk, "c_chunk": c_chunk, "slices": slices, "slice_len": slice_len,
                        "grid_syncs": 2 if slices > 1 else 1, "cooperative": True}, l2)]


def _sequence_sum(T: int, E: int, seq_len: int) -> list[CudaKernel]:
    """launch_sequence_sum: per-token gate gradients [T, E] summed per sequence, one block per (sequence, expert)."""
    if seq_len == 1 or T * E == 0:
        return []
    return [CudaKernel("sequence_sum_kernel", T // seq_len * E, GATE_THREADS, 0, 0.0, T * E * 4 + T // seq_len * E * 4,
                       "stream")]


def _dense_mma(name: str, T: int, L: int, E: int, r: int, e: int, read: float, write: float) -> CudaKernel:
    """lora_shrink / lora_dhg: 64-row tiles of T by column tiles of whole experts (the tiles of one row block
    adjacent in launch order, so the [T, L] operand is read from DRAM once)."""
    bn = tile_width(r, 64)
    ept = experts_per_tile(bn, r)
    grid = math.ceil(T / MMA_BM) * math.ceil(E / ept)
    return CudaKernel(name, grid, MMA_THREADS, mma_smem(bn, e), 2.0 * grid * MMA_BM * bn * L, read + write,
                      "cuda_mma", {"BM": MMA_BM, "BN": bn, "experts_per_tile": ept})


def kernels(op: str, a: dict, num_sms: int, decode_blocks_per_sm: int = DECODE_BLOCKS_PER_SM) -> list[CudaKernel]:
    """The kernels extension op `op` launches for bound arguments `a` (schema name -> value), on num_sms SMs.
    decode_blocks_per_sm: the decode kernel's occupancy (the device's answer; 2 on a GPU by its launch bounds)."""
    if op == "lora_decode_linear":
        return _decode(a, num_sms, True, decode_blocks_per_sm)
    if op == "lora_decode_":
        return _decode(a, num_sms, False, decode_blocks_per_sm)
    if op == "lora_shrink":
        x, A = a["x"], a["lora_A"]
        (T, K), (E, r, _), e = x.shape, A.shape, x.element_size()
        return [_dense_mma("lora_shrink_kernel", T, K, E, r, e, _nbytes(x) + _nbytes(A) + _nbytes(a["gates"]),
                           2 * T * E * r * e)]
    if op == "lora_dhg":
        dy, B, H = a["dy"], a["lora_B"], a["H"]
        (T, N), (E, _, r), e = dy.shape, B.shape, dy.element_size()
        return [_dense_mma("lora_dhg_kernel", T, N, E, r, e, _nbytes(dy) + _nbytes(B) + _nbytes(H),
                           _nbytes(H) + T * E * 4)] + _sequence_sum(T, E, a["seq_len"])
    if op == "gate_forward":
        H = a["H"]
        return [CudaKernel("gate_forward_kernel", gate_grid(H.numel()), GATE_THREADS, 0, 0.0,
                           2 * _nbytes(H) + _nbytes(a["gates"]), "stream")]
    if op == "gate_backward":  # one thread per (token, expert): dH over its r columns and the gate's gradient
        H, gates = a["H"], a["gates"]
        T, E = H.shape[0], gates.shape[1]
        return [CudaKernel("gate_backward_kernel", gate_grid(T * E), GATE_THREADS, 0, 0.0,
                           3 * _nbytes(H) + _nbytes(gates) + T * E * 4, "stream")] + _sequence_sum(T, E, a["seq_len"])
    if op in ("topk_pair_shrink", "topk_pair_dhg"):
        shrink = op == "topk_pair_shrink"
        X, M = (a["x"], a["lora_A"]) if shrink else (a["dy"], a["lora_B"])
        T, L = X.shape
        r = M.shape[1] if shrink else M.shape[2]
        P, e, bn = T * a["k"], X.element_size(), tile_width(r)
        grid = a["block_group"].numel()
        if grid == 0:
            return []
        # each pair gathers its token's row: P rows of X; H and Hg (shrink) or H read and dH written (dHg)
        bytes_ = P * L * e + _nbytes(M) + 2 * P * r * e + P * 4 + (0 if shrink else P * 4)
        return [CudaKernel("topk_pair_gemm_kernel", grid, MMA_THREADS, mma_smem(bn, e) + PAIR_ARRAY_BYTES,
                           2.0 * grid * MMA_BM * bn * L, bytes_, "cuda_mma",
                           {"BM": MMA_BM, "BN": bn, "mode": "shrink" if shrink else "dhg"})]
    if op in ("topk_expand_y_", "topk_expand_dx_"):
        # one launch per slot (no two pairs of one launch write the same row: no atomics); each launch's blocks of
        # the other slots' groups exit at once
        out, X2, M = (a["y"], a["Hg"], a["lora_B"]) if op == "topk_expand_y_" else (a["dx"], a["dH"], a["lora_A"])
        T, n_out = out.shape
        r, e, k = X2.shape[1], out.element_size(), a["k"]
        grid = a["block_group"].numel() * math.ceil(n_out / EXPAND_TILE_N)
        if grid == 0 or n_out == 0:
            return []
        r_pad = math.ceil(r / MMA_BK) * MMA_BK
        flops = 2.0 * grid * MMA_BM * EXPAND_TILE_N * r_pad / k
        kernel = CudaKernel("topk_expand_kernel", grid, MMA_THREADS, mma_smem(EXPAND_TILE_N, e) + PAIR_ARRAY_BYTES,
                            flops, _nbytes(X2) / k + _nbytes(M) + 2 * T * n_out * e, "cuda_mma",
                            {"BM": MMA_BM, "BN": EXPAND_TILE_N, "mode": "y" if op == "topk_expand_y_" else "dx"})
        return [kernel] * k
    if op in ("topk_wgrad_B", "topk_wgrad_A"):
        wgrad_b = op == "topk_wgrad_B"
        tokens, pairs = (a["dy"], a["H"]) if wgrad_b else (a["x"], a["dH"])
        E, width, r, e = a["num_experts"], tokens.shape[1], pairs.shape[1], tokens.element_size()
        P = pairs.shape[0]
        if E == 0 or width == 0:
            return []
        I, J = (width, r) if wgrad_b else (r, width)
        bn = tile_width(r) if wgrad_b else WGRAD_A_TILE_N
        tiles = math.ceil(I / MMA_BM) * math.ceil(J / bn)
        # each expert's tiles reduce over its own pairs: sum over experts = P pair rows per output tile position
        flops = 2.0 * P * math.ceil(I / MMA_BM) * MMA_BM * math.ceil(J / bn) * bn
        return [CudaKernel("topk_wgrad_kernel", E * tiles, MMA_THREADS, mma_smem(bn, e) + MMA_STAGES * PAIR_ARRAY_BYTES,
                           flops, P * width * e + _nbytes(pairs) + E * width * r * e, "cuda_mma",
                           {"BM": MMA_BM, "BN": bn, "mode": "B" if wgrad_b else "A"})]
    raise KeyError(f"no launch description for extension op {op}")
