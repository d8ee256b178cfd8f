"""Shared test inputs and reference helpers."""
from __future__ import annotations

import torch

from personafuse_kernels.ops.routed_lora_torch import routed_lora_reference
from personafuse_kernels.routing.gates import normalize_gates, token_gates


def make_inputs(T, K, N, E, r, dtype=torch.float32, device="cpu", bias=True, gate_mode="token", batch=None,
                gate_dtype=None):
    """Random inputs (never zeros: lora_B is random here). Returns dict of leaf tensors requiring grad.

    gate_mode: "token" (gates [..., E] like x), "sequence" (x [B, S, K], gates [B, E]),
               "single" (x [T, K], gates [E]: one mix for all tokens).
    """
    g = dict(dtype=dtype, device=device)
    if gate_mode == "sequence":
        B = batch or 2
        x = torch.randn(B, T, K, **g)
        gates = torch.rand(B, E, dtype=gate_dtype or dtype, device=device)
    elif gate_mode == "single":
        x = torch.randn(T, K, **g)
        gates = torch.rand(E, dtype=gate_dtype or dtype, device=device)
    else:
        x = torch.randn(T, K, **g) if batch is None else torch.randn(batch, T, K, **g)
        gates = torch.rand(*x.shape[:-1], E, dtype=gate_dtype or dtype, device=device)
    tensors = {
        "x": x,
        "weight": torch.randn(N, K, **g) / K**0.5,
        "bias": torch.randn(N, **g) if bias else None,
        "lora_A": torch.randn(E, r, K, **g) / K**0.5,
        "lora_B": torch.randn(E, N, r, **g) / r**0.5,
        "gates": gates,
    }
    for t in tensors.values():
        if t is not None:
            t.requires_grad_(True)
    return tensors


def reference(inputs, scaling, keep=None, dropout_p=0.0, dtype=torch.float64):
    """Per-expert loop through autograd on upcast copies; returns (y, grads dict) in `dtype`."""
    up = {k: (None if v is None else v.detach().to(dtype).requires_grad_(True)) for k, v in inputs.items()}
    x = up["x"]
    K = x.shape[-1]
    E = up["lora_A"].shape[0]
    norm = normalize_gates(up["gates"], x.shape, E)
    gates_tok = token_gates(norm.gates, norm.seq_len)
    s = scaling if torch.is_tensor(scaling) else torch.full((E,), float(scaling))
    y = routed_lora_reference(x.reshape(-1, K), up["weight"], up["bias"], up["lora_A"], up["lora_B"], gates_tok,
                              s.to(dtype).to(x.device), keep=keep, dropout_p=dropout_p)
    y = y.view(*x.shape[:-1], -1)
    return y, up


def backward_grads(y, leaves, dy):
    y.backward(dy)
    return {k: v.grad for k, v in leaves.items() if v is not None}


def tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2):
    """A small random Llama built from a config (no download), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_adapters(model, std: float = 0.2, seed: int = 1):
    """Non-zero lora_B and router weights, so adapters and routing change the output."""
    import personafuse_kernels as pfk

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pfk.routed_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
            if m.router is not None:
                m.router.proj.weight.copy_(torch.randn(m.router.proj.weight.shape, generator=g))
    return model
