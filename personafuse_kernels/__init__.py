"""personafuse-kernels: fused routed multi-adapter LoRA (PersonaFuse) for training and inference.

    y = x W^T + b + sum_e s_e * g[t, e] * (drop(x) A_e^T) B_e^T

Public API:
    routed_lora(x, weight, bias, lora_A, lora_B, gates, scaling=1.0, dropout_p=0.0, backend="auto")
    routed_lora_delta(x, lora_A, lora_B, gates, ..., out=None): the routed term alone, added into out in place
    available_backends()
    RoutedLoRALinear.from_linear(linear, num_experts=10, rank=16, alpha=32, dropout=0.0, router="token")
    TokenRouter, SequenceRouter
    inject_routed_lora, from_peft, export_peft, save_adapters, load_adapters, merge, unmerge,
    persona_gates, hold_sequence_gates, routing_inputs, router_aux_losses
"""
from .build_info import build_info
from .dispatch import available_backends, unavailable_reasons
from .functional import routed_lora, routed_lora_delta
from .integration import (
                          export_peft,
                          from_peft,
                          hold_sequence_gates,
                          inject_routed_lora,
                          load_adapters,
                          merge,
                          named_routed_layers,
                          persona_gates,
                          routed_layers,
                          router_aux_losses,
                          routing_inputs,
                          save_adapters,
                          unmerge,
)
from .modules import RoutedLoRALinear
from .routing import RouterOutput, SequenceRouter, TokenRouter, TopKGates
from .version import __version__

__all__ = [
    "__version__", "routed_lora", "routed_lora_delta", "available_backends", "unavailable_reasons", "build_info",
    "RoutedLoRALinear", "TokenRouter", "SequenceRouter", "RouterOutput", "TopKGates",
    "inject_routed_lora", "from_peft", "export_peft", "save_adapters", "load_adapters", "merge", "unmerge",
    "persona_gates", "router_aux_losses", "hold_sequence_gates", "routed_layers", "named_routed_layers",
    "routing_inputs",
]
