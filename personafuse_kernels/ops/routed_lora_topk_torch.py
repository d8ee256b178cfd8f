"""The ``torch`` backend of top-k routed LoRA: the reference every grouped kernel is tested against.

    y[t] = x[t] W^T + b + sum_s weights[t, s] * s_e * (drop(x[t]) A_e^T) B_e^T,   e = indices[t, s]

Computed as the dense op with gates scattered from the top-k weights (zeros off the top-k), so it is exactly
the dense semantics; dweights[t, s] = dgates_dense[t, indices[t, s]] (0 for a -1 slot: no adapter). Shapes:
x [T, K], indices/weights [T, k] (indices int32 or int64), the rest as in routed_lora_torch. The routing
metadata arguments are unused here.
"""
from __future__ import annotations

from ..routing.topk import build_routing_metadata, dense_gates, slot_values
from . import routed_lora_torch


def saved_like(x, lora_A, indices):
    """An empty tensor shaped like forward's saved tensor (the custom op's fake implementation): H [T, E*r]."""
    E, r, _ = lora_A.shape
    return x.new_empty(x.shape[0], E * r)


def forward(x, weight, bias, lora_A, lora_B, indices, weights, scaling, seed, dropout_p: float, block_m: int):
    """Returns (y [T, N], saved, meta): saved is H [T, E*r] of the dense formulation; the routing metadata (unused
    here) is built like the grouped backends' for the same backward contract."""
    y, H = routed_lora_torch.forward(x, weight, bias, lora_A, lora_B, dense_gates(indices, weights, lora_A.shape[0]),
                                     scaling, seed, 1, dropout_p)
    return y, H, build_routing_metadata(indices, lora_A.shape[0], block_m)


def backward(dy, x, weight, lora_A, lora_B, indices, weights, scaling, seed, saved, dropout_p: float, meta, needs):
    """(dx, dW, db, dA, dB, dweights [T, k])."""
    gates = dense_gates(indices, weights, lora_A.shape[0])
    dx, dW, db, dA, dB, dg = routed_lora_torch.backward(dy, x, weight, lora_A, lora_B, gates, scaling, seed, saved,
                                                       1, dropout_p, needs)
    dweights = slot_values(dg, indices) if needs[5] else weights.new_empty(0)
    return dx, dW, db, dA, dB, dweights
