"""Ops per backend: routed_lora_torch (reference + torch backend), routed_lora_cuda, routed_lora_triton."""
