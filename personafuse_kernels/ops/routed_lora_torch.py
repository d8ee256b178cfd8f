"""The ``torch`` backend of the routed LoRA op, and the per-expert reference it is tested against.

    y = x W^T + b + sum_e s_e * g[t, e] * (drop(x) A_e^T) B_e^T

Shapes (normalized by functional.routed_lora; the math in docs/design.md):
    x [T, K], weight [N, K], bias [N] or None, lora_A [E, r, K], lora_B [E, N, r],
    gates [G, E] with seq_len tokens per row (T = G * seq_len), or seq_len the row map seq_ids [T] int32 of packed
    sequences (routing/gates.py), scaling [E], seed int64 [1] or [0].

The stacked two-GEMM formulation with its backward written out (no autograd through ops): this is the
math every kernel backend must reproduce, forward and every gradient.

    H   = drop(x) A_cat^T            [T, E*r]        A_cat = lora_A.view(E*r, K)
    Hg  = H * (s_e g[t, e])          [T, E*r]        the gate step (GateOps below)
    y   = x W^T + b + Hg B_cat^T     [T, N]          B_cat = lora_B.permute(1, 0, 2).reshape(N, E*r)
backward, given dy [T, N]:
    dHg = dy B_cat,  dB = (dy^T Hg) per expert,  dg = s_e <dHg, H>_r (summed per sequence),
    dH  = dHg * (s_e g),  dA = dH^T drop(x),  dx = dy W + drop'(dH A_cat),  dW = dy^T x,  db = sum_t dy
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing.gates import row_sums, token_gates
from .dropout import apply_dropout


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchGateOps:
    """The gate step, and the two narrow GEMMs it fuses into, in torch ops.

    The cuda backend subclasses this with its kernels (gate kernels; tensor-core shrink and dHg kernels that
    fuse the gate into their epilogues); the wide GEMMs and the flow of forward/backward below are shared.
    """

    @staticmethod
    def forward(H: torch.Tensor, gates: torch.Tensor, scaling: torch.Tensor, seq_len) -> torch.Tensor:
        """Hg = H * s_e * g[t // seq_len, e];  H [T, E*r] -> Hg [T, E*r] in H's dtype."""
        T, width = H.shape
        E = gates.shape[1]
        cdt = _compute_dtype(H.dtype)
        gs = token_gates(gates.to(cdt) * scaling.to(cdt), seq_len)  # [T, E]
        return (H.view(T, E, width // E).to(cdt) * gs[:, :, None]).to(H.dtype).view(T, width)

    @staticmethod
    def backward(dHg: torch.Tensor, H: torch.Tensor, gates: torch.Tensor, scaling: torch.Tensor, seq_len):
        """(dH [T, E*r] in H's dtype, dgates [G, E] in float32 or float64)."""
        T, width = H.shape
        G, E = gates.shape
        cdt = _compute_dtype(H.dtype)
        s = scaling.to(cdt)
        dHg3 = dHg.view(T, E, width // E).to(cdt)
        dg_tok = (dHg3 * H.view(T, E, width // E).to(cdt)).sum(-1) * s  # [T, E]
        dH = (dHg3 * token_gates(gates.to(cdt) * s, seq_len)[:, :, None]).to(H.dtype).view(T, width)
        dgates = row_sums(dg_tok, G, seq_len)
        return dH, dgates

    @classmethod
    def shrink(cls, x, lora_A, gates, scaling, seed, seq_len, dropout_p: float):
        """(H, Hg): H = drop(x) A_cat^T [T, E*r], Hg its gated copy."""
        E, r, K = lora_A.shape
        H = apply_dropout(x, seed, dropout_p) @ lora_A.reshape(E * r, K).t()
        return H, cls.forward(H, gates, scaling, seq_len)

    @classmethod
    def dhg_backward(cls, dy, lora_B, H, gates, scaling, seq_len):
        """(dH, dgates) from dy [T, N] through dHg = dy B_cat and the gate's backward."""
        return cls.backward(dy @ _b_cat(lora_B), H, gates, scaling, seq_len)


def base_weight_grads(dy, x, need_dW: bool, need_db: bool):
    """(dW [N, K], db [N]) of the base linear, each an empty tensor when not wanted: shared by every backend."""
    dW = dy.t() @ x if need_dW else dy.new_empty(0)
    db = dy.sum(0, dtype=_compute_dtype(dy.dtype)).to(dy.dtype) if need_db else dy.new_empty(0)
    return dW, db


def _b_cat(lora_B: torch.Tensor) -> torch.Tensor:
    E, N, r = lora_B.shape
    return lora_B.permute(1, 0, 2).reshape(N, E * r)  # [N, E*r]


def forward(x, weight, bias, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p: float,
            gate_ops=TorchGateOps):
    """Returns (y [T, N], H [T, E*r]); H is kept for backward."""
    # the LoRA term goes in place into the fresh base output: an out-of-place addmm would copy y first, then read
    # and write it again
    y = F.linear(x, weight, bias)
    return y, delta_forward(y, x, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p, gate_ops)


def delta_forward(out, x, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p: float,
                  gate_ops=TorchGateOps) -> torch.Tensor:
    """out [T, N] += sum_e s_e g (drop(x) A_e^T) B_e^T, in place, in out's dtype (an fp32 accumulator takes the
    small operands Hg [T, C] and B_cat [N, C] in fp32). Returns H [T, E*r] for backward."""
    H, Hg = gate_ops.shrink(x, lora_A, gates, scaling, seed, seq_len, dropout_p)  # [T, E*r] each
    out.addmm_(Hg.to(out.dtype), _b_cat(lora_B).t().to(out.dtype))  # [T, N]
    return H


def backward(dy, x, weight, lora_A, lora_B, gates, scaling, seed, H, seq_len, dropout_p: float,
             needs: tuple[bool, bool, bool, bool, bool, bool], gate_ops=TorchGateOps):
    """Gradients (dx, dW, db, dA, dB, dgates) for needs = which of them are wanted; unwanted ones are empty.

    dy [T, N]; dgates comes back in gates' dtype, the others in x's dtype.
    """
    need_dx, need_dW, need_db, need_dA, need_dB, need_dg = needs
    dx, dA, dB, dg = delta_backward(dy, x, lora_A, lora_B, gates, scaling, seed, H, seq_len, dropout_p,
                                    (need_dx, need_dA, need_dB, need_dg), gate_ops)
    if need_dx:
        dx.addmm_(dy, weight)  # the base's dY W accumulated in place into the LoRA term's fresh [T, K] tensor
    dW, db = base_weight_grads(dy, x, need_dW, need_db)
    return dx, dW, db, dA, dB, dg


def delta_backward(dy, x, lora_A, lora_B, gates, scaling, seed, H, seq_len, dropout_p: float,
                   needs: tuple[bool, bool, bool, bool], gate_ops=TorchGateOps):
    """Gradients (dx, dA, dB, dgates) of the LoRA term alone (delta_forward), for needs = (dx, dA, dB, dgates);
    dx is a fresh tensor (the base's backward adds into it), unwanted ones are empty. dy [T, N] in x's dtype."""
    need_dx, need_dA, need_dB, need_dg = needs
    T, N = dy.shape
    E, r, K = lora_A.shape
    dB = dy.new_empty(0)  # every unwanted gradient is its own empty tensor: op outputs must not alias
    if need_dB:
        Hg = gate_ops.forward(H, gates, scaling, seq_len)
        dB = (dy.t() @ Hg).view(N, E, r).permute(1, 0, 2).contiguous()  # [E, N, r]
    dH, dgates = gate_ops.dhg_backward(dy, lora_B, H, gates, scaling, seq_len)  # via dHg = dy B_cat [T, E*r]
    dA = dy.new_empty(0)
    if need_dA:
        dA = (dH.t() @ apply_dropout(x, seed, dropout_p)).view(E, r, K)  # [E, r, K]
    # drop'(dH A_cat), the same mask
    dx = apply_dropout(dH @ lora_A.reshape(E * r, K), seed, dropout_p) if need_dx else dy.new_empty(0)
    dg = dgates.to(gates.dtype) if need_dg else gates.new_empty(0)
    return dx, dA, dB, dg


def routed_lora_reference(x, weight, bias, lora_A, lora_B, gates_tok, scaling, keep=None, dropout_p: float = 0.0):
    """Per-expert loop through autograd (how peft's X-LoRA computes it): the test oracle.

    x [T, K], gates_tok [T, E] (one row per token), scaling [E], keep: bool mask [T, K] or None.
    """
    xd = x if keep is None else torch.where(keep, x / (1.0 - dropout_p), torch.zeros_like(x))
    y = F.linear(x, weight, bias)
    for e in range(lora_A.shape[0]):
        y = y + (scaling[e] * gates_tok[:, e : e + 1].to(x.dtype)) * ((xd @ lora_A[e].t()) @ lora_B[e].t())
    return y
