"""Triton kernels of the fused top-k router (launchers and autograd: router_triton.py). Torch-free, so the
ahead-of-time compile gate can load it beside Triton alone.

    _topk_router_fwd_kernel   logits = (x W_r^T + b) / temperature, fp32 softmax, log-sum-exp, top-k by repeated
                              selection (k <= 8), renormalized weights
    _topk_router_bwd_kernel   dlogits [T, E] fp32 from dweights, and optionally dprobs and dlse
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _mma


@triton.jit
def _select_top(work, offs_e, BLOCK_E: tl.constexpr):
    """(value, index) of each row's largest entry, the lowest index among ties."""
    best = tl.max(work, axis=1)
    arg = tl.min(tl.where(work == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
    return best, arg


@triton.jit
def _topk_router_fwd_kernel(
    X, W, B, PROBS, LSE, IDX, WTS, T, K, E, inv_temp,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    m_ok = offs_m < T
    e_ok = offs_e < E
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(W + offs_e[None, :] * K + offs_k[:, None], mask=k_ok[:, None] & e_ok[None, :], other=0.0)
        acc = _mma(x, w, acc, DOT_PRECISION, UPCAST)
    bias = tl.load(B + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    logits = tl.where(e_ok[None, :], (acc + bias[None, :]) * inv_temp, float("-inf"))
    row_max = tl.max(logits, axis=1)
    p = tl.exp(logits - row_max[:, None])
    total = tl.sum(p, axis=1)
    probs = p / total[:, None]
    tl.store(PROBS + offs_m[:, None] * E + offs_e[None, :], probs, mask=m_ok[:, None] & e_ok[None, :])
    tl.store(LSE + offs_m, row_max + tl.log(total), mask=m_ok)
    # top-k by repeated selection (k <= 8), twice: once for the sum, once to store the renormalized weights
    work = tl.where(e_ok[None, :], probs, -1.0)
    picked = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for _ in tl.static_range(TOP_K):
        best, arg = _select_top(work, offs_e, BLOCK_E)
        picked += best
        work = tl.where(offs_e[None, :] == arg[:, None], -1.0, work)
    picked = tl.where(m_ok, picked, 1.0)  # rows past T: no 0 / 0
    work = tl.where(e_ok[None, :], probs, -1.0)
    for j in tl.static_range(TOP_K):
        best, arg = _select_top(work, offs_e, BLOCK_E)
        tl.store(IDX + offs_m * TOP_K + j, arg.to(tl.int64), mask=m_ok)
        tl.store(WTS + offs_m * TOP_K + j, best / picked, mask=m_ok)
        work = tl.where(offs_e[None, :] == arg[:, None], -1.0, work)


@triton.jit
def _topk_router_bwd_kernel(
    PROBS, IDX, WTS, DWTS, DPROBS, DLSE, DLOGITS, T, E, inv_temp,
    TOP_K: tl.constexpr, HAS_DPROBS: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dlogits [T, E] (fp32) of the router from dweights, and optionally dprobs and dlse (the aux losses):
        dp[i_j] += (dw_j - <dw, w>) / S,  S = sum_j p[i_j]
        dlogits = (p * (dp - <dp, p>) + dlse * p) / temperature
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    m_ok = offs_m < T
    mask = m_ok[:, None] & (offs_e < E)[None, :]
    p = tl.load(PROBS + offs_m[:, None] * E + offs_e[None, :], mask=mask, other=0.0)
    if HAS_DPROBS:
        dp = tl.load(DPROBS + offs_m[:, None] * E + offs_e[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        dp = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    picked = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dot_dw_w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        i = tl.load(IDX + offs_m * TOP_K + j, mask=m_ok, other=0)
        picked += tl.sum(tl.where(offs_e[None, :] == i[:, None], p, 0.0), axis=1)
        dot_dw_w += tl.load(DWTS + offs_m * TOP_K + j, mask=m_ok, other=0.0).to(tl.float32) * \
            tl.load(WTS + offs_m * TOP_K + j, mask=m_ok, other=0.0)
    picked = tl.where(m_ok, picked, 1.0)  # rows past T: no 0 / 0
    for j in tl.static_range(TOP_K):
        i = tl.load(IDX + offs_m * TOP_K + j, mask=m_ok, other=0)
        dw = tl.load(DWTS + offs_m * TOP_K + j, mask=m_ok, other=0.0).to(tl.float32)
        dp += tl.where(offs_e[None, :] == i[:, None], ((dw - dot_dw_w) / picked)[:, None], 0.0)
    dlogits = p * (dp - tl.sum(dp * p, axis=1)[:, None])
    if HAS_DLSE:
        dlogits += tl.load(DLSE + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None] * p
    tl.store(DLOGITS + offs_m[:, None] * E + offs_e[None, :], dlogits * inv_temp, mask=mask)
