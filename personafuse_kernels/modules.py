"""RoutedLoRALinear: a drop-in replacement for nn.Linear with E routed LoRA experts.

    y = base(x) + sum_e scaling_e * g[t, e] * (dropout(x) A_e^T) B_e^T

The base nn.Linear is kept (frozen unless the user unfreezes it); lora_B starts at zero, so a fresh layer
computes exactly its base linear. Gates come from the layer's router ("token" or "sequence"), or from the
caller ("external": set_gates(gates [B, E]) once per batch, or forward(x, gates=...)).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .functional import routed_lora
from .routing.routers import RouterOutput, SequenceRouter, TokenRouter

ROUTER_MODES = ("token", "sequence", "external")


class RoutedLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: Optional[float] = None,
                 dropout: float = 0.0, router: str = "token", temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not (isinstance(num_experts, int) and num_experts >= 1):
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if router not in ROUTER_MODES:
            raise ValueError(f"router must be one of {ROUTER_MODES}, got {router!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        K, N = base.in_features, base.out_features
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.num_experts, self.rank = num_experts, rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.dropout = float(dropout)
        self.router_mode = router
        self.backend = backend
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, K, **factory))  # [E, r, K]
        self.lora_B = nn.Parameter(torch.zeros(num_experts, N, rank, **factory))  # [E, N, r]
        # scaling_e = alpha / r for every expert (a tensor so adapters of other ranks can set their own).
        self.register_buffer("scaling", torch.full((num_experts,), self.alpha / rank, dtype=torch.float32,
                                                   device=factory["device"]), persistent=False)
        if router == "token":
            self.router = TokenRouter(K, num_experts, temperature, **factory)
        elif router == "sequence":
            self.router = SequenceRouter(K, num_experts, temperature, **factory)
        else:
            self.router = None
        self._external_gates: Optional[Tensor] = None
        self._attention_mask: Optional[Tensor] = None
        self.router_output: Optional[RouterOutput] = None  # last token-router output (aux losses)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_experts: int = 10, rank: int = 16, alpha: Optional[float] = 32,
                    dropout: float = 0.0, router: str = "token", **kwargs) -> "RoutedLoRALinear":
        """Wrap an existing nn.Linear (its weight is shared, not copied)."""
        return cls(linear, num_experts, rank, alpha=alpha, dropout=dropout, router=router, **kwargs)

    def reset_lora_parameters(self) -> None:
        """peft's init: lora_A ~ kaiming_uniform(a=sqrt(5)) per expert, i.e. U(-1/sqrt(K), 1/sqrt(K)); lora_B = 0."""
        with torch.no_grad():
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
            self.lora_B.zero_()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def set_gates(self, gates: Optional[Tensor]) -> None:
        """External gates for the next calls: [B, E] (a mix per sequence) or per token [..., E]; None clears."""
        if gates is not None and gates.shape[-1] != self.num_experts:
            raise ValueError(f"gates must end in E = {self.num_experts}, got {tuple(gates.shape)}")
        self._external_gates = gates

    def set_attention_mask(self, attention_mask: Optional[Tensor]) -> None:
        """Valid-token mask [B, S] the sequence router pools over; None pools over all tokens."""
        self._attention_mask = attention_mask

    def compute_gates(self, x: Tensor) -> Tensor:
        if self.router_mode == "token":
            self.router_output = self.router(x)
            return self.router_output.gates
        if self.router_mode == "sequence":
            return self.router(x, attention_mask=self._attention_mask)
        if self._external_gates is None:
            raise RuntimeError("this RoutedLoRALinear has router='external': call set_gates(gates [B, E]) "
                               "or pass gates= to forward")
        return self._external_gates

    def forward(self, x: Tensor, gates: Optional[Tensor] = None) -> Tensor:
        if gates is None:
            gates = self.compute_gates(x)
        return routed_lora(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B, gates,
                           scaling=self.scaling, dropout_p=self.dropout if self.training else 0.0,
                           backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, router={self.router_mode!r}, "
                f"backend={self.backend!r}")


def routed_layers(model: nn.Module) -> Iterator[RoutedLoRALinear]:
    return (m for m in model.modules() if isinstance(m, RoutedLoRALinear))


def router_aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """Sum of the token routers' load-balancing and z losses from the last forward (zeros if none)."""
    outs = [m.router_output for m in routed_layers(model) if m.router_output is not None]
    if not outs:
        zero = torch.zeros(())
        return {"load_balancing_loss": zero, "z_loss": zero}
    return {"load_balancing_loss": torch.stack([o.load_balancing_loss for o in outs]).sum(),
            "z_loss": torch.stack([o.z_loss for o in outs]).sum()}


@contextmanager
def hold_sequence_gates(model: nn.Module):
    """Within the block, each sequence router keeps the gates of its first call (the prompt) for later calls
    (decoding steps with a KV cache). Released on exit."""
    routers = [m.router for m in routed_layers(model) if isinstance(m.router, SequenceRouter)]
    for r in routers:
        r.hold()
    try:
        yield model
    finally:
        for r in routers:
            r.release()


@contextmanager
def routing_inputs(model: nn.Module, gates: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None):
    """Set external gates and/or the attention mask the sequence routers pool over, for every routed layer."""
    layers = list(routed_layers(model))
    for m in layers:
        if gates is not None:
            m.set_gates(gates)
        m.set_attention_mask(attention_mask)
    try:
        yield model
    finally:
        for m in layers:
            if gates is not None:
                m.set_gates(None)
            m.set_attention_mask(None)
