"""The ``cuda`` backend of top-k routed LoRA: the grouped tensor-core kernels of csrc/topk/ (personafuse_kernels._C),
same contract as routed_lora_topk_torch.py (the reference) and routed_lora_topk_triton.py.

forward:  base y = x W^T + b (cuBLAS); topk_pair_shrink: H, Hg [P, r] (x rows gathered on load, dropout
          mask regenerated from the seed, w_p s_e in the epilogue); topk_expand_y_: for each slot, Hg B_e^T
          added into its tokens' rows of y (no atomics)
backward: topk_pair_dhg: dH [P, r] and dweights; topk_wgrad_B / topk_wgrad_A: dB_e, dA_e as per-expert
          reductions in a fixed order; dx = dY W (cuBLAS) then topk_expand_dx_ adds drop'(dH A_e) per slot
float32, r > 128, a pre-sm_80 GPU or PERSONAFUSE_CUDA_TENSOR_CORES=0: the dense reference path (cuBLAS GEMMs with
zeros off the top-k).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing.topk import RoutingMeta, build_routing_metadata
from . import routed_lora_cuda, routed_lora_topk_torch, routed_lora_torch


def grouped_supported(x: torch.Tensor, r: int) -> bool:
    """The grouped kernels run where the tensor-core kernels do (fp16/bf16, r <= 128, sm_80+, not turned off)."""
    return routed_lora_cuda.use_tensor_core_kernels(x, r)


def saved_like(x, lora_A, indices):
    """An empty tensor shaped like forward's saved tensor (the custom op's fake implementation): H [T*k, r] on the
    grouped kernels, else the dense reference's H [T, E*r]."""
    E, r, _ = lora_A.shape
    return x.new_empty(indices.numel(), r) if grouped_supported(x, r) else x.new_empty(x.shape[0], E * r)


def _route(meta: RoutingMeta):
    return meta.sorted_pairs, meta.group_start, meta.block_group, meta.block_start, meta.block_m, meta.k


def _pair_weights(weights, scaling):
    return weights.float().reshape(-1).contiguous(), scaling.float().contiguous()


def forward(x, weight, bias, lora_A, lora_B, indices, weights, scaling, seed, dropout_p: float, block_m: int):
    """(y [T, N], H [P, r], meta) with P = T * k pairs (or the dense reference's saved tensor when not grouped).
    The base GEMM is launched before the routing metadata is built."""
    if not grouped_supported(x, lora_A.shape[1]):
        return routed_lora_topk_torch.forward(x, weight, bias, lora_A, lora_B, indices, weights, scaling, seed,
                                              dropout_p, block_m)
    ops = routed_lora_cuda.kernel_ops()
    w_pair, s32 = _pair_weights(weights, scaling)
    x = x.contiguous()
    y = F.linear(x, weight, bias)
    meta = build_routing_metadata(indices, lora_A.shape[0], block_m)
    H, Hg = ops.topk_pair_shrink(x, lora_A.contiguous(), w_pair, s32, seed, *_route(meta), dropout_p)
    ops.topk_expand_y_(y, Hg, lora_B.contiguous(), *_route(meta))
    return y, H, meta


def backward(dy, x, weight, lora_A, lora_B, indices, weights, scaling, seed, H, dropout_p: float,
             meta: RoutingMeta, needs):
    """(dx, dW, db, dA, dB, dweights [T, k])."""
    if not grouped_supported(x, lora_A.shape[1]):
        return routed_lora_topk_torch.backward(dy, x, weight, lora_A, lora_B, indices, weights, scaling, seed, H,
                                               dropout_p, meta, needs)
    ops = routed_lora_cuda.kernel_ops()
    need_dx, need_dW, need_db, need_dA, need_dB, need_dw = needs
    E = lora_A.shape[0]
    w_pair, s32 = _pair_weights(weights, scaling)
    dy, x, lora_A, lora_B = dy.contiguous(), x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    dH, dw = ops.topk_pair_dhg(dy, lora_B, w_pair, s32, H, *_route(meta))
    dB = ops.topk_wgrad_B(dy, H, w_pair, s32, meta.sorted_pairs, meta.group_start, E, meta.k) \
        if need_dB else dy.new_empty(0)
    dA = ops.topk_wgrad_A(dH, x, w_pair, s32, seed, meta.sorted_pairs, meta.group_start, E, meta.k, dropout_p) \
        if need_dA else dy.new_empty(0)
    dx = dy.new_empty(0)
    if need_dx:
        dx = dy @ weight
        ops.topk_expand_dx_(dx, dH, lora_A, seed, *_route(meta), dropout_p)
    dW, db = routed_lora_torch.base_weight_grads(dy, x, need_dW, need_db)
    dweights = dw.view(indices.shape).to(weights.dtype) if need_dw else weights.new_empty(0)
    return dx, dW, db, dA, dB, dweights
