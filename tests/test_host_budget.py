"""Host-side budget of one call, per path: kernel launches (Triton and aten), tensor allocations, and host syncs,
counted (never timed) by a dry run of the real launchers on meta tensors as on an H200 (personafuse_kernels.perf).
A count that grows past its written budget fails; a count that shrinks should lower its budget here.

Host syncs: meta tensors hold no values, so any host read of a device value (.item(), int(t), bool(t), .tolist(),
a data-dependent shape) raises in the dry run. Every path below running to the end on meta is the proof that it
issues no host sync, and stays graph-capturable.
"""
import pytest
import torch

import personafuse_kernels as pfk
from personafuse_kernels.autograd import Needs
from personafuse_kernels.dispatch import get_backend_ops, topk_block_m
from personafuse_kernels.perf.cards import CARDS
from personafuse_kernels.perf.dryrun import recording
from personafuse_kernels.perf.explain import _inputs

# (backend, T, E, k): (forward: triton launches, aten launches, allocations), (backward: the same).
# K = N = 4096, r = 16, bf16, W frozen. Top-k forwards include building the routing metadata: on a GPU three
# Triton launches and one zero fill (ops/routing_triton.py; the torch-op reference took 34 launches).
BUDGET = {
    ("triton", 16, 10, 0): ((3, 0, 4), (4, 5, 14)),
    ("triton", 4096, 10, 0): ((2, 1, 4), (4, 5, 15)),
    ("triton", 8192, 64, 2): ((6, 2, 9), (5, 5, 13)),
    ("torch", 4096, 10, 0): ((0, 8, 7), (0, 19, 23)),
    ("torch", 8192, 64, 2): ((3, 14, 18), (0, 29, 33)),  # the reference: one-hot gates for -1 and int32
}


def run(backend, T, E, k):
    if backend == "triton" and "triton" not in pfk.available_backends():
        pytest.skip("triton backend unavailable")
    x, W, b, A, B, gates, scaling = _inputs(T, 4096, 4096, E, 16, k, torch.bfloat16, True)
    seed = torch.empty(0, device="meta", dtype=torch.int64)
    needs = Needs(x=True, weight=False, bias=False, lora_A=True, lora_B=True, gates=True)
    with recording(CARDS["H200"]) as fwd:
        if k:
            indices, weights = gates
            ops = get_backend_ops(backend, topk=True)
            y, saved, meta = ops.forward(x, W, b, A, B, indices, weights, scaling, seed, 0.0,
                                         topk_block_m(backend, T, k))
        else:
            ops = get_backend_ops(backend)
            y, saved = ops.forward(x, W, b, A, B, gates, scaling, seed, 1, 0.0)
    with recording(CARDS["H200"]) as bwd:
        dy = torch.empty_like(y)
        if k:
            ops.backward(dy, x, W, A, B, indices, weights, scaling, seed, saved, 0.0, meta, needs)
        else:
            ops.backward(dy, x, W, A, B, gates, scaling, seed, saved, 1, 0.0, needs)
    return fwd, bwd


def counts(rec) -> tuple[int, int, int]:
    return (sum(launch.source == "triton" for launch in rec), sum(launch.source == "aten" for launch in rec),
            len(rec.allocations))


@pytest.mark.parametrize("key", list(BUDGET), ids=lambda k: f"{k[0]}-T{k[1]}-E{k[2]}-k{k[3]}")
def test_launches_and_allocations_within_budget(key):
    fwd, bwd = run(*key)
    for phase, rec, budget in (("forward", fwd, BUDGET[key][0]), ("backward", bwd, BUDGET[key][1])):
        got = counts(rec)
        over = [f"{what} {g} > {b}" for what, g, b in zip(("triton launches", "aten launches", "allocations"), got,
                                                         budget) if g > b]
        assert not over, f"{key} {phase}: " + ", ".join(over) + f"; launches {[launch.name for launch in rec]}"


def test_a_host_sync_cannot_hide_in_a_dry_run():
    """The premise of the sync check: reading a value of a meta tensor on the host raises."""
    t = torch.empty(4, device="meta")
    for read in (lambda: t.sum().item(), lambda: int(t.max()), lambda: bool((t > 0).any()), lambda: t.tolist()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


def test_topk_gates_check_without_a_host_read_on_device(monkeypatch):
    """On a GPU, TopKGates' range and duplicate checks are device-side asserts (no host read of the indices);
    validate_now() is the explicit host check. Shown on CPU tensors with the GPU branch forced: the host reader
    (validate_now) must not be called, and a bad index still fails through torch._assert_async."""
    from personafuse_kernels.routing.topk import TopKGates

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    called = []
    monkeypatch.setattr(TopKGates, "validate_now", lambda self, E: called.append(E))
    good = TopKGates(torch.tensor([[0, 2], [1, 3]]), torch.rand(2, 2))
    good.check(4)
    bad = TopKGates(torch.tensor([[0, 7], [1, 3]]), torch.rand(2, 2))
    with pytest.raises(RuntimeError, match="out of range"):
        bad.check(4)
    repeated = TopKGates(torch.tensor([[1, 1], [1, 3]]), torch.rand(2, 2))
    with pytest.raises(RuntimeError, match="repeat"):
        repeated.check(4)
    assert called == []


def test_topk_gates_validate_now_names_the_values():
    from personafuse_kernels.routing.topk import TopKGates

    with pytest.raises(ValueError, match="from 0 to 7"):
        TopKGates(torch.tensor([[0, 7], [1, 3]]), torch.rand(2, 2)).validate_now(4)
