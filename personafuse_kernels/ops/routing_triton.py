"""Top-k routing metadata built on the device in three Triton launches (and one zero fill), instead of the reference's
thirty-odd torch ops: triton_routing_kernels.py. Same result as routing.topk's torch-op builder, bit for bit."""
from __future__ import annotations

import torch

from ..routing.topk import RoutingMeta
from .launch_configs import pow2
from .triton_routing_kernels import _route_count_kernel, _route_scan_kernel, _route_scatter_kernel
from .triton_utils import cdiv

CHUNK = 128  # pairs per program of the count and scatter kernels (the scatter ranks them in a CHUNK^2 compare)
JB = 32  # blocks per step of the scan kernel's block table


def build_routing_metadata_kernels(indices: torch.Tensor, num_experts: int, block_m: int) -> RoutingMeta:
    """indices [T, k] int32/int64 (-1: no adapter), T * k >= 1 -> RoutingMeta, with no host sync."""
    T, k = indices.shape
    P, G = T * k, num_experts * k
    dev = indices.device
    idx = indices.reshape(-1)
    if not idx.is_contiguous():
        idx = idx.contiguous()
    nchunk = cdiv(P, CHUNK)
    max_blocks = cdiv(P, block_m) + G
    cnt = torch.zeros(nchunk, G + 1, dtype=torch.int32, device=dev)
    off = torch.empty(nchunk, G + 1, dtype=torch.int32, device=dev)
    group_start = torch.empty(G + 1, dtype=torch.int32, device=dev)
    block_group = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    block_start = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    sorted_pairs = torch.empty(P, dtype=torch.int32, device=dev)
    _route_count_kernel[(nchunk,)](idx, cnt, P, k, G, CHUNK=CHUNK, num_warps=4)
    _route_scan_kernel[(1,)](cnt, off, group_start, block_group, block_start, nchunk, G, max_blocks,
                             BLOCK_M=block_m, G_PAD=pow2(G + 1), JB=JB, num_warps=8)
    _route_scatter_kernel[(nchunk,)](idx, off, group_start, sorted_pairs, P, k, G, CHUNK=CHUNK, num_warps=4)
    return RoutingMeta(sorted_pairs, group_start, block_group, block_start, block_m, num_experts, k)
