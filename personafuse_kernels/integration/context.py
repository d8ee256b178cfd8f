"""Model-level routing helpers: find routed layers, collect router losses, set gates and masks for a block."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..modules import RoutedLoRALinear
from ..routing.routers import SequenceRouter

_PERSONA_LOCK = threading.Lock()


def routed_layers(model: nn.Module) -> Iterator[RoutedLoRALinear]:
    return (m for m in model.modules() if isinstance(m, RoutedLoRALinear))


def named_routed_layers(model: nn.Module) -> list[tuple[str, RoutedLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear)]


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
    (decoding steps with a KV cache). Released on exit. model.generate of an injected model does this itself."""
    routers = [m.router for m in routed_layers(model) if isinstance(m.router, SequenceRouter)]
    for r in routers:
        r.hold()
    try:
        yield model
    finally:
        for r in routers:
            r.release()


@contextmanager
def routing_inputs(model: nn.Module, gates: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                   context: Optional[Tensor] = None):
    """For every routed layer, for the block: external gates, the attention mask the sequence routers pool over,
    and/or the context embedding [B, C] the sequence routers read instead (layers built with context_features)."""
    layers = list(routed_layers(model))
    for m in layers:
        if gates is not None:
            m.set_gates(gates)
        if context is not None:
            m.set_context(context)
        m.set_attention_mask(attention_mask)
    try:
        yield model
    finally:
        for m in layers:
            if gates is not None:
                m.set_gates(None)
            if context is not None:
                m.set_context(None)
            m.set_attention_mask(None)


@contextmanager
def persona_gates(model: nn.Module, gates: Tensor):
    """The persona mix of each sequence for the block: gates [batch, E] (or [E] for every sequence).

    Every routed layer of the model uses these gates instead of its router, e.g. around model.generate.
    """
    layers = list(routed_layers(model))
    if not layers:
        raise ValueError("the model has no routed layers: inject_routed_lora or from_peft first")
    E = layers[0].num_experts
    if gates.dim() not in (1, 2) or gates.shape[-1] != E:
        raise ValueError(f"persona gates must be [batch, E] or [E] with E = {E}, got {tuple(gates.shape)}")
    if not gates.is_floating_point():
        raise TypeError(f"persona gates must be floating point, got {gates.dtype}")
    if any(m.merged for m in layers):
        raise RuntimeError("the model is merged with a fixed mix, which persona_gates would not change: unmerge first")
    me = threading.get_ident()
    with _PERSONA_LOCK:  # routed layers hold one mix at a time: a second thread is refused, never silently mixed
        if any(m.persona_thread not in (None, me) for m in layers):
            raise RuntimeError("persona_gates is active on this model in another thread; routed layers hold one mix "
                               "at a time (give each thread its own model copy, or pass gates= to the layers)")
        saved = [(m, m.router_mode, m._external_gates, m.persona_thread) for m in layers]  # nesting restores these
        for m in layers:
            m.router_mode = "external"
            m.set_gates(gates.to(m.lora_A.device))
            m.persona_thread = me
    try:
        yield model
    finally:
        with _PERSONA_LOCK:
            for m, mode, previous, owner in saved:
                m.router_mode = mode
                m.set_gates(previous)
                m.persona_thread = owner
