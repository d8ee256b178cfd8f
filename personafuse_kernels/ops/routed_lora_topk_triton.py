"""The ``triton`` backend of top-k routed LoRA: grouped kernels over routing metadata (triton_grouped_kernels.py),
same contract as routed_lora_topk_torch.py (the reference).

forward:  base y = x W^T + b (cuBLAS); grouped shrink H, Hg [P, r] (x rows gathered on load, dropout mask
          regenerated from the seed, w_p s_e applied in the epilogue); for each slot s, grouped expand adds
          Hg B_e^T into the rows of y (each token once per slot: no atomics, deterministic)
backward: grouped dHg = dY[tok] B_e with dweights and dH in the epilogue; dB_e, dA_e as per-expert reductions
          over each expert's contiguous pairs; dx = dY W (cuBLAS) + for each slot drop'(dH A_e) into its rows
The metadata (RoutingMeta) is built once per call by forward, after the base GEMM is launched, and reused by
backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing.topk import RoutingMeta, build_routing_metadata
from . import routed_lora_torch
from . import triton_grouped_kernels as gk
from .launch_configs import get_config
from .triton_utils import cdiv, config_key, dot_args, num_sms, pow2


def saved_like(x, lora_A, indices):
    """An empty tensor shaped like forward's saved tensor (the custom op's fake implementation): H [T*k, r]."""
    return x.new_empty(indices.numel(), lora_A.shape[1])


def pair_shrink(x, lora_A, w_pair, scaling, seed, H, Hg, meta: RoutingMeta, *, r: int, dropout_p: float):
    """Per pair p: H[p] = drop(x)[tok_p] A_e^T and Hg[p] = H[p] * w_p s_e; x [T, K], H and Hg [P, r] (out)."""
    K = x.shape[1]
    # lora_A [E, r, K] read as M[e, l=k, j] at e*r*K + k + j*K
    _pair_gemm(x, lora_A, (r * K, 1, K), w_pair, scaling, seed, H, Hg, w_pair, meta, r, gk.EPI_SHRINK.value, dropout_p)


def pair_dhg(dy, lora_B, w_pair, scaling, seed, H, dH, dw, meta: RoutingMeta, *, r: int):
    """Per pair p: dHg = dY[tok_p] B_e, then dw[p] = s_e <dHg, H[p]> and dH[p] = dHg * w_p s_e; dy [T, N]."""
    N = dy.shape[1]
    # lora_B [E, N, r] read as M[e, l=n, j] at e*N*r + n*r + j
    _pair_gemm(dy, lora_B, (N * r, r, 1), w_pair, scaling, seed, H, dH, dw, meta, r, gk.EPI_DHG.value, 0.0)


def _pair_gemm(X, M, m_strides, w_pair, scaling, seed, H, out, dw, meta: RoutingMeta, r: int, epilogue,
               dropout_p: float):
    """The kernel behind pair_shrink and pair_dhg; epilogue is gk.EPI_SHRINK or gk.EPI_DHG."""
    L = X.shape[1]
    cfg = get_config("pair", *config_key(X, L, L, r))
    grid = (meta.block_group.shape[0],)
    gk._grouped_pair_gemm_kernel[grid](
        X, M, w_pair, scaling, seed, H, out, dw, meta.block_group, meta.block_start, meta.group_start,
        meta.sorted_pairs, L, r, meta.k, *m_strides, dropout_p, 1.0 / (1.0 - dropout_p),
        EPILOGUE=epilogue, HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=meta.block_m, BLOCK_L=cfg.block_l,
        R_PAD=pow2(r, 16), **dot_args(X.dtype), num_warps=cfg.num_warps,
    )


def _expand(out, X2, M, m_strides, seed, meta: RoutingMeta, r: int, dropout_p: float):
    """out[tok] += d * X2[p] M_e for every slot (one launch per slot)."""
    N = out.shape[1]
    cfg = get_config("expand", *config_key(out, r, N, r))
    grid = (meta.block_group.shape[0], cdiv(N, cfg.block_n))
    for slot in range(meta.k):
        gk._grouped_expand_kernel[grid](
            X2, M, out, seed, meta.block_group, meta.block_start, meta.group_start, meta.sorted_pairs,
            N, r, meta.k, slot, *m_strides, dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=meta.block_m, BLOCK_N=cfg.block_n, R_PAD=pow2(r, 16),
            **dot_args(out.dtype), num_warps=cfg.num_warps,
        )


def expert_wgrad_B(dy, H, w_pair, scaling, seed, meta: RoutingMeta, *, E: int, r: int) -> torch.Tensor:
    """dB [E, N, r] fp32: per expert, dY[tok]^T (H * w_p s_e) over its pairs."""
    return _wgrad(dy, H, w_pair, scaling, seed, meta, E, dy.shape[1], r, r, gk.WGRAD_B.value, 0.0)


def expert_wgrad_A(dH, x, w_pair, scaling, seed, meta: RoutingMeta, *, E: int, r: int, dropout_p: float
                   ) -> torch.Tensor:
    """dA [E, r, K] fp32: per expert, dH^T drop(x)[tok] over its pairs."""
    return _wgrad(dH, x, w_pair, scaling, seed, meta, E, r, x.shape[1], r, gk.WGRAD_A.value, dropout_p)


def _wgrad(P, Q, w_pair, scaling, seed, meta: RoutingMeta, E: int, I: int, J: int, r: int, mode,
           dropout_p: float):
    """[E, I, J] fp32, the kernel behind expert_wgrad_B (I = N, J = r) and expert_wgrad_A (I = r, J = K)."""
    cfg = get_config("expert_wgrad", *config_key(P, I, J, r))
    block_i = pow2(I, 16, cfg.max_block)
    block_j = pow2(J, 16, cfg.max_block)
    tiles = cdiv(I, block_i) * cdiv(J, block_j)
    split = max(1, min(cfg.max_split, (2 * num_sms(P.device)) // max(1, E * tiles)))
    out = torch.empty(split, E, I, J, dtype=torch.float32, device=P.device)
    gk._grouped_wgrad_kernel[(E, tiles, split)](
        P, Q, w_pair, scaling, seed, out, meta.group_start, meta.sorted_pairs, I, J, r, meta.k,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), dropout_p, 1.0 / (1.0 - dropout_p),
        MODE=mode, HAS_DROPOUT=mode == gk.WGRAD_A.value and dropout_p > 0.0, SPLIT=split, BLOCK_I=block_i,
        BLOCK_J=block_j, BLOCK_T=cfg.block_t, **dot_args(P.dtype), num_warps=cfg.num_warps,
    )
    return out.sum(0) if split > 1 else out[0]


def _prepare(x, weight, lora_A, indices, weights, scaling):
    """(K, N, E, r, P, w_pair [P] fp32, scaling [E] fp32) of one call."""
    E, r, K = lora_A.shape
    return (K, weight.shape[0], E, r, indices.numel(), weights.float().reshape(-1).contiguous(),
            scaling.float().contiguous())


def forward(x, weight, bias, lora_A, lora_B, indices, weights, scaling, seed, dropout_p: float, block_m: int):
    """(y [T, N], H [P, r], meta) with P = T * k pairs. The base GEMM is launched first, so the GPU runs it while
    the host issues the routing metadata's launches."""
    K, N, E, r, P, w_pair, scaling32 = _prepare(x, weight, lora_A, indices, weights, scaling)
    y = F.linear(x, weight, bias)
    meta = build_routing_metadata(indices, E, block_m)
    H = x.new_empty(P, r)
    Hg = x.new_empty(P, r)
    if P == 0:
        return y, H, meta
    pair_shrink(x, lora_A, w_pair, scaling32, seed, H, Hg, meta, r=r, dropout_p=dropout_p)
    # lora_B [E, N, r] read as M[e, j, n] at e*N*r + j + n*r
    _expand(y, Hg, lora_B, (N * r, 1, r), seed, meta, r, 0.0)
    return y, H, meta


def backward(dy, x, weight, lora_A, lora_B, indices, weights, scaling, seed, H, dropout_p: float,
             meta: RoutingMeta, needs):
    """(dx, dW, db, dA, dB, dweights [T, k])."""
    need_dx, need_dW, need_db, need_dA, need_dB, need_dw = needs
    K, N, E, r, P, w_pair, scaling32 = _prepare(x, weight, lora_A, indices, weights, scaling)
    dH = torch.zeros_like(H)
    dw = torch.zeros(P, dtype=torch.float32, device=dy.device)
    if P:
        pair_dhg(dy, lora_B, w_pair, scaling32, seed, H, dH, dw, meta, r=r)
    dB = dy.new_empty(0)
    if need_dB:
        dB = (expert_wgrad_B(dy, H, w_pair, scaling32, seed, meta, E=E, r=r) if P
              else torch.zeros(E, N, r, device=dy.device)).to(lora_B.dtype)
    dA = dy.new_empty(0)
    if need_dA:
        dA = (expert_wgrad_A(dH, x, w_pair, scaling32, seed, meta, E=E, r=r, dropout_p=dropout_p) if P
              else torch.zeros(E, r, K, device=dy.device)).to(lora_A.dtype)
    dx = dy.new_empty(0)
    if need_dx:
        dx = dy @ weight
        if P:  # lora_A [E, r, K] as M[e, j, n=k] at e*r*K + j*K + k
            _expand(dx, dH, lora_A, (r * K, K, 1), seed, meta, r, dropout_p)
    dW, db = routed_lora_torch.base_weight_grads(dy, x, need_dW, need_db)
    dweights = dw.view(indices.shape).to(weights.dtype) if need_dw else weights.new_empty(0)
    return dx, dW, db, dA, dB, dweights
