"""Triton kernels that build the top-k routing metadata on the device (launcher: routing_triton.py; reference:
routing/topk.py build_routing_metadata's torch ops, which tests hold these to exactly).

Pairs p = t * k + s; group g = e * k + s, or G = E * k (a sentinel after every group) for a -1 slot. Pairs are
taken in chunks of CHUNK in pair order:

    _route_count_kernel    CNT[c, g] = pairs of chunk c in group g                        (integer atomics)
    _route_scan_kernel     one program: OFF[c, g] = pairs of group g in chunks before c; group_start (exclusive
                           scan of the totals, G + 1 entries); the block table: block j of the concatenated
                           cdiv(count_g, BLOCK_M) blocks of every real group -> (group, first position)
    _route_scatter_kernel  sorted_pairs[group_start[g] + OFF[c, g] + rank of p among chunk c's pairs of g] = p

Stable like the reference's sort (token order inside each group), so the result is the same, bit for bit.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pair_groups(IDX, p, ok, K_SLOTS, G):
    """Group of each pair p: e * k + s, G for a -1 slot (no adapter)."""
    e = tl.load(IDX + p, mask=ok, other=-1).to(tl.int32)
    return tl.where(e >= 0, e * K_SLOTS + p % K_SLOTS, G)


@triton.jit
def _route_count_kernel(IDX, CNT, P, K_SLOTS, G, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    p = c * CHUNK + tl.arange(0, CHUNK)
    ok = p < P
    g = _pair_groups(IDX, p, ok, K_SLOTS, G)
    tl.atomic_add(CNT + c * (G + 1) + g, tl.full((CHUNK,), 1, tl.int32), mask=ok)


@triton.jit
def _route_scan_kernel(CNT, OFF, GROUP_START, BLOCK_GROUP, BLOCK_START, NCHUNK, G, MAXB,
                       BLOCK_M: tl.constexpr, G_PAD: tl.constexpr, JB: tl.constexpr):
    gs = tl.arange(0, G_PAD)
    g_ok = gs <= G  # the real groups and the sentinel
    running = tl.zeros((G_PAD,), dtype=tl.int32)
    for c in range(NCHUNK):
        row = tl.load(CNT + c * (G + 1) + gs, mask=g_ok, other=0)
        tl.store(OFF + c * (G + 1) + gs, running, mask=g_ok)
        running += row
    start = tl.cumsum(running, 0) - running  # exclusive: where each group's pairs begin
    tl.store(GROUP_START + gs, start, mask=g_ok)
    real = gs < G
    nblk = tl.where(real, (running + BLOCK_M - 1) // BLOCK_M, 0)
    bend = tl.cumsum(nblk, 0)  # blocks of groups 0..g
    bbeg = bend - nblk
    for j0 in range(0, MAXB, JB):
        j = j0 + tl.arange(0, JB)
        # block j belongs to the first group whose blocks end past j: count the groups that end at or before it
        gj = tl.sum(((bend[None, :] <= j[:, None]) & real[None, :]).to(tl.int32), axis=1)
        sel = gs[None, :] == gj[:, None]
        first = tl.sum(tl.where(sel, start[None, :], 0), axis=1) + (j - tl.sum(tl.where(sel, bbeg[None, :], 0),
                                                                                axis=1)) * BLOCK_M
        has = gj < G
        tl.store(BLOCK_GROUP + j, tl.where(has, gj, -1), mask=j < MAXB)
        tl.store(BLOCK_START + j, tl.where(has, first, 0), mask=j < MAXB)


@triton.jit
def _route_scatter_kernel(IDX, OFF, GROUP_START, SORTED, P, K_SLOTS, G, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    i = tl.arange(0, CHUNK)
    p = c * CHUNK + i
    ok = p < P
    g = tl.where(ok, _pair_groups(IDX, p, ok, K_SLOTS, G), -1)  # padding lanes match no pair
    rank = tl.sum(((g[:, None] == g[None, :]) & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
    g_safe = tl.maximum(g, 0)
    pos = tl.load(GROUP_START + g_safe, mask=ok, other=0) + tl.load(OFF + c * (G + 1) + g_safe, mask=ok, other=0)
    tl.store(SORTED + pos + rank, p, mask=ok)
