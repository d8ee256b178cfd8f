"""Which backend runs a call.

    torch   stacked GEMMs with an explicit backward; CPU and CUDA, every float dtype; the oracle
    cuda    personafuse_kernels._C kernels (+ cuBLAS); CUDA tensors, fp32/fp16/bf16
    triton  fused Triton kernels; CUDA tensors, fp32/fp16/bf16 (CPU tensors too under TRITON_INTERPRET=1)

An explicit ``backend=`` argument wins, then the PERSONAFUSE_BACKEND environment variable; either fails
loudly when that backend cannot run the call. ``auto`` picks, on a GPU, the backend a measured table names for
the card and the T bucket (ops/dispatch_tables/, from benchmark rows), else triton, cuda, torch in that order;
it silently falls back to ``torch``.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ._extension import extension_error
from .ops.launch_configs import simulated_card, token_bucket


class Backend(NamedTuple):
    """One backend: where its ops live and where it can run. Both modules are in personafuse_kernels/ops/ and
    share their contract with the torch reference (routed_lora_torch.py, routed_lora_topk_torch.py)."""
    name: str
    module: str  # dense-gate ops: forward(), backward()
    topk_module: str | None  # top-k ops over routing metadata: forward(), backward(), saved_like(); None: dense path
    topk_max_block: int  # pairs per routing-metadata block at large T (routing.topk.block_m_for)
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    unavailable: Callable[[], "str | None"]  # why it cannot run on this machine, or None


_ALL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _cuda_unavailable() -> str | None:
    err = extension_error()
    if err is not None:
        return err
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def interpreting() -> bool:
    """Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, read when triton is imported), unless a
    dry run simulates a GPU (ops.launch_configs.simulate_card): launchers then choose as on that GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and simulated_card() is None


def _triton_unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not installed ({exc})"
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA GPU is visible to torch (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return None


# topk_max_block: the torch reference ignores the metadata (16 keeps it small); Triton's grouped kernels tile 64
# pairs (16 under the interpreter, whose cost grows with the tile: topk_block_m); csrc/topk's kMaxBlockPairs is 64.
BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "routed_lora_torch", "routed_lora_topk_torch", 16, ("cpu", "cuda"), _ALL_FLOATS,
                     lambda: None),
    "triton": Backend("triton", "routed_lora_triton", "routed_lora_topk_triton", 64,
                      ("cuda", "cpu") if interpreting() else ("cuda",), _ALL_FLOATS[:3], _triton_unavailable),
    "cuda": Backend("cuda", "routed_lora_cuda", "routed_lora_topk_cuda", 64, ("cuda",), _ALL_FLOATS[:3],
                    _cuda_unavailable),
}
# auto's order of preference on a CUDA device; the first that supports the call wins. CPU: always torch
# (the Triton interpreter is for tests, not speed).
AUTO_ORDER_CUDA = ["triton", "cuda", "torch"]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, e.g. ["torch", "triton", "cuda"]."""
    return [name for name, b in BACKENDS.items() if b.unavailable() is None]


def unavailable_reasons() -> dict[str, str]:
    """For each backend that cannot run here, why not."""
    return {name: why for name, b in BACKENDS.items() if (why := b.unavailable()) is not None}


def _why_not(backend: Backend, device: torch.device, dtype: torch.dtype) -> str | None:
    why = backend.unavailable()
    if why is not None:
        return why
    if device.type not in backend.devices:
        return f"it runs on {', '.join(backend.devices)} tensors, not {device.type}"
    if dtype not in backend.dtypes:
        return f"it supports {', '.join(str(d) for d in backend.dtypes)}, not {dtype}"
    return None


TABLES_DIR = Path(__file__).with_name("ops") / "dispatch_tables"


@functools.lru_cache(maxsize=None)
def measured_table(device_name: str) -> dict:
    """Optional measured choice of backend per T bucket for one GPU: ops/dispatch_tables/<name>.json, e.g.
    {"T<=64": "cuda", "T<=4096": "triton"}, written by benchmarks/make_dispatch_table.py from benchmark rows."""
    path = TABLES_DIR / (device_name.replace(" ", "_") + ".json")
    return json.loads(path.read_text()) if path.exists() else {}


@torch.compiler.assume_constant_result  # torch.compile evaluates it once at trace time: no tracing into the cache
def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype, tokens: int = 0) -> str:
    """The backend name for a call on tensors of this device and dtype (tokens: T, for measured tables)."""
    return _resolve(requested or "auto", os.environ.get("PERSONAFUSE_BACKEND", ""), device.type, dtype,
                    device.index, token_bucket(tokens) if tokens else 0)


@functools.lru_cache(maxsize=256)
def _resolve(requested: str, env: str, device_type: str, dtype: torch.dtype, device_index=None,
             t_bucket: int = 0) -> str:
    """Cached per (argument, environment, device, dtype, T bucket): availability does not change in a process."""
    device = torch.device(device_type)
    name = requested.lower()
    source = "backend="
    if name == "auto" and env:
        name, source = env.strip().lower(), "PERSONAFUSE_BACKEND="
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {source}{name!r}; choose from 'auto', {', '.join(map(repr, BACKENDS))}")
        why = _why_not(BACKENDS[name], device, dtype)
        if why is not None:
            raise RuntimeError(f"{source}{name!r} cannot run this call ({device.type}, {dtype}): {why}")
        return name
    if device.type == "cuda":
        measured = measured_table(torch.cuda.get_device_name(device_index)).get(f"T<={t_bucket}") if t_bucket else None
        order = ([measured] if measured in BACKENDS else []) + AUTO_ORDER_CUDA
        for candidate in order:
            if _why_not(BACKENDS[candidate], device, dtype) is None:
                return candidate
    return "torch"


# Backends with grouped (top-k) kernels; a backend without a topk_module runs top-k gates on the dense path.
TOPK_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.topk_module)


def topk_block_m(name: str, T: int, k: int) -> int:
    """Pairs per routing-metadata block for backend `name` and T tokens of k slots (routing.topk.block_m_for
    capped at the backend's topk_max_block). A pure function of its arguments, so torch.compile traces it."""
    from .routing.topk import block_m_for

    cap = 16 if name == "triton" and interpreting() else BACKENDS[name].topk_max_block
    return block_m_for(T, k, cap)


DEFAULT_TOPK_GROUPED_ABOVE = 360.0  # E * r / k above which grouped wins, from the cost model below


def prefer_grouped(num_experts: int, rank: int, k: int, threshold: float = DEFAULT_TOPK_GROUPED_ABOVE) -> bool:
    """Grouped top-k kernels, or the dense stacked path with zeros off the top-k?

    Grouped when E * r > threshold * k. The default comes from the cost model (docs/dispatch.md, with the card
    figures of docs/cost-model.md for an H100/H200): per token, the dense path adds about 4 * E * r * K FLOP
    (K = N); the grouped path does only k experts' FLOP but gathers x k times and makes k read-modify-write passes
    over y, about k * 6 * K bytes, i.e. k * 1440 * K FLOP at 240 FLOP/byte, so grouped wins when E * r > 360 * k:
    PersonaFuse (E = 10, r = 16) stays dense; E = 64, r = 16, top-2 is grouped. A measured value for a card
    replaces it: "topk_grouped_above" in ops/dispatch_tables/<card>.json, written by
    benchmarks/make_dispatch_table.py from the `topk` preset's grouped and -dense rows.
    """
    return num_experts * rank > threshold * k


@torch.compiler.assume_constant_result
def topk_grouped_threshold(device: torch.device) -> float:
    return _topk_threshold(device.type, device.index)


@functools.lru_cache(maxsize=16)
def _topk_threshold(device_type: str, device_index) -> float:
    if device_type != "cuda":
        return DEFAULT_TOPK_GROUPED_ABOVE
    table = measured_table(torch.cuda.get_device_name(device_index))
    return float(table.get("topk_grouped_above", DEFAULT_TOPK_GROUPED_ABOVE))


def resolve_topk_backend(name: str, num_experts: int, rank: int, k: int, device: torch.device | None = None
                         ) -> str | None:
    """The grouped backend for top-k gates, or None for the dense path (gates scattered to [T, E]).
    `name` is the backend resolve_backend chose for the call; `device` selects a measured threshold."""
    path = os.environ.get("PERSONAFUSE_TOPK_PATH", "auto").lower()  # auto | grouped | dense
    if path not in ("auto", "grouped", "dense"):
        raise ValueError(f"PERSONAFUSE_TOPK_PATH must be auto, grouped or dense; got {path!r}")
    if name not in TOPK_BACKENDS or path == "dense":
        return None
    threshold = topk_grouped_threshold(device) if device is not None else DEFAULT_TOPK_GROUPED_ABOVE
    if path == "grouped" or name == "torch" or prefer_grouped(num_experts, rank, k, threshold):
        return name
    return None


def get_backend_ops(name: str, topk: bool = False):
    """The ops module of a backend: its dense-gate ops, or with topk=True its top-k ops. Imported on first use
    (another backend's, Triton's say, need not be installed). Called inside the custom ops' implementations,
    which torch.compile does not trace (it refuses importlib)."""
    backend = BACKENDS[name]
    module = backend.topk_module if topk else backend.module
    if module is None:
        raise ValueError(f"backend {name!r} has no top-k ops; top-k gates run on its dense path")
    return importlib.import_module(f".ops.{module}", __package__)
