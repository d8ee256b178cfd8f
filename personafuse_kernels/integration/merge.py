"""Merge a fixed persona mix into the base weights for zero-overhead inference, and undo it exactly."""
from __future__ import annotations

import torch
import torch.nn as nn

from .context import routed_layers


def merge(model: nn.Module, gates) -> nn.Module:
    """Fold gates [E] (one mix for every token) into every routed layer's W: W += sum_e s_e g_e B_e A_e."""
    layers = list(routed_layers(model))
    if not layers:
        raise ValueError("the model has no routed layers to merge")
    g = torch.as_tensor(gates, dtype=torch.float32)
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"merge needs a finite mix, got {g.tolist()}")
    if g.dim() == 2 and g.shape[0] == 1:
        g = g[0]
    if g.dim() != 1:
        raise ValueError(f"merge folds one mix, gates [E]; got {tuple(g.shape)} (a different mix per sequence "
                         f"cannot be merged into shared weights)")
    if any(m.merged for m in layers):
        raise RuntimeError("the model is already merged: call unmerge(model) first")
    for m in layers:
        if g.shape[0] != m.num_experts:
            raise ValueError(f"gates have {g.shape[0]} experts, the layers {m.num_experts}")
    for m in layers:
        m.merge(g)
    return model


def unmerge(model: nn.Module, discard_updates: bool = False) -> nn.Module:
    """Restore every merged layer's base weight bit for bit. A base weight changed since the merge raises (its
    changes would be lost) unless discard_updates=True; checked for every layer before any is restored."""
    merged = [m for m in routed_layers(model) if m.merged]
    if not merged:
        raise RuntimeError("the model is not merged")
    if not discard_updates and (changed := [m for m in merged if m.changed_since_merge]):
        raise RuntimeError(f"{len(changed)} merged layer(s) had their base weight changed after merge (trained or "
                           f"edited while merged); unmerge would discard those changes: pass discard_updates=True")
    for m in merged:
        m.unmerge(discard_updates=discard_updates)
    return model
