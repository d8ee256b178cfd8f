"""Routing: gate layouts and the routers that produce gates."""
from .gates import NormalizedGates, normalize_gates, token_gates
from .routers import RouterOutput, SequenceRouter, TokenRouter, router_z_loss, switch_load_balancing_loss
from .topk import RoutingMeta, TopKGates, build_routing_metadata

__all__ = ["NormalizedGates", "normalize_gates", "token_gates", "RouterOutput", "SequenceRouter", "TokenRouter",
           "router_z_loss", "switch_load_balancing_loss", "TopKGates", "RoutingMeta", "build_routing_metadata"]
