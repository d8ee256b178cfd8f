"""The cards the cost model knows, in one place, each figure with its source.

Peak numbers are the vendors' datasheet figures (dense, no sparsity). What a kernel reaches of them is not here:
the efficiency assumptions live in perf/costs.py beside the measurements that fixed them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    key: str  # the name `personafuse explain --card` takes
    device_name: str  # torch.cuda.get_device_name() on that card: the launch-config tables' key
    arch: str  # the compile target of its kernels
    sms: int
    bf16_tflops: float  # dense tensor-core peak, TFLOP/s (fp16 the same)
    fp32_tflops: float  # CUDA-core fp32 FMA peak, TFLOP/s (not tensor cores)
    hbm_tbps: float  # TB/s
    l2_mib: int
    smem_per_sm_kib: int
    source: str


CARDS = {
    "H100-SXM": Card("H100-SXM", "NVIDIA H100 80GB HBM3", "sm_90a", 132, 989.0, 67.0, 3.35, 50, 228,
                     "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, "
                     "3.35 TB/s; 132 SMs and 50 MB L2 from the Hopper architecture whitepaper; 228 KB shared memory "
                     "per SM from the CUDA C Programming Guide (compute capability 9.0)"),
    "H200": Card("H200", "NVIDIA H200", "sm_90a", 132, 989.0, 67.0, 4.8, 50, 228,
                 "NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, 4.8 TB/s "
                 "HBM3e; same GH100 die as the H100 SXM (132 SMs, 50 MB L2, 228 KB shared memory per SM)"),
    "A100-SXM-80GB": Card("A100-SXM-80GB", "NVIDIA A100-SXM4-80GB", "sm_80", 108, 312.0, 19.5, 2.039, 40, 164,
                          "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80 GB): 312 TFLOP/s bf16 dense, 19.5 TFLOP/s "
                          "fp32, 2,039 GB/s; 108 SMs and 40 MB L2 from the Ampere architecture whitepaper; 164 KB "
                          "shared memory per SM from the CUDA C Programming Guide (compute capability 8.0)"),
}


def card(key: str) -> Card:
    try:
        return CARDS[key]
    except KeyError:
        raise ValueError(f"unknown card {key!r}; known: {', '.join(CARDS)}") from None


def card_for_device(device_name: str) -> Card | None:
    """The card whose torch.cuda.get_device_name() spelling is `device_name`, or None (a card the model lacks)."""
    for c in CARDS.values():
        if device_name == c.device_name:
            return c
    return None
