"""Gate layouts: what ``routed_lora`` accepts and the one normalized form every backend sees.

Accepted (x has shape [..., K], E experts):
  per token:     gates [..., E]      with exactly x's leading dims
  per sequence:  gates [..., E]      with one leading dim fewer than x: x [B, S, K] with gates [B, E] gives
                                     every token of sequence b the mix gates[b]; x [T, K] with gates [E]
                                     gives all T tokens one mix.
Normalized: gates2d [G, E] and seq_len, so that token t (of the flattened x [T, K]) uses row t // seq_len:
  per token:     G = T, seq_len = 1
  per sequence:  G = number of sequences, seq_len = tokens per sequence (T = G * seq_len)
  packed:        x [T, K] holding B sequences back to back, gates [B, E], cu_seqlens [B + 1] (flash-attention's
                 varlen convention): G = B and, instead of seq_len, a row map seq_ids [T] int32 built on the device
Nothing else broadcasts: any other shape is an error that names the shapes seen.

Below the functional layer "seq_len" is either that int or the row map (a tensor): token t reads gate row
t // seq_len, or seq_ids[t].
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


def token_gates(gates: torch.Tensor, seq_len) -> torch.Tensor:
    """Expand normalized gates [G, E] to one row per token [T, E] (reference paths only). seq_len: tokens per row,
    or the row map seq_ids [T]."""
    if isinstance(seq_len, torch.Tensor):
        return gates.index_select(0, seq_len)
    return gates if seq_len == 1 else gates.repeat_interleave(seq_len, dim=0)


def row_sums(per_token: torch.Tensor, num_rows: int, seq_len) -> torch.Tensor:
    """The gradient of the gate rows from per-token gradients [T, E]: summed over each row's tokens -> [G, E]."""
    if isinstance(seq_len, torch.Tensor):
        return per_token.new_zeros(num_rows, per_token.shape[1]).index_add_(0, seq_len, per_token)
    return per_token if seq_len == 1 else per_token.view(num_rows, seq_len, per_token.shape[1]).sum(1)


def packed_rows(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """seq_ids [T] int32: the sequence of each packed token, from cu_seqlens [B + 1] (0 = c_0 <= ... <= c_B = T);
    on cu_seqlens' device, no host sync. Empty sequences own no token."""
    t = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], t, right=True).to(torch.int32)
