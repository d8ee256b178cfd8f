"""Triton kernels of the routed LoRA op (launchers and orchestration: routed_lora_triton.py).

Names follow docs/design.md: T tokens, K in-features, N out-features, E experts of rank r, C = E * r.
A_cat = lora_A viewed [C, K]; B_cat[n, c] = lora_B[c // r, n, c % r] (never materialized: kernels index
lora_B's [E, N, r] layout directly with the strides s_e, s_j of the expert and rank dims).
Gates are normalized: gates [G, E] float32 with token t on row t // seq_len, or on row SEQ_ID[t] (packed
sequences: HAS_SEQ_ID, SEQ_ID [T] int32 from cu_seqlens). All accumulation is fp32.

    _shrink_kernel       H = drop(x) A_cat^T; epilogue Hg = H * s_e g[t, e]   (or split-K fp32 partials)
    _shrink_finalize     sums split-K partials, same epilogue                  (small T, decode)
    _dual_gemm_kernel    out = X1 M1 + [drop'](X2 M2) (+ bias) (+ out)         forward y and backward dx
    _dhg_kernel          dHg = dY B_cat; epilogue dg[t, e] = s_e <dHg, H>_r and dH = dHg * s_e g
    _tn_gemm_kernel      out = P^T Q over T, split over T (fp32 partials or atomics); Q may be drop(x) or Hg
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b. UPCAST (interpreter only, never on a GPU): Triton's interpreter multiplies the raw bits
    of bfloat16 dot operands (triton-lang/triton#11584, unsupported there), so it gets float32 operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _dropout_keep(seed, offsets, dropout_p):
    """Same mask as ops/dropout.py: keep where philox_uniform(seed, offset) >= p."""
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _gate_rows(offs_t, T, SEQ_LEN, SEQ_ID, HAS_SEQ_ID: tl.constexpr):
    """The gate row of each token: t // seq_len, or SEQ_ID[t] for packed sequences."""
    if HAS_SEQ_ID:
        return tl.load(SEQ_ID + offs_t, mask=offs_t < T, other=0)
    return offs_t // SEQ_LEN


@triton.jit
def _lora_width(K2, offs_m, M, GATES, SEQ_ID, SEQ_LEN, E, SKIP_IDLE: tl.constexpr, HAS_SEQ_ID: tl.constexpr,
                E_PAD: tl.constexpr):
    """K2, or 0 when every gate of this tile's rows is zero (SKIP_IDLE): a row tile of requests without an adapter
    skips the LoRA segment of the dual GEMM (as a loop bound, so the pipelined loop stays as it is)."""
    if SKIP_IDLE:
        rows = _gate_rows(offs_m, M, SEQ_LEN, SEQ_ID, HAS_SEQ_ID)
        e = tl.arange(0, E_PAD)
        g = tl.load(GATES + rows[:, None] * E + e[None, :], mask=(offs_m < M)[:, None] & (e < E)[None, :],
                    other=0.0)
        return tl.where(tl.max(tl.max(tl.abs(g), axis=1), axis=0) > 0, K2, 0)
    return K2


@triton.jit
def _gate_epilogue(acc, offs_m, offs_c, GATES, SCALING, H, HG, T, C, R, E, SEQ_LEN, SEQ_ID, stride_h,
                   HAS_SEQ_ID: tl.constexpr):
    """Round acc [BM, BC] to H's dtype, store H, and store Hg = H * s_e * g[row(t), e], e = c // r."""
    mask = (offs_m[:, None] < T) & (offs_c[None, :] < C)
    h = acc.to(H.dtype.element_ty)
    tl.store(H + offs_m[:, None] * stride_h + offs_c[None, :], h, mask=mask)
    e = offs_c // R
    rows = _gate_rows(offs_m, T, SEQ_LEN, SEQ_ID, HAS_SEQ_ID)
    g = tl.load(GATES + rows[:, None] * E + e[None, :], mask=mask, other=0.0)
    s = tl.load(SCALING + e, mask=offs_c < C, other=0.0)
    hg = h.to(tl.float32) * (g * s[None, :])
    tl.store(HG + offs_m[:, None] * stride_h + offs_c[None, :], hg.to(HG.dtype.element_ty), mask=mask)


@triton.jit
def _shrink_kernel(
    X, A, GATES, SCALING, SEED, H, HG, PARTIAL, SEQ_ID,
    T, K, C, R, E, SEQ_LEN,
    dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, HAS_SEQ_ID: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """H[t, c] = sum_k drop(x)[t, k] A_cat[c, k]. x [T, K], A_cat [C, K] contiguous; H, Hg [T, C]."""
    # the C tiles of one row block are adjacent in launch order (axis 0), so they run together and x's rows are
    # read from DRAM once, then from L2
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_chunk
    k_end = tl.minimum(k_begin + k_chunk, K)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    # With dropout the masked x tile is made in registers. As wgmma's A operand (read from registers) ptxas
    # serializes the wgmma pipeline (C7515, sm_90a, Triton 3.6), so it goes in as the B operand, which is staged
    # through shared memory: acc^T [BC, BM] = A_cat drop(x)^T, transposed once after the loop.
    if HAS_DROPOUT:
        acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < T) & (offs_k[None, :] < k_end)
        x = tl.load(X + offs_m[:, None] * K + offs_k[None, :], mask=x_mask, other=0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offs_m[:, None].to(tl.int64) * K + offs_k[None, :], dropout_p)
            x = tl.where(keep, x * dropout_scale, 0.0).to(X.dtype.element_ty)
            a = tl.load(A + offs_c[:, None] * K + offs_k[None, :],
                        mask=(offs_c[:, None] < C) & (offs_k[None, :] < k_end), other=0.0)  # [BC, BK]
            acc = _mma(a, tl.trans(x), acc, DOT_PRECISION, UPCAST)
        else:
            a = tl.load(A + offs_c[None, :] * K + offs_k[:, None],
                        mask=(offs_c[None, :] < C) & (offs_k[:, None] < k_end), other=0.0)  # [BK, BC]
            acc = _mma(x, a, acc, DOT_PRECISION, UPCAST)
    if HAS_DROPOUT:
        acc = tl.trans(acc)
    if SPLIT_K == 1:
        _gate_epilogue(acc, offs_m, offs_c, GATES, SCALING, H, HG, T, C, R, E, SEQ_LEN, SEQ_ID, C, HAS_SEQ_ID)
    else:
        mask = (offs_m[:, None] < T) & (offs_c[None, :] < C)
        tl.store(PARTIAL + pid_k * T * C + offs_m[:, None] * C + offs_c[None, :], acc, mask=mask)


@triton.jit
def _shrink_finalize_kernel(
    PARTIAL, GATES, SCALING, H, HG, SEQ_ID, T, C, R, E, SEQ_LEN,
    HAS_SEQ_ID: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the split-K partials [SPLIT_K, T, C] in a fixed order (deterministic), then the gate epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m[:, None] < T) & (offs_c[None, :] < C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(PARTIAL + s * T * C + offs_m[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
    _gate_epilogue(acc, offs_m, offs_c, GATES, SCALING, H, HG, T, C, R, E, SEQ_LEN, SEQ_ID, C, HAS_SEQ_ID)


@triton.jit
def _dual_gemm_kernel(
    X1, M1, X2, M2, BIAS, OUT, SEED, GATES, SEQ_ID,
    M, N, K1, K2, R, E, SEQ_LEN,
    s_x1m, s_x1k, s_m1k, s_m1n,
    s_x2m, s_x2k, s_m2e, s_m2j, s_m2n,
    s_om, s_on,
    dropout_p, dropout_scale,
    HAS_TERM1: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, DROPOUT_TERM2: tl.constexpr,
    SKIP_IDLE: tl.constexpr, HAS_SEQ_ID: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[m, n] = sum_k X1[m, k] M1[k, n] + d(m, n) * sum_c X2[m, c] M2[c, n] (+ bias[n]) (+ out[m, n]).

    One K-loop over K2 = E * r, then one over K1, into one accumulator; no concatenation in memory. M2's row c sits at
    (c // R) * s_m2e + (c % R) * s_m2j: lora_B [E, N, r] (forward, as B_cat^T) or lora_A [E, r, K] (dx).
    d(m, n) = keep(m * N + n) / (1 - p) when DROPOUT_TERM2 (dx = dY W + drop'(dH A_cat)), else 1.
    SKIP_IDLE: a row tile whose gates (GATES [G, E], rows as _gate_rows) are all zero skips the K2 segment.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n  # grouped tile order: GROUP_M row blocks share each column block in L2
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N

    # One fp32 accumulator for both terms (two would double the registers of a tile): the X2 M2 segment first,
    # so that drop' can scale it while it is alone in the accumulator, then X1 M1 added into the same registers.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k2_end = _lora_width(K2, offs_m, M, GATES, SEQ_ID, SEQ_LEN, E, SKIP_IDLE, HAS_SEQ_ID, E_PAD)
    for c0 in range(0, k2_end, BLOCK_K2):
        offs_c = c0 + tl.arange(0, BLOCK_K2)
        c_ok = offs_c < K2
        h = tl.load(X2 + offs_m[:, None] * s_x2m + offs_c[None, :] * s_x2k,
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        row = (offs_c // R) * s_m2e + (offs_c % R) * s_m2j
        b = tl.load(M2 + row[:, None] + offs_n[None, :] * s_m2n, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(h, b, acc, DOT_PRECISION, UPCAST)
    if DROPOUT_TERM2:
        keep = _dropout_keep(tl.load(SEED), offs_m[:, None].to(tl.int64) * N + offs_n[None, :], dropout_p)
        acc = tl.where(keep, acc * dropout_scale, 0.0)
    if HAS_TERM1:
        for k0 in range(0, K1, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K1
            x = tl.load(X1 + offs_m[:, None] * s_x1m + offs_k[None, :] * s_x1k,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(M1 + offs_k[:, None] * s_m1k + offs_n[None, :] * s_m1n,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(x, w, acc, DOT_PRECISION, UPCAST)

    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = OUT + offs_m[:, None] * s_om + offs_n[None, :] * s_on
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _dhg_kernel(
    DY, B, H, GATES, SCALING, DH, DG, SEQ_ID,
    T, N, R, E, SEQ_LEN,
    s_be, s_bn, s_bj,
    HAS_SEQ_ID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXPERTS_PER_BLOCK: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dHg = dY B_cat [T, C] for a block of experts, with the gate backward in the epilogue:
        dg_tok[t, e] = s_e * sum_j dHg[t, e*r + j] * H[t, e*r + j]      -> DG [T, E] fp32
        dH[t, c]     = dHg[t, c] * s_e * g[t // seq_len, e]            -> DH [T, C]
    Columns are laid out as EXPERTS_PER_BLOCK experts x R_PAD (r rounded up to a power of two), so the
    per-expert reduction is a reshape and a sum inside the tile, for any r.
    """
    pid_e = tl.program_id(0)  # expert blocks of one row block adjacent: dY's rows read from DRAM once
    pid_m = tl.program_id(1)
    BLOCK_C: tl.constexpr = EXPERTS_PER_BLOCK * R_PAD
    C = E * R
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lane = tl.arange(0, BLOCK_C)
    e_col = pid_e * EXPERTS_PER_BLOCK + lane // R_PAD
    j_col = lane % R_PAD
    c_ok = (j_col < R) & (e_col < E)
    offs_c = e_col * R + j_col
    m_ok = offs_m < T

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(DY + offs_m[:, None] * N + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(B + e_col[None, :] * s_be + offs_n[:, None] * s_bn + j_col[None, :] * s_bj,
                    mask=n_ok[:, None] & c_ok[None, :], other=0.0)  # [BN, BC] = B_cat^T tile
        acc = _mma(dy, b, acc, DOT_PRECISION, UPCAST)

    mask = m_ok[:, None] & c_ok[None, :]
    h = tl.load(H + offs_m[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    s_col = tl.load(SCALING + e_col, mask=c_ok, other=0.0)
    rows = _gate_rows(offs_m, T, SEQ_LEN, SEQ_ID, HAS_SEQ_ID)
    g_col = tl.load(GATES + rows[:, None] * E + e_col[None, :], mask=mask, other=0.0)
    tl.store(DH + offs_m[:, None] * C + offs_c[None, :], (acc * (g_col * s_col[None, :])).to(DH.dtype.element_ty),
             mask=mask)
    dot_r = tl.sum(tl.reshape(acc * h, (BLOCK_M, EXPERTS_PER_BLOCK, R_PAD)), axis=2)  # [BM, EB]
    e_blk = pid_e * EXPERTS_PER_BLOCK + tl.arange(0, EXPERTS_PER_BLOCK)
    e_ok = e_blk < E
    s_blk = tl.load(SCALING + e_blk, mask=e_ok, other=0.0)
    tl.store(DG + offs_m[:, None] * E + e_blk[None, :], dot_r * s_blk[None, :], mask=m_ok[:, None] & e_ok[None, :])


# What q is in _tn_gemm_kernel, the second operand of a weight gradient; the launchers wgrad_A and wgrad_B of
# routed_lora_triton.py pick them, so no caller passes a bare number.
Q_PLAIN = tl.constexpr(0)  # q = Q[t, j]                                  dA without dropout
Q_DROPOUT = tl.constexpr(1)  # q = drop(Q)[t, j], mask from the seed       dA with dropout
Q_GATED = tl.constexpr(2)  # q = Q[t, j] * s_e g[t // seq_len, e]          dB: Hg rebuilt from H on load


@triton.jit
def _tn_gemm_kernel(
    P, Q, GATES, SCALING, SEED, OUT, SEQ_ID,
    T, I, J, R, E, SEQ_LEN,
    s_pt, s_pi, s_qt, s_qj, s_os, s_oi, s_oj,
    dropout_p, dropout_scale,
    Q_MODE: tl.constexpr, HAS_SEQ_ID: tl.constexpr, ATOMIC: tl.constexpr, SPLIT_T: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[i, j] = sum_t P[t, i] * q(t, j), the weight gradients (reductions over tokens):
        dA_cat [C, K] = dH^T drop(x)   Q_MODE = Q_DROPOUT: q = drop(x)[t, j] (mask regenerated from the seed),
                                       or Q_PLAIN without dropout
        dB_cat [N, C] = dY^T Hg        Q_MODE = Q_GATED: q = H[t, j] * s_e g[t // seq_len, e], e = j // r
    Split over T into SPLIT_T chunks: each writes fp32 partials OUT[split] (summed in a fixed order by the
    launcher: deterministic), or, with ATOMIC, adds into one fp32 buffer (faster, order not fixed).
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = offs_i < I
    j_ok = offs_j < J
    t_chunk = tl.cdiv(tl.cdiv(T, BLOCK_T), SPLIT_T) * BLOCK_T
    t_begin = pid_s * t_chunk
    t_end = tl.minimum(t_begin + t_chunk, T)
    if Q_MODE == Q_DROPOUT:
        seed = tl.load(SEED)
    if Q_MODE == Q_GATED:
        e_j = offs_j // R
        s_j = tl.load(SCALING + e_j, mask=j_ok, other=0.0)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        p = tl.load(P + offs_t[:, None] * s_pt + offs_i[None, :] * s_pi, mask=t_ok[:, None] & i_ok[None, :],
                    other=0.0)  # [BT, BI]
        q_mask = t_ok[:, None] & j_ok[None, :]
        q = tl.load(Q + offs_t[:, None] * s_qt + offs_j[None, :] * s_qj, mask=q_mask, other=0.0)  # [BT, BJ]
        if Q_MODE == Q_DROPOUT:
            keep = _dropout_keep(seed, offs_t[:, None].to(tl.int64) * J + offs_j[None, :], dropout_p)
            q = tl.where(keep, q * dropout_scale, 0.0).to(Q.dtype.element_ty)
        if Q_MODE == Q_GATED:
            rows = _gate_rows(offs_t, T, SEQ_LEN, SEQ_ID, HAS_SEQ_ID)
            g = tl.load(GATES + rows[:, None] * E + e_j[None, :], mask=q_mask, other=0.0)
            q = (q.to(tl.float32) * (g * s_j[None, :])).to(Q.dtype.element_ty)
        acc = _mma(tl.trans(p), q, acc, DOT_PRECISION, UPCAST)
    out_ptrs = OUT + offs_i[:, None] * s_oi + offs_j[None, :] * s_oj
    mask = i_ok[:, None] & j_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs + pid_s * s_os, acc, mask=mask)


@triton.jit
def _tma_mma_loop(acc, a_desc, b_desc, off_m, off_n, K, BLOCK_K: tl.constexpr, B_TRANS: tl.constexpr,
                  NUM_STAGES: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr):
    """acc += A[off_m:, :K] op(B) for one output tile, pipelined over K in BLOCK_K steps through TMA descriptors:
    op(B) = B^T read from B [N, K] when B_TRANS, else B [K, N]. Both segments of the dual GEMM run through it."""
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES, warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([off_m, k0])
        if B_TRANS:
            b = b_desc.load([off_n, k0]).T
        else:
            b = b_desc.load([k0, off_n])
        acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _dual_gemm_tma_kernel(
    X1, M1, X2, M2, BIAS, OUT, SEED, GATES, SEQ_ID,
    M, N, K1, K2, E, SEQ_LEN,
    dropout_p, dropout_scale,
    M_TRANS: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT_TERM2: tl.constexpr,
    SKIP_IDLE: tl.constexpr, HAS_SEQ_ID: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, NUM_STAGES: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Hopper version of _dual_gemm_kernel: persistent (one program per SM walking tiles in grouped order) with
    TMA tensor descriptors. Same math; every operand is a dense row-major matrix:
        M_TRANS:     out = X1 M1^T + X2 M2^T   M1 [N, K1] (= W), M2 [N, K2] (= B_cat)     forward y
        not M_TRANS: out = X1 M1 + d*(X2 M2)   M1 [K1, N] (= W), M2 [K2, N] (= A_cat)     backward dx
    Descriptors zero-fill out-of-bounds rows and columns, so no masks; strides must be 16-byte aligned
    (the launcher checks). The H200 calibration of this structure (docs/cost-model.md): 1.03-1.17x the cuBLAS base.
    """
    x1_desc = tl.make_tensor_descriptor(X1, shape=[M, K1], strides=[K1, 1], block_shape=[BLOCK_M, BLOCK_K])
    x2_desc = tl.make_tensor_descriptor(X2, shape=[M, K2], strides=[K2, 1], block_shape=[BLOCK_M, BLOCK_K2])
    if M_TRANS:
        m1_desc = tl.make_tensor_descriptor(M1, shape=[N, K1], strides=[K1, 1], block_shape=[BLOCK_N, BLOCK_K])
        m2_desc = tl.make_tensor_descriptor(M2, shape=[N, K2], strides=[K2, 1], block_shape=[BLOCK_N, BLOCK_K2])
    else:
        m1_desc = tl.make_tensor_descriptor(M1, shape=[K1, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])
        m2_desc = tl.make_tensor_descriptor(M2, shape=[K2, N], strides=[N, 1], block_shape=[BLOCK_K2, BLOCK_N])
    out_desc = tl.make_tensor_descriptor(OUT, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    if DROPOUT_TERM2:
        seed = tl.load(SEED)

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        first_m = (tile // group) * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        off_m = (first_m + (tile % group) % group_size) * BLOCK_M
        off_n = ((tile % group) // group_size) * BLOCK_N

        # one accumulator, the LoRA segment first (see _dual_gemm_kernel): two would spill at 128x256 on sm_90a
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k2_end = _lora_width(K2, off_m + tl.arange(0, BLOCK_M), M, GATES, SEQ_ID, SEQ_LEN, E, SKIP_IDLE, HAS_SEQ_ID,
                             E_PAD)
        acc = _tma_mma_loop(acc, x2_desc, m2_desc, off_m, off_n, k2_end, BLOCK_K2, M_TRANS, NUM_STAGES,
                            WARP_SPECIALIZE, DOT_PRECISION, UPCAST)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        if DROPOUT_TERM2:
            offs_m = off_m + tl.arange(0, BLOCK_M)
            keep = _dropout_keep(seed, offs_m[:, None].to(tl.int64) * N + offs_n[None, :], dropout_p)
            acc = tl.where(keep, acc * dropout_scale, 0.0)
        acc = _tma_mma_loop(acc, x1_desc, m1_desc, off_m, off_n, K1, BLOCK_K, M_TRANS, NUM_STAGES, WARP_SPECIALIZE,
                            DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], acc.to(OUT.dtype.element_ty))
