"""Launch helpers shared by the Triton launchers (routed_lora_triton.py, routed_lora_topk_triton.py,
router_triton.py): tile sizes, tl.dot arguments, SM counts and grid arithmetic."""
from __future__ import annotations

import functools

import torch
from triton import cdiv

from ..dispatch import interpreting
from .launch_configs import INTERPRETER, pow2, simulated_card, token_bucket

__all__ = ["cdiv", "check_dot_tiles", "config_key", "device_name", "dot_args", "num_sms", "pow2"]


def dot_args(dtype: torch.dtype) -> dict:
    """DOT_PRECISION: fp32 inputs follow torch's matmul setting (tf32 only when torch allows it); 16-bit inputs
    ignore it. UPCAST: bf16 dot operands go to fp32 under the interpreter only, which multiplies bf16 tl.dot
    operands as raw bits (triton_kernels._mma)."""
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {"DOT_PRECISION": "tf32" if tf32 else "ieee", "UPCAST": interpreting() and dtype == torch.bfloat16}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name, cached per device (the launch-config key; a driver query per call otherwise)."""
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def config_key(x: torch.Tensor, K: int, N: int, C: int) -> tuple:
    """The arguments after ``op`` of launch_configs.get_config for a call on x [T, ...]: the T bucket, the sizes,
    the device name (cached) and whether the interpreter runs the kernels."""
    card = simulated_card()
    if card is not None:
        return token_bucket(x.shape[0]), K, N, C, card[0], False
    interpret = interpreting()
    name = INTERPRETER if interpret or x.device.type != "cuda" else device_name(x.device)
    return token_bucket(x.shape[0]), K, N, C, name, interpret


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (cached per device, not looked up per call); 4 off a GPU (the
    interpreter: few, large programs); the simulated card's count during a dry run."""
    card = simulated_card()
    if card is not None:
        return card[1]
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_dot_tiles(*dims: int) -> None:
    """tl.dot on a GPU needs every tile dim >= 16; the interpreter would accept less, so check it here too."""
    if min(dims) < 16:
        raise AssertionError(f"tl.dot tile dims must be >= 16, got {dims}")
