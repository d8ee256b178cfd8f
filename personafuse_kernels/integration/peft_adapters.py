"""Ordinary peft LoRA adapters as the experts of routed layers, and one expert back out as a peft adapter.

from_peft(model, ["adapters/O+", "adapters/O-", ...]) reads each folder's adapter_config.json and
adapter_model.safetensors (keys "base_model.model.<module>.lora_A.weight" [r, K] and ".lora_B.weight"
[N, r]). Adapter e becomes expert e of every module it targets. Ranks may differ between adapters and
modules: each routed layer takes the largest rank and zero-pads the others (zero rows of A and columns of B
add nothing); each expert keeps its own scaling alpha/r (alpha/sqrt(r) with use_rslora). So gates one-hot on
expert i reproduce peft's output with adapter i active.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..modules import RoutedLoRALinear
from .context import named_routed_layers
from .inject import _wrap_generate, as_linear, replace_module

PREFIX = "base_model.model."
UNSUPPORTED = ("use_dora", "lora_bias")


def _pattern_value(patterns: dict, path: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", path):
            return value
    return default


def read_peft_adapter(folder) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """(config, {module path: (A [r, K], B [N, r], scaling)}) of one peft LoRA adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder (needs adapter_config.json and "
                                f"adapter_model.safetensors)")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')} is not LORA")
    for key in UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"{folder}: {key}=True adapters are not supported by routed LoRA layers")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{folder}: bias={config['bias']!r} adapters train base biases; only bias='none' is supported")
    tensors = load_file(str(w_path))
    modules: dict[str, dict] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{folder}: unsupported tensor {key!r} (only lora_A/lora_B of linear layers)")
        modules.setdefault(m.group(1), {})[m.group(2)] = t
    out = {}
    for path, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{folder}: module {path} has only lora_{''.join(ab)}")
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r:
            raise ValueError(f"{folder}: {path} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}")
        alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[path] = (A, B, float(scaling))
    return config, out


def from_peft(model: nn.Module, adapter_dirs: Sequence, router: str = "external", verbose: bool = True,
              **layer_kwargs) -> nn.Module:
    """Turn E peft LoRA adapters into the E experts of routed layers of `model` (the adapters' base model)."""
    if not adapter_dirs:
        raise ValueError("adapter_dirs is empty")
    adapters = [read_peft_adapter(d) for d in adapter_dirs]
    E = len(adapters)
    paths = sorted({p for _, mods in adapters for p in mods})
    plan = []
    for path in paths:  # every check before any change to the model
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"adapter module {path!r} is not in {type(model).__name__}") from None
        if isinstance(mod, RoutedLoRALinear):
            raise ValueError(f"{path} is already routed")
        lin = as_linear(mod, path)
        experts = [mods.get(path) for _, mods in adapters]
        for e, ex in enumerate(experts):
            if ex is not None and (ex[0].shape[1] != lin.in_features or ex[1].shape[0] != lin.out_features):
                raise ValueError(f"{adapter_dirs[e]}: {path} is [{ex[1].shape[0]} x {ex[0].shape[1]}] in the "
                                 f"adapter but [{lin.out_features} x {lin.in_features}] in the model")
        plan.append((path, lin, experts))
    dropout = max(float(cfg.get("lora_dropout", 0.0) or 0.0) for cfg, _ in adapters)
    for p in model.parameters():
        p.requires_grad_(False)
    for path, lin, experts in plan:
        rank = max(ex[0].shape[0] for ex in experts if ex is not None)
        layer = RoutedLoRALinear(lin, E, rank, dropout=dropout, router=router, **layer_kwargs)
        layer.expert_ranks = [0 if ex is None else ex[0].shape[0] for ex in experts]
        with torch.no_grad():
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            for e, ex in enumerate(experts):
                if ex is None:
                    continue
                A, B, s = ex
                layer.lora_A[e, : A.shape[0]].copy_(A)
                layer.lora_B[e, :, : A.shape[0]].copy_(B)
                layer.scaling[e] = s
        replace_module(model, path, layer)
    _wrap_generate(model)
    if verbose:
        print(f"personafuse: {E} peft adapters -> {len(plan)} routed layers (router={router})")
    return model


def export_peft(model: nn.Module, expert: int, path, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write expert `expert` of every routed layer as a peft LoRA adapter folder that PeftModel loads.

    The expert's scaling is folded into lora_B (lora_alpha = r, so peft's own scaling is 1), and every layer is
    zero-padded to the largest rank, which leaves the output unchanged.
    """
    from safetensors.torch import save_file

    layers = named_routed_layers(model)
    if not layers:
        raise ValueError("the model has no routed layers to export")
    E = layers[0][1].num_experts
    if not 0 <= expert < E:
        raise ValueError(f"expert must be in [0, {E}), got {expert}")
    if any(m.merged for _, m in layers):
        raise RuntimeError("unmerge the model before exporting an adapter")
    r = max(m.rank for _, m in layers)
    tensors = {}
    for name, m in layers:
        A = torch.zeros(r, m.in_features, dtype=m.lora_A.dtype)
        B = torch.zeros(m.out_features, r, dtype=m.lora_B.dtype)
        A[: m.rank] = m.lora_A[expert].detach().cpu()
        B[:, : m.rank] = (m.lora_B[expert].detach().float().cpu() * float(m.scaling[expert])).to(B.dtype)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
              "target_modules": [name for name, _ in layers], "fan_in_fan_out": False, "use_rslora": False,
              "inference_mode": True, "task_type": None, "base_model_name_or_path": base_model_name_or_path}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out
