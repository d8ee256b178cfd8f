"""Dropout on the LoRA branch from a counter-based RNG: Philox-4x32-10, as Triton's ``tl.rand`` computes it.

    keep[t, k] = u(seed, t * K + k) >= p          u in [0, 1), float32
    drop(x)    = x * keep / (1 - p)

The mask is a pure function of (seed, element index), so backward regenerates it from the seed instead of
storing a [T, K] mask, and every backend (torch here, Triton kernels in-kernel with ``tl.rand``) draws the
same mask for the same seed. The seed is an int64 tensor of one element on x's device: no host sync, so
CUDA graphs can replay it.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # largest float32 s with (2**31 - 1) * s < 1


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed, drawn from torch's default generator on ``device`` (no host sync)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def philox_uniform(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) for each int64 offset; bit-identical to ``tl.rand(seed, offsets)``.

    uint32 arithmetic is emulated in int64: products of two 32-bit values wrap modulo 2**64, whose low 64
    bits are exact, so the high and low words are read off with shifts and masks.
    """
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        prod_b = c2 * _ROUND_B
        prod_a = c0 * _ROUND_A
        c0, c2 = ((prod_b >> 32) & _MASK32) ^ c1 ^ k0, ((prod_a >> 32) & _MASK32) ^ c3 ^ k1
        c1 = prod_b & _MASK32
        c3 = prod_a & _MASK32
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # reinterpret as int32
    signed = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=signed.device)


def keep_mask(seed: torch.Tensor, num_rows: int, num_cols: int, p: float) -> torch.Tensor:
    """Boolean keep mask [num_rows, num_cols] of the LoRA-branch dropout (True = kept)."""
    offsets = torch.arange(num_rows * num_cols, device=seed.device, dtype=torch.int64).view(num_rows, num_cols)
    return philox_uniform(seed, offsets) >= p


def apply_dropout(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """drop(x) for x [T, K]: zero where the mask drops, scale the rest by 1 / (1 - p). Identity when p == 0."""
    if p == 0.0:
        return x
    mask = keep_mask(seed, x.shape[0], x.shape[1], p)
    return torch.where(mask, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))
