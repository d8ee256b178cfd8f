"""The ``cuda`` backend: personafuse_kernels._C kernels plus cuBLAS GEMMs (through torch).

Same math and signatures as ops/routed_lora_torch.py, whose stacked forward/backward it reuses with the gate
step swapped for the compiled kernels (csrc/gate/gate_kernels.cu). Decode-sized forwards (T <= 64, fp16/bf16,
no dropout) run the LoRA branch as one cooperative launch on top of the cuBLAS base output
(csrc/lora/decode_kernel.cu). dtypes: float32, float16, bfloat16 on CUDA tensors.
"""
from __future__ import annotations

import functools

import torch

from .._extension import require_extension
from . import routed_lora_torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CudaGateOps:
    @staticmethod
    def forward(H, gates, scaling, seq_len: int):
        require_extension()
        return torch.ops.personafuse.gate_forward(H.contiguous(), gates.float().contiguous(), scaling.float(), seq_len)

    @staticmethod
    def backward(dHg, H, gates, scaling, seq_len: int):
        require_extension()
        return torch.ops.personafuse.gate_backward(
            dHg.contiguous(), H.contiguous(), gates.float().contiguous(), scaling.float(), seq_len
        )


DECODE_MAX_TOKENS = 64  # csrc/personafuse_ops.cpp kDecodeMaxTokens
DECODE_MAX_WIDTH = 12288  # E * r, kDecodeMaxWidth


def use_decode_kernel(x, lora_A, dropout_p: float) -> bool:
    E, r, _ = lora_A.shape
    return (x.shape[0] <= DECODE_MAX_TOKENS and x.shape[0] > 0 and dropout_p == 0.0 and E * r <= DECODE_MAX_WIDTH
            and x.dtype in (torch.float16, torch.bfloat16))


def forward(x, weight, bias, lora_A, lora_B, gates, scaling, seed, seq_len: int, dropout_p: float):
    """Returns (y [T, N], H [T, E*r]); same contract as routed_lora_torch.forward."""
    if use_decode_kernel(x, lora_A, dropout_p):
        require_extension()
        y = torch.nn.functional.linear(x, weight, bias)  # cuBLAS base; the LoRA branch is added in place
        H = torch.ops.personafuse.lora_decode_(y, x, lora_A, lora_B, gates.float().contiguous(),
                                               scaling.float().contiguous(), seq_len)
        return y, H
    return routed_lora_torch.forward(x, weight, bias, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p,
                                     gate_ops=CudaGateOps)


backward = functools.partial(routed_lora_torch.backward, gate_ops=CudaGateOps)
