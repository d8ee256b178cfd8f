"""inject_routed_lora: put routed LoRA layers into an existing model (any transformers model, or any nn.Module).

Targets are matched like peft's target_modules: a module is replaced when the last component of its name
is in the list (or its full name is). nn.Linear layers are wrapped as they are; GPT-2-style Conv1D layers
(weight [in, out]) are converted to an equivalent nn.Linear first. Everything else is frozen.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from ..modules import RoutedLoRALinear
from .context import hold_sequence_gates, routing_inputs

_CHECKED_KWARGS = ("temperature", "capacity_factor", "context_features", "backend")  # RoutedLoRALinear.check_args


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def as_linear(mod: nn.Module, name: str) -> nn.Module:
    """The base layer a routed layer wraps: an nn.Linear as it is (plain or quantized), GPT-2's Conv1D (y = x W + b,
    W [in, out]) transposed once into an nn.Linear, or any other layer with integer in_features and out_features
    (a quantized linear computed by its own kernel), called as it is."""
    if isinstance(mod, nn.Linear):
        return mod
    if _is_conv1d(mod):
        w = mod.weight  # [in, out]
        lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        return lin
    if all(isinstance(getattr(mod, a, None), int) for a in ("in_features", "out_features")):
        return mod
    raise TypeError(f"{name} is a {type(mod).__name__}; only nn.Linear, transformers' Conv1D and layers with "
                    f"in_features / out_features (quantized linears) can be routed")


def find_targets(model: nn.Module, target_modules: Iterable[str]) -> list[tuple[str, nn.Module]]:
    targets = set(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    matches = [(name, mod) for name, mod in model.named_modules()
               if name and (name in targets or name.split(".")[-1] in targets)
               and not isinstance(mod, RoutedLoRALinear)]
    matches = [(n, m) for n, m in matches if not any(n.startswith(p + ".") for p, _ in matches)]  # outermost only
    found = {n.split(".")[-1] for n, _ in matches} | {n for n, _ in matches}
    if missing := sorted(t for t in targets if t not in found):
        raise ValueError(f"target_modules {missing} match no module of {type(model).__name__}")
    return matches


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _wrap_generate(model: nn.Module) -> None:
    """model.generate keeps each sequence router's prompt gates for all decoding steps (KV cache), pooling the
    prompt over its attention mask. Idempotent."""
    generate = getattr(model, "generate", None)
    if generate is None or getattr(generate, "_personafuse_wrapped", False):
        return

    @functools.wraps(generate)
    def generate_with_held_gates(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        with hold_sequence_gates(model), routing_inputs(model, attention_mask=mask):
            return generate(*args, **kwargs)

    generate_with_held_gates._personafuse_wrapped = True
    model.generate = generate_with_held_gates


def _routed(mod, name, num_experts, rank, alpha, dropout, router, top_k, layer_kwargs) -> RoutedLoRALinear:
    return RoutedLoRALinear(as_linear(mod, name), num_experts, rank, alpha=alpha, dropout=dropout, router=router,
                            top_k=top_k, **layer_kwargs)


def install_layers(model: nn.Module, builders: list[tuple[str, Callable[[], nn.Module]]]) -> None:
    """Build every new layer first, then freeze the model and swap them in: a builder that raises leaves the model
    as it was (the layers built before it froze their base linears, which are the model's: that is undone)."""
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    try:
        layers = [(name, build()) for name, build in builders]
    except BaseException:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers:
        replace_module(model, name, layer)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def inject_routed_lora(model: nn.Module, target_modules: Iterable[str], num_experts: int = 10, rank: int = 16,
                       alpha: Optional[float] = 32, dropout: float = 0.0, router: str = "token",
                       top_k: Optional[int] = None, verbose: bool = True, **layer_kwargs) -> nn.Module:
    """Replace the target projections with RoutedLoRALinear; freeze all but adapters and routers.

    top_k (router="token" only): each token uses its k most probable experts (TopKGates).
    With a sequence router, model.generate holds each prompt's gates across decoding steps. Prints how
    many parameters are trainable (verbose). Returns the model (changed in place).
    """
    RoutedLoRALinear.check_args(num_experts, rank, dropout, router, top_k, alpha=alpha,
                                **{k: v for k, v in layer_kwargs.items() if k in _CHECKED_KWARGS})
    matches = find_targets(model, target_modules)
    install_layers(model, [(name, functools.partial(_routed, mod, name, num_experts, rank, alpha, dropout, router,
                                                    top_k, layer_kwargs)) for name, mod in matches])
    _wrap_generate(model)
    if verbose:
        trainable, total = count_parameters(model)
        kinds = sorted({n.split(".")[-1] for n, _ in matches})
        print(f"personafuse: routed {len(matches)} projections ({', '.join(kinds)}) with E={num_experts}, "
              f"r={rank}, router={router}{f' top-{top_k}' if top_k else ''}; "
              f"trainable params {trainable:,} of {total:,} "
              f"({100.0 * trainable / max(total, 1):.2f}%)")
    return model
