"""RoutedLoRALinear: a drop-in replacement for nn.Linear with E routed LoRA experts.

    y = base(x) + sum_e scaling_e * g[t, e] * (dropout(x) A_e^T) B_e^T

The base nn.Linear is kept (frozen unless the user unfreezes it); lora_B starts at zero, so a fresh layer
computes exactly its base linear. Gates come from the layer's router ("token" or "sequence"), or from the
caller ("external": set_gates(gates [B, E]) once per batch, or forward(x, gates=...)).
"""
from __future__ import annotations

import math
import numbers
import threading
import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .functional import routed_lora, routed_lora_delta
from .routing.routers import RouterOutput, SequenceRouter, TokenRouter
from .routing.topk import TopKGates

ROUTER_MODES = ("token", "sequence", "external")


def _check_int(name: str, value) -> int:
    """An int >= 1 (a bool is not one, though Python says it is an int)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_real(name: str, value) -> float:
    """A finite real number (NaN or inf here would make every output NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def is_plain_linear(base: nn.Module) -> bool:
    """An nn.Linear whose weight is a plain floating-point tensor: the fused op computes its x W^T itself. Anything
    else with in_features / out_features (bitsandbytes Linear4bit/Linear8bitLt, a torchao-quantized linear, an
    engine's layer) is called as it is, and the routed term is added into its output in place."""
    weight = getattr(base, "weight", None)
    return (type(base) is nn.Linear and type(weight) is nn.Parameter and type(weight.data) is torch.Tensor
            and weight.is_floating_point())


def _wrapped_factory(base: nn.Module) -> dict:
    """Device and dtype of the adapters of a wrapped (quantized) base: its compute dtype (bitsandbytes'
    compute_dtype), else its weight's dtype when that is floating point, else float32."""
    tensors = list(base.parameters()) + list(base.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = getattr(base, "compute_dtype", None)
    weight = getattr(base, "weight", None)
    if dtype is None and isinstance(weight, Tensor) and weight.is_floating_point():
        dtype = weight.dtype
    return {"device": device, "dtype": dtype or torch.float32}


class RoutedLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, num_experts: int, rank: int, alpha: Optional[float] = None,
                 dropout: float = 0.0, router: str = "token", temperature: float = 1.0, backend: str = "auto",
                 top_k: Optional[int] = None, capacity_factor: Optional[float] = None,
                 context_features: Optional[int] = None):
        super().__init__()
        if not isinstance(base, nn.Module) or not all(isinstance(getattr(base, a, None), int) and
                                                      not isinstance(getattr(base, a), bool)
                                                      for a in ("in_features", "out_features")):
            raise TypeError(f"base must be an nn.Linear, or a layer with integer in_features and out_features (a "
                            f"quantized linear), got {type(base).__name__}")
        self.check_args(num_experts, rank, dropout, router, top_k, alpha=alpha, temperature=temperature,
                        capacity_factor=capacity_factor, context_features=context_features, backend=backend)
        K, N = base.in_features, base.out_features
        self.fused_base = is_plain_linear(base)  # else the base is called and the routed term added in place
        factory = ({"device": base.weight.device, "dtype": base.weight.dtype} if self.fused_base
                   else _wrapped_factory(base))
        self.base_layer = base
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
            self.router = TokenRouter(K, num_experts, temperature, top_k=top_k, capacity_factor=capacity_factor,
                                      **factory)
        elif router == "sequence":
            # context_features: route from a given context embedding [B, C] (set_context) instead of pooling x
            self.router = SequenceRouter(K, num_experts, temperature, context_features=context_features, **factory)
        else:
            self.router = None
        # each expert's own rank when adapters of unequal ranks share this padded layout (from_peft sets it): the
        # columns past it are neither computed nor trained; None: every expert has `rank`
        self.expert_ranks: Optional[list] = None
        self._external_gates: Optional[Tensor] = None
        self._attention_mask: Optional[Tensor] = None
        self._context: Optional[Tensor] = None
        self.router_output: Optional[RouterOutput] = None  # last token-router output (aux losses)
        self._unmerged_weight: Optional[Tensor] = None  # exact copy of W while a persona mix is merged
        self._merged_version: Optional[int] = None  # W's version counter right after merge: changed = trained
        self._warned_merged_training = False
        self.merged_gates: Optional[Tensor] = None
        self.persona_thread: Optional[int] = None  # the thread inside persona_gates on this layer, if any
        self.reset_lora_parameters()
        for p in base.parameters():  # last: a constructor that raises leaves the base layer as it was
            p.requires_grad_(False)

    @staticmethod
    def check_args(num_experts, rank, dropout=0.0, router="token", top_k=None, *, alpha=None, temperature=1.0,
                   capacity_factor=None, context_features=None, backend="auto") -> None:
        """Raise ValueError/TypeError for arguments no layer can be built with, before anything is changed (the
        constructor, inject_routed_lora and from_peft call it first)."""
        _check_int("num_experts", num_experts)
        _check_int("rank", rank)
        if router not in ROUTER_MODES:
            raise ValueError(f"router must be one of {ROUTER_MODES}, got {router!r}")
        dropout = _check_real("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if alpha is not None:
            _check_real("alpha", alpha)
        if not _check_real("temperature", temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None:
            _check_int("top_k", top_k)
            if router != "token":
                raise ValueError(f"top_k routing needs router='token' (got router={router!r}); external gates can "
                                 f"be pfk.TopKGates directly")
            if not top_k <= num_experts:
                raise ValueError(f"top_k must be in [1, num_experts = {num_experts}], got {top_k}")
        if capacity_factor is not None:
            if top_k is None:
                raise ValueError("capacity_factor needs top_k (it drops top-k pairs past each expert's capacity)")
            if not _check_real("capacity_factor", capacity_factor) > 0:
                raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        if context_features is not None:
            _check_int("context_features", context_features)
            if router != "sequence":
                raise ValueError(f"context_features needs router='sequence', got router={router!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")

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
        if isinstance(gates, Tensor) and gates.shape[-1] != self.num_experts:
            raise ValueError(f"gates must end in E = {self.num_experts}, got {tuple(gates.shape)}")
        self._external_gates = gates

    def set_attention_mask(self, attention_mask: Optional[Tensor]) -> None:
        """Valid-token mask [B, S] the sequence router pools over; None pools over all tokens."""
        self._attention_mask = attention_mask

    def set_context(self, context: Optional[Tensor]) -> None:
        """Context embedding [B, C] the sequence router reads instead of the pooled input; None clears."""
        if context is not None and self.router_mode != "sequence":
            raise ValueError(f"a context embedding needs router='sequence', this layer has {self.router_mode!r}")
        self._context = context

    def compute_gates(self, x: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        if self.router_mode == "token":
            self.router_output = self.router(x)
            return self.router_output.gates
        if self.router_mode == "sequence":
            return self.router(x, attention_mask=self._attention_mask, context=self._context, cu_seqlens=cu_seqlens)
        g = self._external_gates
        if g is None:
            raise RuntimeError("this RoutedLoRALinear has router='external': call set_gates(gates [B, E]) "
                               "or pass gates= to forward")
        if isinstance(g, Tensor) and g.dim() == 1 and x.dim() >= 3:  # one mix [E] for every sequence of x [..., S, K]
            g = g.expand(*x.shape[:-2], self.num_experts)
        return g

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    @property
    def changed_since_merge(self) -> bool:
        """The base weight was written after merge() (trained or edited while merged): unmerge would lose that."""
        return self.merged and self.base_layer.weight._version != self._merged_version

    @torch.no_grad()
    def merge(self, gates: Tensor) -> None:
        """Fold a fixed mix into W: W += sum_e scaling_e g_e B_e A_e (in float32, then W's dtype).

        gates [E]. While merged, forward is the base linear alone (zero overhead); unmerge() restores W
        bit for bit from a copy kept on the CPU.
        """
        if self.merged:
            raise RuntimeError("this layer is already merged: call unmerge() first")
        if not self.fused_base:
            raise RuntimeError(f"cannot merge into a {type(self.base_layer).__name__} base (quantized or "
                               f"computed elsewhere): its weight is not a float matrix to fold the mix into")
        g = torch.as_tensor(gates, dtype=torch.float32, device=self.lora_A.device)
        if g.shape != (self.num_experts,):
            raise ValueError(f"merge needs one mix of shape [E] = [{self.num_experts}], got {tuple(g.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"merge needs a finite mix, got {g.tolist()} (NaN or inf would be folded into W)")
        weight = self.base_layer.weight
        coef = g * self.scaling.float()  # [E]
        delta = torch.einsum("e,enr,erk->nk", coef, self.lora_B.float(), self.lora_A.float())  # [N, K]
        self._unmerged_weight = weight.detach().to("cpu", copy=True)
        weight.copy_((weight.float() + delta).to(weight.dtype))
        self._merged_version = weight._version
        self.merged_gates = g

    @torch.no_grad()
    def unmerge(self, discard_updates: bool = False) -> None:
        """Restore the exact base weight that merge() changed. If W was changed since the merge (an unfrozen W
        trained while merged), restoring would discard those changes: that raises unless discard_updates=True."""
        if not self.merged:
            raise RuntimeError("this layer is not merged")
        if self.changed_since_merge and not discard_updates:
            raise RuntimeError("the base weight changed after merge (trained or edited while merged); unmerge would "
                               "restore the pre-merge weight and discard those changes: pass discard_updates=True "
                               "to do so")
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self._merged_version = None
        self.merged_gates = None

    def forward(self, x: Tensor, gates: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """x [..., K]; gates: this call's gates instead of the router's. cu_seqlens [B + 1]: x [T, K] packs B
        sequences (flash-attention's varlen convention); per-sequence gates (the sequence router's, or gates [B, E])
        apply to their tokens, per-token gates are per token as ever."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor [..., {self.in_features}], got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., in_features = {self.in_features}], got {tuple(x.shape)}")
        if self.persona_thread is not None and not torch.compiler.is_compiling():
            if self.persona_thread != threading.get_ident():
                raise RuntimeError("this layer is inside persona_gates in another thread, whose mix it would use: "
                                   "routed layers hold one mix at a time; give each thread its own model copy, or "
                                   "pass gates= to the layers")
        if self.merged:
            if gates is not None:
                raise RuntimeError("this layer is merged with a fixed mix (merged_gates), so gates= would be "
                                   "ignored: unmerge() first")
            if self.training and torch.is_grad_enabled() and not self._warned_merged_training:
                self._warned_merged_training = True
                warnings.warn("training a merged routed layer: its forward is the base linear alone, so lora_A, "
                              "lora_B and the router get no gradient; unmerge() before training", stacklevel=2)
            return self.base_layer(x)
        if gates is None:
            gates = self.compute_gates(x, cu_seqlens)
        dropout = self.dropout if self.training else 0.0
        if cu_seqlens is not None and (isinstance(gates, TopKGates) or gates.shape[:-1] == x.shape[:-1]):
            cu_seqlens = None  # per-token gates: the packing does not matter
        if not self.fused_base:  # the base layer computes its own output; the routed term goes into it in place
            y = self.base_layer(x)
            xa = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
            return routed_lora_delta(xa, self.lora_A, self.lora_B, gates, scaling=self.scaling, dropout_p=dropout,
                                     backend=self.backend, out=y, cu_seqlens=cu_seqlens, ranks=self.expert_ranks)
        return routed_lora(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B, gates,
                           scaling=self.scaling, dropout_p=dropout, backend=self.backend, cu_seqlens=cu_seqlens,
                           ranks=self.expert_ranks)

    def extra_repr(self) -> str:
        top_k = getattr(self.router, "top_k", None)
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, router={self.router_mode!r}"
                + (f", top_k={top_k}" if top_k else "") + f", backend={self.backend!r}")
