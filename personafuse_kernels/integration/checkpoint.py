"""Adapter checkpoints: every routed layer's experts, scaling and router, as safetensors plus a JSON config.

    ckpt/personafuse_config.json    {"format": "personafuse-adapters", "version": 1, "layers": {name: {...}}}
    ckpt/adapters.safetensors       "<layer name>.<tensor>" for lora_A, lora_B, scaling and router weights

Loading checks the whole checkpoint against the model (same layers, experts, ranks, features, router) before
copying anything: a mismatch raises ValueError and leaves the model unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .context import named_routed_layers

CONFIG_NAME = "personafuse_config.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT = "personafuse-adapters"


def _layer_config(m) -> dict:
    return {"num_experts": m.num_experts, "rank": m.rank, "alpha": m.alpha, "in_features": m.in_features,
            "out_features": m.out_features, "router": m.router_mode, "dropout": m.dropout}


def _layer_tensors(m) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in m.state_dict().items() if not k.startswith("base_layer.")}
    tensors["scaling"] = m.scaling
    return tensors


def save_adapters(model: nn.Module, path) -> Path:
    """Write the routed layers' adapters and routers to the folder `path` (created if needed)."""
    from safetensors.torch import save_file

    layers = named_routed_layers(model)
    if not layers:
        raise ValueError("the model has no routed layers to save")
    if any(m.merged for _, m in layers):
        raise RuntimeError("unmerge the model before saving adapters")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in layers for k, v in _layer_tensors(m).items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": 1, "layers": {name: _layer_config(m) for name, m in layers}}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return out


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Load a checkpoint written by save_adapters into a model with the same routed layers."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG_NAME).exists() or not (folder / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{folder} is not a personafuse adapter checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_NAME} is not a {FORMAT} config")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    layers = dict(named_routed_layers(model))
    problems = []
    if missing := sorted(set(config["layers"]) - set(layers)):
        problems.append(f"layers in the checkpoint but not routed in the model: {missing[:5]}")
    if extra := sorted(set(layers) - set(config["layers"])):
        problems.append(f"routed layers of the model missing from the checkpoint: {extra[:5]}")
    plan = []
    for name in sorted(set(layers) & set(config["layers"])):
        m, saved = layers[name], config["layers"][name]
        mine = _layer_config(m)
        for key in ("num_experts", "rank", "in_features", "out_features", "router"):
            if saved.get(key) != mine[key]:
                problems.append(f"{name}: {key} is {saved.get(key)} in the checkpoint, {mine[key]} in the model")
        for key, current in _layer_tensors(m).items():
            t = tensors.get(f"{name}.{key}")
            if t is None:
                problems.append(f"{name}.{key} is missing from {WEIGHTS_NAME}")
            elif t.shape != current.shape:
                problems.append(f"{name}.{key} has shape {tuple(t.shape)} in the checkpoint, "
                                f"{tuple(current.shape)} in the model")
            else:
                plan.append((current, t))
    if problems:
        raise ValueError("checkpoint does not match the model; nothing was loaded:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for current, t in plan:
            current.copy_(t)
    return model
