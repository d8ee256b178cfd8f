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

from .launch_configs import get_config
from .triton_router_kernels import _topk_router_bwd_kernel, _topk_router_fwd_kernel
from .triton_utils import cdiv, config_key, dot_args, pow2


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
