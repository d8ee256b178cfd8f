"""Integration: inject into models, peft adapters in and out, checkpoints, merging, routing contexts."""
from .checkpoint import load_adapters, save_adapters
from .context import (
                      hold_sequence_gates,
                      named_routed_layers,
                      persona_gates,
                      routed_layers,
                      router_aux_losses,
                      routing_inputs,
)
from .inject import inject_routed_lora
from .merge import merge, unmerge
from .peft_adapters import export_peft, from_peft

__all__ = ["inject_routed_lora", "from_peft", "export_peft", "save_adapters", "load_adapters", "merge", "unmerge",
           "persona_gates", "hold_sequence_gates", "routing_inputs", "routed_layers", "named_routed_layers",
           "router_aux_losses"]
