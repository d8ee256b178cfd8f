"""Routed layers on a base computed by someone else's kernel: a quantized linear (int8 weight-only, the shape of
torchao's and bitsandbytes' layers: in_features, out_features, an integer weight and a scale). The base is called
as it is and the routed term is added into its output in place (routed_lora_delta); QLoRA-style training reaches the
experts and the router, never the frozen base. bitsandbytes and torchao are used when installed (the GPU machine
has neither: those cases skip)."""
import pytest
import torch
import torch.nn as nn

import personafuse_kernels as pfk
from personafuse_kernels.modules import RoutedLoRALinear


class Int8WeightOnlyLinear(nn.Module):
    """y = x (scale * W_int8)^T + b: int8 weights, per-output-channel scales, dequantized in forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        w = (self.weight.float() * self.scale[:, None]).to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def layer(K=32, N=24, E=4, r=8, router="token", top_k=None):
    torch.manual_seed(0)
    base = Int8WeightOnlyLinear(nn.Linear(K, N))
    lay = RoutedLoRALinear(base, num_experts=E, rank=r, alpha=2 * r, router=router, top_k=top_k)
    with torch.no_grad():
        lay.lora_B.normal_(0, 0.1)
    return base, lay


@pytest.mark.parametrize("router,top_k", [("token", None), ("token", 2), ("sequence", None)])
def test_forward_is_base_plus_routed_term(router, top_k):
    base, lay = layer(router=router, top_k=top_k)
    assert not lay.fused_base
    x = torch.randn(2, 5, 32)
    gates = lay.compute_gates(x)
    want = base(x) + pfk.routed_lora_delta(x, lay.lora_A, lay.lora_B, gates, scaling=lay.scaling)
    torch.testing.assert_close(lay(x, gates=gates), want)


def test_qlora_style_training_reaches_experts_and_router_only():
    base, lay = layer()
    x, target = torch.randn(64, 32), torch.randn(64, 24)
    opt = torch.optim.Adam([p for p in lay.parameters() if p.requires_grad], lr=0.02)
    before = {n: b.clone() for n, b in base.named_buffers() if b is not None}
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(lay(x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.9, losses
    assert lay.lora_A.grad is not None and lay.lora_B.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lay.router.parameters())
    for n, b in base.named_buffers():
        if b is not None:
            assert torch.equal(b, before[n]), f"the quantized base's {n} changed"


def test_merge_into_a_quantized_base_is_refused():
    _, lay = layer()
    with pytest.raises(RuntimeError, match="cannot merge"):
        lay.merge(torch.full((4,), 0.25))


def test_inject_wraps_quantized_layers():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = Int8WeightOnlyLinear(nn.Linear(32, 32))
            self.o_proj = nn.Linear(32, 32)

        def forward(self, x):
            return self.o_proj(torch.relu(self.q_proj(x)))

    model = pfk.inject_routed_lora(Block(), ["q_proj", "o_proj"], num_experts=4, rank=4)
    assert isinstance(model.q_proj, RoutedLoRALinear) and not model.q_proj.fused_base
    assert model.o_proj.fused_base
    model(torch.randn(3, 32)).sum().backward()
    assert model.q_proj.lora_A.grad is not None


def test_bitsandbytes_4bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes 4-bit layers run on a GPU here")
    base = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.bfloat16).cuda()
    lay = RoutedLoRALinear(base, num_experts=4, rank=8)
    x = torch.randn(5, 64, device="cuda", dtype=torch.bfloat16)
    y = lay(x)
    y.float().sum().backward()
    assert lay.lora_A.grad is not None


def test_torchao_int8_weight_only_base():
    quant = pytest.importorskip("torchao.quantization")
    lin = nn.Sequential(nn.Linear(64, 48))
    quant.quantize_(lin, quant.int8_weight_only())
    lay = RoutedLoRALinear(lin[0], num_experts=4, rank=8)
    x = torch.randn(5, 64)
    y = lay(x)
    y.sum().backward()
    assert lay.lora_A.grad is not None
