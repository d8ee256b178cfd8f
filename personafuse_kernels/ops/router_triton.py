"""Fused top-k router: one Triton kernel for logits = (x W_r^T + b) / temperature, float32 softmax, log-sum-exp,
top-k and renormalization; one for the backward to the logits (from the routing weights and the aux losses'
gradients), then two cuBLAS GEMMs for dx and dW_r (TopKRouterFunction). Reference: the unfused path of
routing/routers.py TokenRouter (torch.softmax + torch.topk, autograd), which tests hold it to.

    x [T, K], W_r [E, K], b [E] -> probs [T, E] fp32, lse [T] fp32, indices [T, k] int64, weights [T, k] fp32
Backward, with S_t = sum_j probs[t, i_j] (so weights = probs[i] / S):
    dprobs[t, i_j] += dw_j / S - sum_l dw_l w_l / S
    dlogits = probs * (dprobs - <dprobs, probs>) + dlse * probs,   then / temperature
    dx = dlogits W_r,  dW_r = dlogits^T x,  db = sum_t dlogits
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_configs import get_config
from .triton_kernels import _mma
from .triton_utils import cdiv, config_key, dot_args, pow2


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


def topk_router_dlogits(probs, idx, wts, dwts, dprobs, dlse, temperature: float):
    """dlogits [T, E] fp32 (see _topk_router_bwd_kernel); dwts, dprobs, dlse may be None."""
    T, E = probs.shape
    k = idx.shape[1]
    dlogits = torch.empty_like(probs)
    if T == 0:
        return dlogits
    cfg = get_config("router", *config_key(probs, 0, E, E))
    dwts = torch.zeros_like(wts) if dwts is None else dwts.float().contiguous()
    _topk_router_bwd_kernel[(cdiv(T, cfg.block_m),)](
        probs, idx, wts, dwts, probs if dprobs is None else dprobs.float().contiguous(),
        probs if dlse is None else dlse.float().contiguous(), dlogits, T, E, 1.0 / temperature,
        TOP_K=k, HAS_DPROBS=dprobs is not None, HAS_DLSE=dlse is not None, BLOCK_M=cfg.block_m,
        BLOCK_E=pow2(E, 16), num_warps=cfg.num_warps,
    )
    return dlogits


def topk_router_forward(x, weight, bias, temperature: float, top_k: int):
    """(probs [T, E], lse [T], indices [T, k], weights [T, k]); x [T, K], weight [E, K], bias [E]."""
    T, K = x.shape
    E = weight.shape[0]
    if top_k > 8:
        raise ValueError(f"the fused router supports top_k <= 8, got {top_k}")
    probs = torch.empty(T, E, dtype=torch.float32, device=x.device)
    lse = torch.empty(T, dtype=torch.float32, device=x.device)
    idx = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    wts = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    if T == 0:
        return probs, lse, idx, wts
    cfg = get_config("router", *config_key(x, K, E, E))
    _topk_router_fwd_kernel[(cdiv(T, cfg.block_m),)](
        x, weight, bias, probs, lse, idx, wts, T, K, E, 1.0 / temperature, TOP_K=top_k, BLOCK_M=cfg.block_m,
        BLOCK_E=pow2(E, 16), BLOCK_K=cfg.block_k, **dot_args(x.dtype), num_warps=cfg.num_warps,
    )
    return probs, lse, idx, wts


class TopKRouterFunction(torch.autograd.Function):
    """Fused forward, explicit backward (see the module docstring). Returns probs, lse, indices, weights."""

    @staticmethod
    def forward(ctx, x, weight, bias, temperature, top_k):
        probs, lse, idx, wts = topk_router_forward(x, weight, bias, temperature, top_k)
        ctx.save_for_backward(x, weight, probs, idx, wts)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(idx)
        return probs, lse, idx, wts

    @staticmethod
    def backward(ctx, dprobs, dlse, _didx, dwts):
        x, weight, probs, idx, wts = ctx.saved_tensors
        dlogits = topk_router_dlogits(probs, idx, wts, dwts, dprobs, dlse, ctx.temperature).to(x.dtype)
        dx = dlogits @ weight if ctx.needs_input_grad[0] else None
        dW = dlogits.t() @ x if ctx.needs_input_grad[1] else None
        db = dlogits.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dW, db, None, None
