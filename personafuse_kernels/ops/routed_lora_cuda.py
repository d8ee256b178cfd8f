"""The ``cuda`` backend: cuBLAS GEMMs (through torch) plus the gate kernels of personafuse_kernels._C.

Same math and signatures as ops/routed_lora_torch.py, whose forward/backward it reuses with the gate step
swapped for the compiled kernels (csrc/gate/gate_kernels.cu); fused kernels replace more of it later.
dtypes: float32, float16, bfloat16 on CUDA tensors.
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


forward = functools.partial(routed_lora_torch.forward, gate_ops=CudaGateOps)
backward = functools.partial(routed_lora_torch.backward, gate_ops=CudaGateOps)
