"""torch.compile(fullgraph=True) traces models with routed layers as one custom op per layer, no graph breaks."""
import pytest
import torch
import torch.nn as nn
from conftest import assert_close

import personafuse_kernels as pfk


class TinyBlock(nn.Module):
    def __init__(self, dim=24, hidden=40, router="token", dropout=0.0):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        pfk.inject_routed_lora(self, ["up", "down"], num_experts=3, rank=4, dropout=dropout, router=router,
                               verbose=False)
        for m in pfk.routed_layers(self):
            nn.init.normal_(m.lora_B, std=0.1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + x


def test_custom_ops_pass_opcheck():
    x = torch.randn(6, 8)
    w = torch.randn(5, 8)
    A = torch.randn(2, 3, 8)
    B = torch.randn(2, 5, 3)
    g = torch.rand(6, 2)
    s = torch.ones(2)
    seed = torch.empty(0, dtype=torch.int64)
    torch.library.opcheck(torch.ops.personafuse.routed_lora_forward,
                          (x, w, None, A, B, g, s, seed, 1, None, 0.0, "torch"))
    dy = torch.randn(6, 5)
    H = torch.randn(6, 6)
    torch.library.opcheck(torch.ops.personafuse.routed_lora_backward,
                          (dy, x, w, A, B, g, s, seed, H, 1, None, 0.0, True, False, False, True, True, True, "torch"))
    # packed sequences: gates [2, E] for 6 tokens, rows given by the map seq_ids
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32)
    g2 = torch.rand(2, 2)
    torch.library.opcheck(torch.ops.personafuse.routed_lora_forward,
                          (x, w, None, A, B, g2, s, seed, 0, seq_ids, 0.0, "torch"))
    torch.library.opcheck(torch.ops.personafuse.routed_lora_backward,
                          (dy, x, w, A, B, g2, s, seed, H, 0, seq_ids, 0.0, True, False, False, True, True, True,
                           "torch"))


@pytest.mark.parametrize("router", ["token", "sequence"])
def test_compile_fullgraph_matches_eager(router):
    torch._dynamo.reset()
    model = TinyBlock(router=router)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y_eager = model(x)
    y_eager.sum().backward()
    grads_eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    dx_eager = x.grad.clone()
    model.zero_grad()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert_close(y, y_eager, 1e-5, "y")
    assert_close(x.grad, dx_eager, 1e-5, "dx")
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads_eager[n], 1e-5, f"d{n}")


def test_compile_fullgraph_with_dropout_runs():
    torch._dynamo.reset()
    model = TinyBlock(dropout=0.2).train()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 24)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_topk_custom_ops_pass_opcheck():
    from personafuse_kernels.routing.topk import build_routing_metadata

    x, w = torch.randn(6, 8), torch.randn(5, 8)
    A, B = torch.randn(4, 3, 8), torch.randn(4, 5, 3)
    idx = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])
    wts = torch.rand(6, 2)
    s = torch.ones(4)
    seed = torch.empty(0, dtype=torch.int64)
    meta = build_routing_metadata(idx, 4, 16)
    tensors = (meta.sorted_pairs, meta.group_start, meta.block_group, meta.block_start)
    torch.library.opcheck(torch.ops.personafuse.routed_lora_topk_forward, (x, w, None, A, B, idx, wts, s, seed, 16, 0.0,
                                                                           "torch"))
    saved = torch.randn(6, 12)
    torch.library.opcheck(torch.ops.personafuse.routed_lora_topk_backward,
                          (torch.randn(6, 5), x, w, A, B, idx, wts, s, seed, saved, *tensors, 16, 0.0,
                           True, False, False, True, True, True, "torch"))


def test_compile_fullgraph_with_packed_sequences():
    """cu_seqlens under torch.compile(fullgraph=True): the checks become device-side asserts, the row map is built
    by traced torch ops, and the custom op takes it as its optional seq_ids."""
    import personafuse_kernels as pfk

    x, W, b = torch.randn(12, 16), torch.randn(8, 16), torch.randn(8)
    A, B = torch.randn(3, 4, 16), torch.randn(3, 8, 4)
    gates = torch.rand(3, 3)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)

    def f(x, gates, cu):
        return pfk.routed_lora(x, W, b, A, B, gates, scaling=2.0, backend="torch", cu_seqlens=cu)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, gates, cu), f(x, gates, cu))
