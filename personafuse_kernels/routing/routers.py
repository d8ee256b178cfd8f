"""Routers: produce the gates of a routed LoRA layer.

    TokenRouter     gates[t] = softmax(x[t] W_r^T / temperature)            [..., E] per token
    SequenceRouter  gates[b] = softmax(pool(x[b]) W_r^T / temperature)      [B, E] per sequence
                    pool = mean over valid tokens (attention mask) or a given context embedding [B, C]
    external        the caller sets the gates (a persona mix per batch row), see RoutedLoRALinear.set_gates

Softmax runs in float32 and gates come out float32 (routed_lora accepts float32 gates with any x dtype).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .topk import TopKGates


class RouterOutput(NamedTuple):
    gates: "Tensor | TopKGates"  # [..., E] float32, or TopKGates with top_k
    load_balancing_loss: Tensor  # scalar: Switch-style E * sum_e f_e * P_e (1.0 when perfectly balanced)
    z_loss: Tensor  # scalar: mean over tokens of logsumexp(logits)^2
    dropped: Optional[Tensor] = None  # top-k with a capacity factor: number of (token, slot) pairs dropped


def switch_load_balancing_loss(probs: Tensor, indices: Optional[Tensor] = None) -> Tensor:
    """E * sum_e f_e * P_e with f_e the fraction of routing assignments to expert e (each token's top expert,
    or its top-k indices [T, k]) and P_e the mean probability. probs [T, E] float32. Gradients flow through P_e."""
    E = probs.shape[-1]
    chosen = probs.argmax(-1, keepdim=True) if indices is None else indices
    frac = torch.nn.functional.one_hot(chosen, E).to(probs.dtype).sum(-2).mean(0) / chosen.shape[-1]
    return E * (frac * probs.mean(0)).sum()


def apply_capacity(indices: Tensor, weights: Tensor, num_experts: int, capacity_factor: float):
    """Drop (zero the weight of) pairs past each expert's capacity ceil(cf * T * k / E), slot 0 of every token
    first, then slot 1, ... (GShard's priority). Returns (weights, number of dropped pairs as a tensor)."""
    T, k = indices.shape
    capacity = math.ceil(capacity_factor * T * k / num_experts)
    order = indices.t().reshape(-1)  # slot-major
    onehot = torch.nn.functional.one_hot(order, num_experts)
    position = ((onehot.cumsum(0) - 1) * onehot).sum(-1)  # rank of each pair within its expert
    keep = (position < capacity).view(k, T).t()
    return weights * keep.to(weights.dtype), (~keep).sum()


def check_temperature(temperature: float) -> None:
    """Softmax temperature of a router: finite and > 0 (0 divides by zero, NaN or inf gives NaN gates)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _logits_fp32(proj: nn.Linear, x: Tensor) -> Tensor:
    """proj(x) computed in float32 whatever the dtype of x and proj (fp16 logits overflow past 65504 into NaN
    gates); gradients reach proj's parameters and x in their own dtypes."""
    bias = None if proj.bias is None else proj.bias.float()
    return torch.nn.functional.linear(x.float(), proj.weight.float(), bias)


def router_z_loss(logits: Tensor) -> Tensor:
    """mean(logsumexp(logits)^2): keeps router logits small (ST-MoE)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class TokenRouter(nn.Module):
    """Per-token router: Linear(K, E), temperature, softmax in float32; dense gates, or with top_k the k largest
    probabilities renormalized to sum to 1 (TopKGates). Optional capacity_factor (top-k only) drops pairs past
    each expert's capacity and reports how many in RouterOutput.dropped. Returns RouterOutput."""

    def __init__(self, in_features: int, num_experts: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 capacity_factor: Optional[float] = None, fused: Optional[bool] = None, device=None, dtype=None):
        super().__init__()
        check_temperature(temperature)
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        bad_factor = capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0)
        if capacity_factor is not None and (top_k is None or bad_factor):
            raise ValueError(f"capacity_factor needs top_k and must be finite and > 0, got {capacity_factor}")
        self.num_experts = num_experts
        self.temperature = float(temperature)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.fused = fused  # top-k: the fused Triton router kernel (None: on CUDA tensors when Triton runs there)
        self.proj = nn.Linear(in_features, num_experts, bias=True, device=device, dtype=dtype)

    def _use_fused(self, x: Tensor) -> bool:
        if self.top_k is None or self.fused is False or torch.compiler.is_compiling():
            return False
        if self.fused:
            return True
        from ..dispatch import available_backends

        return x.is_cuda and "triton" in available_backends() and self.top_k <= 8

    def forward(self, x: Tensor) -> RouterOutput:
        E = self.num_experts
        lead = x.shape[:-1]
        if self._use_fused(x):
            from ..ops.router_triton import TopKRouterFunction

            probs, lse, indices, weights = TopKRouterFunction.apply(
                x.reshape(-1, x.shape[-1]).contiguous(), self.proj.weight, self.proj.bias, self.temperature, self.top_k)
            z = lse.pow(2).mean()
            flat_probs = probs
        else:
            logits = _logits_fp32(self.proj, x) / self.temperature  # [..., E]
            flat_probs = torch.softmax(logits, dim=-1).reshape(-1, E)
            z = router_z_loss(logits.reshape(-1, E))
            if self.top_k is None:
                return RouterOutput(flat_probs.view(*lead, E), switch_load_balancing_loss(flat_probs), z)
            top = flat_probs.topk(self.top_k, dim=-1)
            indices, weights = top.indices, top.values / top.values.sum(-1, keepdim=True)
        dropped = None
        if self.capacity_factor is not None:
            weights, dropped = apply_capacity(indices, weights, E, self.capacity_factor)
        gates = TopKGates(indices.view(*lead, self.top_k), weights.view(*lead, self.top_k), validate=False)
        return RouterOutput(gates, switch_load_balancing_loss(flat_probs, indices), z, dropped)


class SequenceRouter(nn.Module):
    """Per-sequence (persona) router: one gate row per sequence, from pooled hidden states or a context embedding.

    forward(x [B, S, K] or [S, K], attention_mask [B, S] or [S] (1 = valid), context [B, C] or [C])
        -> gates [B, E] (or [E] for unbatched x), float32.
    Inside ``hold()`` (e.g. around model.generate) the first call's gates are kept and reused by later calls
    of the same batch size, so decoding steps keep the mix computed from the prompt.
    """

    def __init__(self, in_features: int, num_experts: int, temperature: float = 1.0,
                 context_features: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        check_temperature(temperature)
        self.num_experts = num_experts
        self.temperature = float(temperature)
        self.proj = nn.Linear(context_features or in_features, num_experts, device=device, dtype=dtype)
        self._holding = False
        self._held: Optional[Tensor] = None

    def pool(self, x: Tensor, attention_mask: Optional[Tensor], cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """Mean over the sequence dim of x [..., S, K], over valid tokens only when a mask is given; or, with
        cu_seqlens [B + 1], over each packed sequence of x [T, K] (an empty sequence pools to zeros)."""
        xf = x.float()
        if cu_seqlens is not None:
            from .gates import packed_rows

            if x.dim() != 2 or attention_mask is not None:
                raise ValueError(f"with cu_seqlens, x must be packed [T, K] and there is no attention_mask; got x "
                                 f"{tuple(x.shape)}")
            B = cu_seqlens.numel() - 1
            sums = xf.new_zeros(B, x.shape[1]).index_add_(0, packed_rows(cu_seqlens, x.shape[0]), xf)
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(xf.dtype).clamp_min(1.0)
            return sums / lengths[:, None]
        if attention_mask is None:
            return xf.mean(dim=-2)
        if attention_mask.shape != x.shape[:-1]:
            raise ValueError(f"attention_mask must be {tuple(x.shape[:-1])} for x {tuple(x.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        m = attention_mask.to(xf.dtype).unsqueeze(-1)
        return (xf * m).sum(-2) / m.sum(-2).clamp_min(1.0)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None, context: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
        if self._holding and self._held is not None:
            batch = (cu_seqlens.numel() - 1,) if cu_seqlens is not None else tuple(x.shape[:-2])
            if tuple(self._held.shape[:-1]) != batch:
                raise ValueError(f"held sequence gates are for batch {tuple(self._held.shape[:-1])}, "
                                 f"got x {tuple(x.shape)}; call release() before a new batch")
            return self._held
        feats = context if context is not None else self.pool(x, attention_mask, cu_seqlens)
        logits = _logits_fp32(self.proj, feats) / self.temperature
        gates = torch.softmax(logits, dim=-1)
        if self._holding:
            self._held = gates.detach()
        return gates

    def hold(self) -> None:
        """Keep the next computed gates and reuse them until release() (decoding with a KV cache)."""
        self._holding, self._held = True, None

    def release(self) -> None:
        self._holding, self._held = False, None
