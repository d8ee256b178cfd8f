"""Ordinary peft LoRA adapters as the experts of routed layers, and one expert back out as a peft adapter.

from_peft(model, ["adapters/O+", "adapters/O-", ...]) reads each folder's adapter_config.json and
adapter_model.safetensors (keys "base_model.model.<module>.lora_A.weight" [r, K] and ".lora_B.weight"
[N, r]). Adapter e becomes expert e of every module it targets. Ranks may differ between adapters and
modules: each routed layer takes the largest rank and zero-pads the others (zero rows of A and columns of B
add nothing); each expert keeps its own scaling alpha/r (alpha/sqrt(r) with use_rslora). So gates one-hot on
expert i reproduce peft's output with adapter i active.
"""
from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..modules import RoutedLoRALinear
from .context import named_routed_layers
from .inject import _CHECKED_KWARGS, _wrap_generate, as_linear, install_layers

PREFIX = "base_model.model."
UNSUPPORTED = ("use_dora", "lora_bias")


MAX_PATTERN_LENGTH = 1000


def _re_internals():
    """(parser, constants) of the `re` module that peft matches the keys with."""
    try:
        from re import _constants, _parser
    except ImportError:  # Python < 3.11
        import sre_constants as _constants
        import sre_parse as _parser
    return _parser, _constants


def _repeat_hazard(parsed) -> bool:
    """True when a repeated group (max > 1) holds an unbounded repeat or an alternation: "(a+)+", "(.*a){30}",
    "(a|b)*". Those can backtrack exponentially on a name that does not match; sane keys ("q_proj",
    "layers\\.0\\..*_proj", "v_proj|q_proj") have none."""
    C = _re_internals()[1]

    def walk(items, inside_repeat: bool) -> bool:
        for op, arg in items:
            if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
                _, hi, body = arg
                if inside_repeat and hi == C.MAXREPEAT:
                    return True
                if walk(body, inside_repeat or hi > 1):
                    return True
            elif op is C.BRANCH:
                if inside_repeat or any(walk(branch, inside_repeat) for branch in arg[1]):
                    return True
            elif op is C.SUBPATTERN:
                if walk(arg[-1], inside_repeat):
                    return True
            elif op in (C.ASSERT, C.ASSERT_NOT):
                if walk(arg[1], inside_repeat):
                    return True
        return False

    return walk(parsed, False)


def check_pattern_key(key, field: str, folder) -> str:
    """A key of alpha_pattern / rank_pattern: a non-empty string, a valid regular expression, and not one whose
    matching cost can explode (keys come from a JSON file; peft's own matcher hangs on such keys)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{folder}: {field} keys must be non-empty strings, got {key!r}")
    if len(key) > MAX_PATTERN_LENGTH:
        raise ValueError(f"{folder}: {field} key of {len(key)} characters (at most {MAX_PATTERN_LENGTH})")
    try:
        parsed = _re_internals()[0].parse(key)  # peft wraps it as (.*\.)?(key)$, which adds no nesting
    except re.error as exc:
        raise ValueError(f"{folder}: {field} key {key!r} is not a valid regular expression ({exc})") from None
    if _repeat_hazard(parsed):
        raise ValueError(f"{folder}: {field} key {key!r} nests repetition (a repeated group holding '*', '+' or "
                         f"'|'), which can take exponential time to match; write it without nesting")
    return key


def pattern_key(keys, path: str) -> str:
    """The first key of a pattern dict that matches the module path, else the path itself: peft's own rule
    (peft.utils.other.get_pattern_key, used when peft is installed), so patterns scale the same layers."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:
        for key in keys:
            if re.match(rf"(.*\.)?({key})$", path):
                return key
        return path
    return get_pattern_key(list(keys), path)


def _number(config: dict, field: str, default, folder, integer: bool = False):
    value = config.get(field, default)
    if value is None:
        value = default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"{folder}: {field} must be a finite {'integer' if integer else 'number'}, got "
                         f"{value!r} ({type(value).__name__})")
    return value


def _flag(config: dict, field: str, folder) -> bool:
    value = config.get(field, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{folder}: {field} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def check_peft_config(config, folder) -> dict:
    """The fields of adapter_config.json that change what is computed, each checked for its JSON type; returns
    {"alpha", "use_rslora", "dropout", "alpha_pattern"}."""
    if not isinstance(config, dict):
        raise ValueError(f"{folder}: adapter_config.json must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise ValueError(f"{folder}: peft_type must be \"LORA\", got {peft_type!r}")
    for key in UNSUPPORTED:
        if _flag(config, key, folder):
            raise ValueError(f"{folder}: {key}=True adapters are not supported by routed LoRA layers")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(f"{folder}: bias must be \"none\" (adapters that train base biases are not supported), "
                         f"got {bias!r}")
    dropout = _number(config, "lora_dropout", 0.0, folder)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{folder}: lora_dropout must be in [0, 1), got {dropout}")
    patterns = {}
    for field in ("alpha_pattern", "rank_pattern"):
        value = config.get(field) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{folder}: {field} must be a JSON object, got {type(value).__name__}")
        for key, v in value.items():
            check_pattern_key(key, field, folder)
            _number({field: v}, field, None, folder, integer=field == "rank_pattern")
        patterns[field] = value
    return {"alpha": _number(config, "lora_alpha", 8, folder), "use_rslora": _flag(config, "use_rslora", folder),
            "dropout": float(dropout), "alpha_pattern": patterns["alpha_pattern"]}


def read_peft_adapter(folder) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """(config, {module path: (A [r, K], B [N, r], scaling)}) of one peft LoRA adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder (needs adapter_config.json and "
                                f"adapter_model.safetensors)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder}: adapter_config.json is not valid JSON ({exc})") from None
    fields = check_peft_config(config, folder)
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
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or A.shape[0] < 1:
            raise ValueError(f"{folder}: {path} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                             f"expected [r, K] and [N, r] with r >= 1")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValueError(f"{folder}: {path} has lora_A {A.dtype} and lora_B {B.dtype}; expected floating point")
        r = A.shape[0]
        alpha = fields["alpha_pattern"].get(pattern_key(fields["alpha_pattern"], path), fields["alpha"])
        scaling = alpha / math.sqrt(r) if fields["use_rslora"] else alpha / r
        out[path] = (A, B, float(scaling))
    return {**config, "lora_dropout": fields["dropout"]}, out


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
    dropout = max(cfg["lora_dropout"] for cfg, _ in adapters)
    ranks = [max(ex[0].shape[0] for ex in experts if ex is not None) for _, _, experts in plan]
    RoutedLoRALinear.check_args(E, max(ranks), dropout, router,
                                **{k: v for k, v in layer_kwargs.items() if k in _CHECKED_KWARGS})
    install_layers(model, [(path, functools.partial(_expert_layer, lin, experts, rank, dropout, router, layer_kwargs))
                           for (path, lin, experts), rank in zip(plan, ranks)])
    _wrap_generate(model)
    if verbose:
        print(f"personafuse: {E} peft adapters -> {len(plan)} routed layers (router={router})")
    return model


def _expert_layer(lin, experts, rank, dropout, router, layer_kwargs) -> RoutedLoRALinear:
    """A routed layer whose expert e is adapter e's (A, B, scaling) for this module, zero-padded to `rank`."""
    layer = RoutedLoRALinear(lin, len(experts), rank, dropout=dropout, router=router, **layer_kwargs)
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
    return layer


def export_peft(model: nn.Module, expert: int, path, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write expert `expert` of every routed layer as a peft LoRA adapter folder that PeftModel loads.

    The expert's scaling is folded into lora_B (lora_alpha = r, so peft's own scaling is 1). Each layer is written
    at this expert's own rank there (expert_ranks, else the layer's rank; rank_pattern/alpha_pattern when layers
    differ), and a layer where the expert has rank 0 is left out.
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
    own = [(name, m, m.rank if m.expert_ranks is None else int(m.expert_ranks[expert])) for name, m in layers]
    own = [(name, m, rl) for name, m, rl in own if rl > 0]
    if not own:
        raise ValueError(f"expert {expert} has rank 0 in every routed layer: there is no adapter to export")
    r = max(rl for _, _, rl in own)
    tensors = {}
    for name, m, rl in own:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A[expert, :rl].detach().cpu().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (m.lora_B[expert, :, :rl].detach().float().cpu()
                                                   * float(m.scaling[expert])).to(m.lora_B.dtype).contiguous()
    pattern = {name: rl for name, _, rl in own if rl != r}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
              "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": [name for name, _, _ in own], "fan_in_fan_out": False, "use_rslora": False,
              "inference_mode": True, "task_type": None, "base_model_name_or_path": base_model_name_or_path}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out
