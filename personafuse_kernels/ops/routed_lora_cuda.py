"""The ``cuda`` backend: personafuse_kernels._C kernels plus cuBLAS GEMMs (through torch).

Same math and signatures as ops/routed_lora_torch.py, whose forward/backward flow it reuses with its own
kernels swapped in (CudaGateOps):
  - decode-sized forwards (T <= 64, fp16/bf16, no dropout): one cooperative launch (csrc/lora/decode_kernel.cu);
    up to 8 tokens it is the whole layer, streaming W once with the adapters in the same pass; beyond that, and
    into a base output computed elsewhere (routed_lora_delta), it adds the LoRA term to cuBLAS's base output;
  - otherwise, fp16/bf16 with r <= 128 on sm_80+: the two narrow GEMMs on tensor cores with the gate fused into their
    epilogues, shrink (dropout on load) -> (H, Hg) and dHg -> (dH, dgates) (csrc/lora/shrink_kernel.cu,
    dhg_kernel.cu); the wide GEMMs (base, expand accumulated into the base output, dA, dB, dx) in cuBLAS;
  - float32, or r > 128: cuBLAS GEMMs with the gate kernels (csrc/gate/gate_kernels.cu).
PERSONAFUSE_CUDA_TENSOR_CORES=0 turns the tensor-core kernels off (the cuBLAS + gate-kernel path instead).
"""
from __future__ import annotations

import functools
import os

import torch

from .._extension import require_extension
from ..routing.gates import row_sums, token_gates
from . import routed_lora_torch

TENSOR_CORE_MAX_RANK = 128  # csrc/include/pfk_lora.h kTensorCoreMaxRank


def kernel_ops():
    """torch.ops.personafuse with the extension loaded. Tests substitute the build of the same C++ against the CPU
    emulation of CUDA (tests/emu.py), so this module and routed_lora_topk_cuda.py run in CI without a GPU."""
    require_extension()
    return torch.ops.personafuse


def use_tensor_core_kernels(x: torch.Tensor, r: int) -> bool:
    """fp16/bf16, r <= 128, an sm_80+ GPU (bf16 WMMA), and not turned off by PERSONAFUSE_CUDA_TENSOR_CORES=0."""
    return (x.dtype in (torch.float16, torch.bfloat16) and r <= TENSOR_CORE_MAX_RANK
            and os.environ.get("PERSONAFUSE_CUDA_TENSOR_CORES", "1") != "0" and _sm80_or_newer(x.device))


@functools.lru_cache(maxsize=None)
def _sm80(index) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _sm80_or_newer(device: torch.device) -> bool:
    return device.type != "cuda" or _sm80(device.index)  # CPU: the emulated build in tests


def _kernel_layout(gates, seq_len):
    """(gates, seq_len) as the CUDA kernels take them: a row map (packed sequences) becomes per-token gates [T, E]
    with seq_len 1 (the kernels index rows as t // seq_len; the Triton backend reads the map in place)."""
    if isinstance(seq_len, torch.Tensor):
        return token_gates(gates, seq_len), 1
    return gates, seq_len


class CudaGateOps(routed_lora_torch.TorchGateOps):
    @staticmethod
    def forward(H, gates, scaling, seq_len):
        g, rows = _kernel_layout(gates, seq_len)
        return kernel_ops().gate_forward(H.contiguous(), g.float().contiguous(), scaling.float(), rows)

    @staticmethod
    def backward(dHg, H, gates, scaling, seq_len):
        g, rows = _kernel_layout(gates, seq_len)
        dH, dg = kernel_ops().gate_backward(dHg.contiguous(), H.contiguous(), g.float().contiguous(), scaling.float(),
                                            rows)
        return dH, row_sums(dg, gates.shape[0], seq_len) if isinstance(seq_len, torch.Tensor) else dg

    @classmethod
    def shrink(cls, x, lora_A, gates, scaling, seed, seq_len, dropout_p: float):
        if not use_tensor_core_kernels(x, lora_A.shape[1]):
            return super().shrink(x, lora_A, gates, scaling, seed, seq_len, dropout_p)
        g, rows = _kernel_layout(gates, seq_len)
        return kernel_ops().lora_shrink(x.contiguous(), lora_A.contiguous(), g.float().contiguous(),
                                        scaling.float().contiguous(), seed, rows, dropout_p)

    @classmethod
    def dhg_backward(cls, dy, lora_B, H, gates, scaling, seq_len):
        if not use_tensor_core_kernels(dy, lora_B.shape[2]):
            return super().dhg_backward(dy, lora_B, H, gates, scaling, seq_len)
        g, rows = _kernel_layout(gates, seq_len)
        dH, dg = kernel_ops().lora_dhg(dy.contiguous(), lora_B.contiguous(), H.contiguous(), g.float().contiguous(),
                                       scaling.float().contiguous(), rows)
        return dH, row_sums(dg, gates.shape[0], seq_len) if isinstance(seq_len, torch.Tensor) else dg


DECODE_MAX_TOKENS = 64  # csrc/include/pfk_lora.h kDecodeMaxTokens
DECODE_MAX_WIDTH = 12288  # E * r, kDecodeMaxWidth


def use_decode_kernel(x, lora_A, dropout_p: float) -> bool:
    E, r, _ = lora_A.shape
    return (x.shape[0] <= DECODE_MAX_TOKENS and x.shape[0] > 0 and dropout_p == 0.0 and E * r <= DECODE_MAX_WIDTH
            and x.dtype in (torch.float16, torch.bfloat16))


# The decode kernel computes the base x W^T itself only up to this many tokens. Its dot products run on CUDA cores
# in fp32: 2 T K (N + E r) FLOPs, 35 MFLOP per token at 4096 x 4096, E r = 160. At T = 8 that is 0.28 GFLOP, about
# 8 us at half of an H100/H200's 67 TFLOP/s of fp32 FMA, as long as streaming W (33.5 MB, about 9 us at 3.8 TB/s);
# beyond it the kernel would be compute-bound while cuBLAS's tensor-core GEMV stays bandwidth-bound, so for
# 8 < T <= 64 cuBLAS computes the base and the same kernel adds the LoRA term (an estimate: no GPU has timed it).
DECODE_FUSED_BASE_MAX_TOKENS = 8


def forward(x, weight, bias, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p: float):
    """Returns (y [T, N], H [T, E*r]); same contract as routed_lora_torch.forward."""
    if (use_decode_kernel(x, lora_A, dropout_p) and x.shape[0] <= DECODE_FUSED_BASE_MAX_TOKENS
            and weight.dtype == x.dtype and weight.is_contiguous()
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))):
        g, rows = _kernel_layout(gates, seq_len)  # one launch: base, shrink, gate and expand
        return kernel_ops().lora_decode_linear(x.contiguous(), weight, bias, lora_A.contiguous(),
                                               lora_B.contiguous(), g.float().contiguous(),
                                               scaling.float().contiguous(), rows)
    y = torch.nn.functional.linear(x, weight, bias)  # cuBLAS base; the LoRA branch is added in place
    return y, delta_forward(y, x, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p)


def delta_forward(out, x, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p: float):
    """out [T, N] += the LoRA term, in place; returns H. Same contract as routed_lora_torch.delta_forward."""
    if use_decode_kernel(x, lora_A, dropout_p) and out.dtype == x.dtype:
        g, rows = _kernel_layout(gates, seq_len)
        return kernel_ops().lora_decode_(out, x, lora_A, lora_B, g.float().contiguous(), scaling.float().contiguous(),
                                         rows)
    return routed_lora_torch.delta_forward(out, x, lora_A, lora_B, gates, scaling, seed, seq_len, dropout_p,
                                           gate_ops=CudaGateOps)


backward = functools.partial(routed_lora_torch.backward, gate_ops=CudaGateOps)
delta_backward = functools.partial(routed_lora_torch.delta_backward, gate_ops=CudaGateOps)
