"""Adapter checkpoints: every routed layer's experts, scaling and router, as safetensors plus a JSON config.

    ckpt/personafuse_config.json    {"format": "personafuse-adapters", "version": 2, "save_id": ..., "layers": {...}}
    ckpt/adapters.safetensors       "<layer name>.<tensor>" for lora_A, lora_B, scaling and router weights;
                                    its metadata holds the same save_id

Guarantees:
- Loading checks the whole checkpoint against the model before copying anything (layers, experts, ranks, features,
  router kind and settings: temperature, top_k, capacity_factor, context_features; tensor names, shapes and
  finiteness; the format version): a mismatch raises and leaves the model unchanged. A merged model is refused.
- Saving writes each file under a temporary name in the folder and renames it into place (os.replace, atomic on
  POSIX), weights first. The two files carry one save_id, so a pair mixed by a crash between the two renames, or
  read while another process saves, is refused at load instead of loading new weights with an old config. A failed
  save removes its temporary files; other files in the folder are never touched.
"""
from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .context import named_routed_layers

CONFIG_NAME = "personafuse_config.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT = "personafuse-adapters"
VERSION = 2  # 2: router settings and save_id; 1: neither (still read, with a warning)
ROUTER_SETTINGS = ("temperature", "top_k", "capacity_factor", "context_features")


def _router_settings(m) -> dict:
    r = m.router
    context = None
    if r is not None and m.router_mode == "sequence" and r.proj.in_features != m.in_features:
        context = r.proj.in_features
    return {"temperature": None if r is None else r.temperature, "top_k": getattr(r, "top_k", None),
            "capacity_factor": getattr(r, "capacity_factor", None), "context_features": context}


def _layer_config(m) -> dict:
    return {"num_experts": m.num_experts, "rank": m.rank, "alpha": m.alpha, "in_features": m.in_features,
            "out_features": m.out_features, "router": m.router_mode, "dropout": m.dropout,
            "expert_ranks": None if m.expert_ranks is None else list(m.expert_ranks), **_router_settings(m)}


def _layer_tensors(m) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in m.state_dict().items() if not k.startswith("base_layer.")}
    tensors["scaling"] = m.scaling
    return tensors


def _write_atomically(target: Path, write) -> Path:
    """write(tmp_path) into a temporary file beside `target`; returns the temporary path (renamed by the caller)."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    write(tmp)
    return tmp


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
    save_id = uuid.uuid4().hex
    config = {"format": FORMAT, "version": VERSION, "save_id": save_id,
              "layers": {name: _layer_config(m) for name, m in layers}}
    temps = []
    try:
        temps.append(_write_atomically(out / WEIGHTS_NAME, lambda p: save_file(
            tensors, str(p), metadata={"format": FORMAT, "save_id": save_id})))
        temps.append(_write_atomically(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=1))))
        os.replace(temps[0], out / WEIGHTS_NAME)  # a crash between these two renames leaves a pair whose
        os.replace(temps[1], out / CONFIG_NAME)   # save_ids differ: refused at load
    except BaseException:
        for t in temps:
            t.unlink(missing_ok=True)
        raise
    return out


def _read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a checkpoint folder, with the format, version and save_id pairing checked."""
    from safetensors import safe_open

    if not (folder / CONFIG_NAME).exists() or not (folder / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{folder} is not a personafuse adapter checkpoint "
                                f"(needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("layers"), dict):
        raise ValueError(f"{folder / CONFIG_NAME} is not a {FORMAT} config")
    version = config.get("version")
    if version not in (1, VERSION):
        raise ValueError(f"{folder / CONFIG_NAME} has format version {version!r}; this personafuse-kernels reads "
                         f"versions 1 and {VERSION} (a newer release wrote it?)")
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        weights_id = (f.metadata() or {}).get("save_id")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if version == 1:
        warnings.warn(f"{folder} is a version-1 checkpoint: it records no router settings and no save id, so "
                      f"those cannot be checked; save it again to upgrade", stacklevel=3)
    elif weights_id != config.get("save_id"):
        raise ValueError(f"{folder}: {WEIGHTS_NAME} and {CONFIG_NAME} come from different saves (save_id "
                         f"{weights_id} vs {config.get('save_id')}): a save was interrupted or is in progress; "
                         f"nothing was loaded")
    return config, tensors


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Load a checkpoint written by save_adapters into a model with the same routed layers."""
    folder = Path(path)
    layers = dict(named_routed_layers(model))
    if merged := sorted(name for name, m in layers.items() if m.merged):
        raise RuntimeError(f"unmerge the model before loading adapters (merged layers: {merged[:3]}); loading into "
                           f"a merged layer would not change its output")
    config, tensors = _read_checkpoint(folder)
    problems = []
    if missing := sorted(set(config["layers"]) - set(layers)):
        problems.append(f"layers in the checkpoint but not routed in the model: {missing[:5]}")
    if extra := sorted(set(layers) - set(config["layers"])):
        problems.append(f"routed layers of the model missing from the checkpoint: {extra[:5]}")
    plan, expected = [], set()
    keys = ("num_experts", "rank", "in_features", "out_features", "router")
    if config["version"] >= 2:
        keys += ROUTER_SETTINGS
    for name in sorted(set(layers) & set(config["layers"])):
        m, saved = layers[name], config["layers"][name]
        mine = _layer_config(m)
        for key in keys:
            if saved.get(key) != mine[key]:
                problems.append(f"{name}: {key} is {saved.get(key)} in the checkpoint, {mine[key]} in the model")
        for key, current in _layer_tensors(m).items():
            full = f"{name}.{key}"
            expected.add(full)
            t = tensors.get(full)
            if t is None:
                problems.append(f"{full} is missing from {WEIGHTS_NAME}")
            elif t.shape != current.shape:
                problems.append(f"{full} has shape {tuple(t.shape)} in the checkpoint, "
                                f"{tuple(current.shape)} in the model")
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                problems.append(f"{full} holds {bad} NaN or infinite value(s)")
            else:
                plan.append((current, t))
    if unknown := sorted(set(tensors) - expected):
        problems.append(f"{len(unknown)} tensor(s) in {WEIGHTS_NAME} that no routed layer has: {unknown[:5]}")
    if problems:
        raise ValueError("checkpoint does not match the model; nothing was loaded:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for current, t in plan:
            current.copy_(t)
    for name in sorted(set(layers) & set(config["layers"])):  # each expert's own rank, when the checkpoint has it
        ranks = config["layers"][name].get("expert_ranks")
        layers[name].expert_ranks = None if ranks is None else list(ranks)
    return model

