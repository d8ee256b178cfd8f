"""Putting routed LoRA layers into existing models.

inject_routed_lora replaces named nn.Linear projections (matched by the last component of their module
name, as peft's target_modules) with RoutedLoRALinear and freezes everything else.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch.nn as nn

from .modules import RoutedLoRALinear


def inject_routed_lora(model: nn.Module, target_modules: Iterable[str], num_experts: int = 10, rank: int = 16,
                       alpha: Optional[float] = 32, dropout: float = 0.0, router: str = "token",
                       verbose: bool = True, **layer_kwargs) -> nn.Module:
    """Replace every nn.Linear whose name ends in one of ``target_modules``; freeze all but adapters and routers."""
    targets = set(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    matches = [(name, mod) for name, mod in model.named_modules()
               if name.split(".")[-1] in targets and not isinstance(mod, RoutedLoRALinear)]
    found = {name.split(".")[-1] for name, _ in matches}
    if missing := sorted(targets - found):
        raise ValueError(f"target_modules {missing} match no module of {type(model).__name__}")
    for name, mod in matches:
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name} is a {type(mod).__name__}, not an nn.Linear: it cannot be routed")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RoutedLoRALinear(mod, num_experts, rank, alpha=alpha, dropout=dropout, router=router,
                                                **layer_kwargs))
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"personafuse: routed {len(matches)} projections ({', '.join(sorted(found))}) with E={num_experts}, "
              f"r={rank}, router={router}; trainable params {trainable:,} of {total:,} "
              f"({100.0 * trainable / max(total, 1):.2f}%)")
    return model
