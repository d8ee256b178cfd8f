"""Fake implementations of the extension's ops (csrc/personafuse_ops.cpp): each output's shape and dtype, no work.

They run for meta and fake tensors: torch.compile traces the cuda backend's ops through them, and `personafuse
explain` dry-runs the backend on meta tensors with them (perf/dryrun.py). Each one allocates the outputs its C++
op returns, shaped and typed alike (with sequence gates the C++ gate-gradient ops also allocate a per-token
scratch, which the fakes leave out); tests/test_explain_cuda.py compares them with the ops' real outputs in the
CUDA emulator.

    register("personafuse")       # done by _extension.load_extension once _C is loaded
    register("personafuse_emu")   # the tests' emulated build of the same C++
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def register(namespace: str = "personafuse") -> None:
    """Register the fakes for torch.ops.<namespace> (once per namespace)."""

    def fake(name):
        return torch.library.register_fake(f"{namespace}::{name}")

    @fake("gate_forward")
    def _(H, gates, scaling, seq_len):  # Hg [T, E*r]
        return torch.empty_like(H)

    @fake("gate_backward")
    def _(dHg, H, gates, scaling, seq_len):  # dH [T, E*r], dgates [T / seq_len, E]
        return torch.empty_like(H), gates.new_empty(gates.shape)

    @fake("lora_decode_")
    def _(y, x, lora_A, lora_B, gates, scaling, seq_len):  # y updated in place; H [T, E*r]
        return x.new_empty(x.shape[0], lora_A.shape[0] * lora_A.shape[1])

    @fake("lora_decode_linear")
    def _(x, weight, bias, lora_A, lora_B, gates, scaling, seq_len):  # y [T, N], H [T, E*r]
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0] * lora_A.shape[1])

    @fake("lora_shrink")
    def _(x, lora_A, gates, scaling, seed, seq_len, dropout_p):  # H, Hg [T, E*r]
        C = lora_A.shape[0] * lora_A.shape[1]
        return x.new_empty(x.shape[0], C), x.new_empty(x.shape[0], C)

    @fake("lora_dhg")
    def _(dy, lora_B, H, gates, scaling, seq_len):  # dH [T, E*r], dgates [T / seq_len, E]
        return torch.empty_like(H), gates.new_empty(gates.shape)

    @fake("topk_pair_shrink")
    def _(x, lora_A, w_pair, scaling, seed, sorted_pairs, group_start, block_group, block_start, block_m, k,
          dropout_p):  # H, Hg [T * k, r]
        P, r = x.shape[0] * k, lora_A.shape[1]
        return x.new_empty(P, r), x.new_empty(P, r)

    @fake("topk_pair_dhg")
    def _(dy, lora_B, w_pair, scaling, H, sorted_pairs, group_start, block_group, block_start, block_m,
          k):  # dH [T * k, r], dweights [T * k] float32 (zero-filled: the C++ op's at::zeros)
        return torch.empty_like(H), w_pair.new_zeros(dy.shape[0] * k)

    @fake("topk_expand_y_")
    def _(y, Hg, lora_B, sorted_pairs, group_start, block_group, block_start, block_m, k):
        return None

    @fake("topk_expand_dx_")
    def _(dx, dH, lora_A, seed, sorted_pairs, group_start, block_group, block_start, block_m, k, dropout_p):
        return None

    @fake("topk_wgrad_B")
    def _(dy, H, w_pair, scaling, sorted_pairs, group_start, num_experts, k):  # dB [E, N, r]
        return dy.new_empty(num_experts, dy.shape[1], H.shape[1])

    @fake("topk_wgrad_A")
    def _(dH, x, w_pair, scaling, seed, sorted_pairs, group_start, num_experts, k, dropout_p):  # dA [E, r, K]
        return x.new_empty(num_experts, dH.shape[1], x.shape[1])
