"""Gate layouts: what ``routed_lora`` accepts and the one normalized form every backend sees.

Accepted (x has shape [..., K], E experts):
  per token:     gates [..., E]      with exactly x's leading dims
  per sequence:  gates [..., E]      with one leading dim fewer than x: x [B, S, K] with gates [B, E] gives
                                     every token of sequence b the mix gates[b]; x [T, K] with gates [E]
                                     gives all T tokens one mix.
Normalized: gates2d [G, E] and seq_len, so that token t (of the flattened x [T, K]) uses row t // seq_len:
  per token:     G = T, seq_len = 1
  per sequence:  G = number of sequences, seq_len = tokens per sequence (T = G * seq_len)
Nothing else broadcasts: any other shape is an error that names the shapes seen.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class NormalizedGates(NamedTuple):
    gates: torch.Tensor  # [G, E], contiguous
    seq_len: int  # tokens per gate row (1: per-token gates)


def normalize_gates(gates: torch.Tensor, x_shape: torch.Size, num_experts: int) -> NormalizedGates:
    lead = tuple(x_shape[:-1])
    if gates.dim() == 0 or gates.shape[-1] != num_experts:
        raise ValueError(
            f"gates must end in the expert dim E = {num_experts} (from lora_A [E, r, K]); got gates "
            f"{tuple(gates.shape)} for x {tuple(x_shape)}"
        )
    g_lead = tuple(gates.shape[:-1])
    num_tokens = math.prod(lead)
    if g_lead == lead:
        return NormalizedGates(gates.reshape(num_tokens, num_experts).contiguous(), 1)
    if len(lead) >= 1 and g_lead == lead[:-1]:
        seq_len = lead[-1]  # 0 for sequences of no tokens: no token reads a row (the caller computes nothing)
        num_seq = math.prod(g_lead)
        return NormalizedGates(gates.reshape(num_seq, num_experts).contiguous(), seq_len)
    per_seq = lead[:-1] + (num_experts,) if lead else None
    raise ValueError(
        f"gates {tuple(gates.shape)} fit neither layout for x {tuple(x_shape)}: per token they must be "
        f"{lead + (num_experts,)}, per sequence {per_seq}. Gates are never broadcast; expand them explicitly."
    )


def token_gates(gates: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Expand normalized gates [G, E] to one row per token [G * seq_len, E] (reference paths only)."""
    return gates if seq_len == 1 else gates.repeat_interleave(seq_len, dim=0)
