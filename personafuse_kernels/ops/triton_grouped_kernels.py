"""Triton kernels of top-k routed LoRA (launchers: routed_lora_topk_triton.py; reference:
routed_lora_topk_torch.py). Pairs p = t * k + s; RoutingMeta (routing/topk.py) lists blocks of BLOCK_M pairs
that share one expert e and one slot s. Every program of the first two kernels takes one block: it gathers
its tokens' rows on load and uses expert e's weights, so only the k chosen experts of each token are computed.

    _grouped_pair_gemm_kernel   per pair: acc = X[tok] M_e over the long dim (K or N), r outputs
        EPILOGUE = EPI_SHRINK (forward):   H = acc, Hg = H * w_p * s_e                   -> [P, r] each
        EPILOGUE = EPI_DHG (backward):     dw_p = s_e <acc, H_p>, dH = acc * w_p * s_e   -> [P], [P, r]
    _grouped_expand_kernel      out[tok] += d * (X2[p] M_e) for the pairs of one slot: each token appears once
                                per slot, so rows never collide (no atomics; k launches); y and dx
    _grouped_wgrad_kernel       per expert, over its contiguous pairs: dB_e = dY[tok]^T Hg, dA_e = dH^T drop(x)[tok]
                                (split over pairs with fp32 partials summed in a fixed order: deterministic)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _dropout_keep, _mma

# The epilogue of _grouped_pair_gemm_kernel and the gradient _grouped_wgrad_kernel computes, named; the launchers
# (pair_shrink / pair_dhg, expert_wgrad_B / expert_wgrad_A in routed_lora_topk_triton.py) pick them.
EPI_SHRINK = tl.constexpr(0)
EPI_DHG = tl.constexpr(1)
WGRAD_B = tl.constexpr(0)  # dB_e [N, r]
WGRAD_A = tl.constexpr(1)  # dA_e [r, K]


@triton.jit
def _block_rows(j, BLOCK_GROUP, BLOCK_START, GROUP_START, SORTED_PAIRS, K_SLOTS, BLOCK_M: tl.constexpr):
    """(group, positions, valid mask, pair ids, token ids) of block j; group < 0 for an empty block."""
    g = tl.load(BLOCK_GROUP + j)
    g_safe = tl.maximum(g, 0)
    start = tl.load(BLOCK_START + j)
    end = tl.load(GROUP_START + g_safe + 1)
    pos = start + tl.arange(0, BLOCK_M)
    ok = (pos < end) & (g >= 0)
    pair = tl.load(SORTED_PAIRS + pos, mask=ok, other=0)
    return g, ok, pair, pair // K_SLOTS


@triton.jit
def _grouped_pair_gemm_kernel(
    X, M, W_PAIR, SCALING, SEED, H, OUT, DW,
    BLOCK_GROUP, BLOCK_START, GROUP_START, SORTED_PAIRS,
    L, R, K_SLOTS, s_me, s_ml, s_mj,
    dropout_p, dropout_scale,
    EPILOGUE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """acc[p, j] = sum_l X[tok_p, l] * M[e, l, j] (X [T, L] row-major; M element (e, l, j) at
    e*s_me + l*s_ml + j*s_mj), then the epilogue. H, OUT [P, R]; W_PAIR, DW [P] fp32; SCALING [E] fp32."""
    g, ok, pair, tok = _block_rows(tl.program_id(0), BLOCK_GROUP, BLOCK_START, GROUP_START, SORTED_PAIRS, K_SLOTS,
                                   BLOCK_M)
    if g < 0:
        return
    e = g // K_SLOTS
    cols = tl.arange(0, R_PAD)
    c_ok = cols < R
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    # dropout: the masked x tile goes in as the B operand (see triton_kernels._shrink_kernel): acc^T = M_e^T drop(x)^T
    if HAS_DROPOUT:
        acc = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        x = tl.load(X + tok[:, None].to(tl.int64) * L + offs_l[None, :], mask=ok[:, None] & l_ok[None, :], other=0.0)
        if HAS_DROPOUT:  # the same mask as the dense path: element (t, k) of x, offset t * K + k
            keep = _dropout_keep(seed, tok[:, None].to(tl.int64) * L + offs_l[None, :], dropout_p)
            x = tl.where(keep, x * dropout_scale, 0.0).to(X.dtype.element_ty)
            m_t = tl.load(M + e * s_me + offs_l[None, :] * s_ml + cols[:, None] * s_mj,
                          mask=l_ok[None, :] & c_ok[:, None], other=0.0)  # [R_PAD, BLOCK_L]
            acc = _mma(m_t, tl.trans(x), acc, DOT_PRECISION, UPCAST)
        else:
            m = tl.load(M + e * s_me + offs_l[:, None] * s_ml + cols[None, :] * s_mj,
                        mask=l_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_L, R_PAD]
            acc = _mma(x, m, acc, DOT_PRECISION, UPCAST)
    if HAS_DROPOUT:
        acc = tl.trans(acc)
    mask = ok[:, None] & c_ok[None, :]
    ptrs = pair[:, None].to(tl.int64) * R + cols[None, :]
    coef = tl.load(W_PAIR + pair, mask=ok, other=0.0) * tl.load(SCALING + e)  # w_p * s_e
    if EPILOGUE == EPI_SHRINK:
        h = acc.to(H.dtype.element_ty)
        tl.store(H + ptrs, h, mask=mask)
        tl.store(OUT + ptrs, (h.to(tl.float32) * coef[:, None]).to(OUT.dtype.element_ty), mask=mask)
    else:
        h = tl.load(H + ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DW + pair, tl.sum(acc * h, axis=1) * tl.load(SCALING + e), mask=ok)
        tl.store(OUT + ptrs, (acc * coef[:, None]).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_expand_kernel(
    X2, M, OUT, SEED,
    BLOCK_GROUP, BLOCK_START, GROUP_START, SORTED_PAIRS,
    N, R, K_SLOTS, SLOT, s_me, s_mj, s_mn,
    dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """OUT[tok_p, n] += d(tok_p, n) * sum_j X2[p, j] * M[e, j, n] for the pairs of slot SLOT only.
    X2 [P, R]; OUT [T, N] row-major; d = keep / (1 - p) with HAS_DROPOUT (dx), else 1 (y)."""
    g, ok, pair, tok = _block_rows(tl.program_id(0), BLOCK_GROUP, BLOCK_START, GROUP_START, SORTED_PAIRS, K_SLOTS,
                                   BLOCK_M)
    if (g < 0) | (g % K_SLOTS != SLOT):
        return
    e = g // K_SLOTS
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    cols = tl.arange(0, R_PAD)
    c_ok = cols < R
    h = tl.load(X2 + pair[:, None].to(tl.int64) * R + cols[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
    m = tl.load(M + e * s_me + cols[:, None] * s_mj + offs_n[None, :] * s_mn, mask=c_ok[:, None] & n_ok[None, :],
                other=0.0)  # [R_PAD, BLOCK_N]
    acc = _mma(h, m, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, UPCAST)
    out_off = tok[:, None].to(tl.int64) * N + offs_n[None, :]
    if HAS_DROPOUT:
        acc = tl.where(_dropout_keep(tl.load(SEED), out_off, dropout_p), acc * dropout_scale, 0.0)
    mask = ok[:, None] & n_ok[None, :]
    prev = tl.load(OUT + out_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + out_off, (prev + acc).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    P, Q, W_PAIR, SCALING, SEED, OUT, GROUP_START, SORTED_PAIRS,
    I, J, R, K_SLOTS, s_os, s_oe, s_oi, s_oj,
    dropout_p, dropout_scale,
    MODE: tl.constexpr, HAS_DROPOUT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """OUT[split, e, i, j] = sum over expert e's pairs p (a SPLIT-th of them) of P_p[i] * Q_p[j]:
        MODE = WGRAD_B (dB_e, [N, r]):  P_p = dY[tok_p] (I = N),  Q_p = H[p] * w_p * s_e (J = r)
        MODE = WGRAD_A (dA_e, [r, K]):  P_p = dH[p] (I = r),      Q_p = drop(x)[tok_p] (J = K; HAS_DROPOUT masks)
    """
    e = tl.program_id(0)
    num_j = tl.cdiv(J, BLOCK_J)
    pid_i = tl.program_id(1) // num_j
    pid_j = tl.program_id(1) % num_j
    split = tl.program_id(2)
    begin = tl.load(GROUP_START + e * K_SLOTS)
    end = tl.load(GROUP_START + e * K_SLOTS + K_SLOTS)
    chunk = tl.cdiv(tl.cdiv(end - begin, BLOCK_T), SPLIT) * BLOCK_T
    lo = begin + split * chunk
    hi = tl.minimum(lo + chunk, end)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = offs_i < I
    j_ok = offs_j < J
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    s_e = tl.load(SCALING + e)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        t_ok = pos < hi
        pair = tl.load(SORTED_PAIRS + pos, mask=t_ok, other=0)
        tok = (pair // K_SLOTS).to(tl.int64)
        if MODE == WGRAD_B:
            p = tl.load(P + tok[:, None] * I + offs_i[None, :], mask=t_ok[:, None] & i_ok[None, :], other=0.0)
            q = tl.load(Q + pair[:, None].to(tl.int64) * J + offs_j[None, :], mask=t_ok[:, None] & j_ok[None, :],
                        other=0.0)
            coef = tl.load(W_PAIR + pair, mask=t_ok, other=0.0) * s_e
            q = (q.to(tl.float32) * coef[:, None]).to(Q.dtype.element_ty)
        else:
            p = tl.load(P + pair[:, None].to(tl.int64) * I + offs_i[None, :], mask=t_ok[:, None] & i_ok[None, :],
                        other=0.0)
            q = tl.load(Q + tok[:, None] * J + offs_j[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, tok[:, None] * J + offs_j[None, :], dropout_p)
                q = tl.where(keep, q * dropout_scale, 0.0).to(Q.dtype.element_ty)
        acc = _mma(tl.trans(p), q, acc, DOT_PRECISION, UPCAST)
    tl.store(OUT + split * s_os + e * s_oe + offs_i[:, None] * s_oi + offs_j[None, :] * s_oj, acc,
             mask=i_ok[:, None] & j_ok[None, :])
