"""What the benchmarks compare: the routed LoRA op as users would otherwise compute it, and our backends.

Every provider computes y = x W^T + b + sum_e s_e g[t, e] (x A_e^T) B_e^T with x [T, K], W [N, K], b [N],
A [E, r, K], B [E, N, r], g [T, E] float32, s [E] float32.
    base      F.linear alone (cuBLAS on a GPU): the denominator of every ratio
    loop      per-expert loop through autograd (peft's X-LoRA and most mixture-of-LoRA code)
    stacked   two stacked GEMMs plus an elementwise gate, autograd through ops (careful hand-written torch)
    compile   torch.compile of stacked
    xlora     peft's own X-LoRA layer (XLoraLinearLayer over a peft LoRA Linear holding the E adapters)
    torch / triton / cuda   personafuse_kernels.routed_lora(backend=...)
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import available_backends
from ..functional import routed_lora
from ..ops.routed_lora_torch import routed_lora_reference

PROVIDERS = ["base", "loop", "xlora", "stacked", "compile", "torch", "triton", "cuda", "triton-dense", "cuda-dense"]
OUR_BACKENDS = ("torch", "triton", "cuda")
# "<backend>-dense": our backend given top-k gates densified (zeros off the top-k), i.e. its dense path; beside
# "<backend>" (its grouped path under PERSONAFUSE_TOPK_PATH=grouped) it measures the grouped-vs-dense rule.


def loop_lora(x, W, b, A, B, g, s):
    """The per-expert loop (how peft's X-LoRA computes the layer): the package's own reference, no dropout."""
    return routed_lora_reference(x, W, b, A, B, g, s)


def stacked_lora(x, W, b, A, B, g, s):
    T, K = x.shape
    E, r, _ = A.shape
    H = x @ A.reshape(E * r, K).t()
    Hg = (H.view(T, E, r) * (g * s).to(x.dtype)[:, :, None]).view(T, E * r)
    return torch.addmm(F.linear(x, W, b), Hg, B.permute(1, 0, 2).reshape(-1, E * r).t())


def xlora_provider():
    """peft's XLoraLinearLayer, built once per weight set (the adapters copied into a peft lora.Linear); the gates
    are X-LoRA's scalings [1, T, 1, E]. Gradients reach x and the gates (peft's copies of A and B train too)."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from peft.tuners.xlora.layer import XLoraLinearLayer

    built = {}

    class Holder(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

    def build(W, b, A, B, s):
        E, r, K = A.shape
        base = nn.Linear(K, W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            base.weight.copy_(W)
            if b is not None:
                base.bias.copy_(b)

        def config(e):  # per-expert scaling through lora_alpha = s_e * r
            return LoraConfig(r=r, lora_alpha=float(s[e]) * r, lora_dropout=0.0, target_modules=["proj"])

        model = get_peft_model(Holder(base), config(0), adapter_name="e0")  # the public API, stable across versions
        for e in range(1, E):
            model.add_adapter(f"e{e}", config(e))
        target = model.base_model.model.proj  # peft's lora.Linear holding all E adapters
        target.set_adapter([f"e{e}" for e in range(E)])
        target.to(device=W.device, dtype=W.dtype)
        with torch.no_grad():
            for e in range(E):
                target.lora_A[f"e{e}"].weight.copy_(A[e])
                target.lora_B[f"e{e}"].weight.copy_(B[e])
        config = SimpleNamespace(top_k_lora=None, enable_softmax_topk=False, global_scaling_weight=1.0)
        layer = XLoraLinearLayer(SimpleNamespace(disabled=False), target, target.forward, 0, config)
        return layer

    def run(x, W, b, A, B, g, s):
        key = (id(W), id(A), id(B))
        if key not in built:
            built.clear()
            built[key] = build(W, b, A, B, s)
        return built[key].forward(x[None], scalings=g[None, :, None, :])[0]

    return run


def unavailable(name: str, device: str) -> str | None:
    """Why a provider cannot run on this device, or None."""
    if name not in PROVIDERS:
        return f"unknown provider {name!r}"
    if name == "xlora":
        try:
            import peft.tuners.xlora.layer  # noqa: F401
        except ImportError as exc:
            return f"peft with X-LoRA is not installed ({exc})"
    backend = name.removesuffix("-dense")
    if backend in OUR_BACKENDS and backend not in available_backends():
        from ..dispatch import unavailable_reasons

        return unavailable_reasons().get(backend, "unavailable")
    if backend in ("triton", "cuda") and device != "cuda":
        return "needs a CUDA device"
    return None


def make_provider(name: str):
    if name == "base":
        return lambda x, W, b, A, B, g, s: F.linear(x, W, b)
    if name == "loop":
        return loop_lora
    if name == "stacked":
        return stacked_lora
    if name == "compile":
        return torch.compile(stacked_lora, dynamic=False)
    if name == "xlora":
        return xlora_provider()
    backend = name.removesuffix("-dense")  # -dense providers get dense gates from the caller
    if backend in OUR_BACKENDS:
        return lambda x, W, b, A, B, g, s: routed_lora(x, W, b, A, B, g, scaling=s, backend=backend)
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


@contextmanager
def per_expert_loop(model: nn.Module):
    """Within the block, the model's routed layers compute with the per-expert loop (through autograd)
    instead of personafuse_kernels: the baseline of the end-to-end comparisons."""
    from ..integration.context import routed_layers
    from ..routing.gates import normalize_gates, token_gates

    layers = list(routed_layers(model))

    def loop_forward(layer, x, gates=None):
        if gates is None:
            gates = layer.compute_gates(x)
        K = x.shape[-1]
        norm = normalize_gates(gates, x.shape, layer.num_experts)
        g = token_gates(norm.gates, norm.seq_len).float()
        y = loop_lora(x.reshape(-1, K), layer.weight, layer.bias, layer.lora_A, layer.lora_B, g, layer.scaling)
        return y.view(*x.shape[:-1], -1)

    for layer in layers:
        layer.forward = loop_forward.__get__(layer)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward
