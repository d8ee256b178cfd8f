"""Experts of unequal ranks in one layer (from_peft of adapters with r = 1, 4, 16, 64): storage padded to the
largest rank, but the columns past each expert's rank are not computed and get zero gradients, and the work follows
sum(ranks), shown by the launches' own sizes. Against a per-expert loop that slices each expert to its rank."""
import pytest
import torch

import personafuse_kernels as pfk

RANKS = (1, 4, 16, 64)
BACKENDS = ["torch"] + (["triton"] if "triton" in pfk.available_backends() else [])
NAMES = ["x", "weight", "bias", "lora_A", "lora_B", "gates"]


def case(T=7, K=33, N=45, ranks=RANKS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E, r = len(ranks), max(ranks)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).requires_grad_()  # noqa: E731
    return {"x": t(T, K), "weight": t(N, K, scale=K**-0.5), "bias": t(N), "lora_A": t(E, r, K, scale=K**-0.5),
            "lora_B": t(E, N, r, scale=r**-0.5), "gates": torch.rand(T, E, generator=gen).requires_grad_()}


def sliced_loop(ins, ranks, scaling):
    """float64; expert e computed with A[e, :rank_e] and B[e, :, :rank_e] only."""
    d = {n: v.detach().double().requires_grad_() for n, v in ins.items()}
    y = torch.nn.functional.linear(d["x"], d["weight"], d["bias"])
    for e, n in enumerate(ranks):
        if n:
            lora = (d["x"] @ d["lora_A"][e, :n].t()) @ d["lora_B"][e, :, :n].t()
            y = y + scaling[e] * d["gates"][:, e : e + 1] * lora
    return y, d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks", [RANKS, (0, 3, 64, 2)])
def test_unequal_ranks_match_the_sliced_loop(backend, ranks):
    ins = case(ranks=ranks)
    scaling = torch.linspace(0.5, 2.0, len(ranks))
    y = pfk.routed_lora(*(ins[n] for n in NAMES), scaling=scaling, backend=backend, ranks=list(ranks))
    ref, d = sliced_loop(ins, ranks, scaling.double())
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [ins[n] for n in NAMES], dy)
    want = torch.autograd.grad(ref, [d[n] for n in NAMES], dy.double(), allow_unused=True)
    torch.testing.assert_close(y.double(), ref, rtol=2e-4, atol=2e-4)
    for g, w, n in zip(got, want, NAMES):
        torch.testing.assert_close(g.double(), torch.zeros_like(g, dtype=torch.float64) if w is None else w,
                                   rtol=2e-4, atol=2e-4, msg=lambda m: f"{backend} {n}: {m}")
    dA, dB = got[3], got[4]
    for e, n in enumerate(ranks):
        assert not dA[e, n:].any() and not dB[e, :, n:].any(), f"expert {e}: padding columns got a gradient"


@pytest.mark.skipif("triton" not in pfk.available_backends(), reason="triton backend unavailable")
def test_work_follows_the_sum_of_ranks():
    """The launches themselves say how many columns they compute: sum(ranks) = 85, not E * r_max = 256."""
    from personafuse_kernels.perf.dryrun import recording

    ins = case(T=40)
    with recording(None, aten=False, passthrough=True) as launches:
        y = pfk.routed_lora(*(ins[n] for n in NAMES), backend="triton", ranks=list(RANKS))
        y.sum().backward()
    by_name = {launch.name: launch for launch in launches}
    assert by_name["_shrink_kernel"].args["C"] == sum(RANKS)
    assert by_name["_dual_gemm_kernel"].args["K2"] == sum(RANKS)
    tn = [launch for launch in launches if launch.name == "_tn_gemm_kernel"]
    assert {launch.args["J"] for launch in tn} >= {sum(RANKS)} and {launch.args["I"] for launch in tn} >= {sum(RANKS)}


def test_full_ranks_take_the_plain_path_and_bad_ranks_raise():
    ins = case(ranks=(4, 4))
    args = [ins[n] for n in NAMES]
    torch.testing.assert_close(pfk.routed_lora(*args, ranks=[4, 4]), pfk.routed_lora(*args))
    with pytest.raises(ValueError, match=r"in \[0, r = 4\]"):
        pfk.routed_lora(*args, ranks=[5, 4])
    with pytest.raises(ValueError, match="2 ints"):
        pfk.routed_lora(*args, ranks=[4])
    with pytest.raises(TypeError, match="int tensor"):
        pfk.routed_lora(*args, ranks=torch.tensor([1.0, 2.0]))
    assert pfk.routed_lora(*args, ranks=torch.tensor([0, 0])).shape == (7, 45)


def test_layer_ranks_survive_save_load_and_export(tmp_path):
    import json

    from safetensors.torch import load_file

    from personafuse_kernels.modules import RoutedLoRALinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    model = pfk.inject_routed_lora(model, ["0"], num_experts=3, rank=8, router="external")
    layer = model[0]
    layer.expert_ranks = [2, 8, 5]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    x, gates = torch.randn(5, 16), torch.rand(5, 3)
    y = layer(x, gates=gates)
    want = pfk.routed_lora(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B, gates,
                           scaling=layer.scaling, ranks=[2, 8, 5])
    torch.testing.assert_close(y, want)
    pfk.save_adapters(model, tmp_path / "ckpt")
    fresh = pfk.inject_routed_lora(torch.nn.Sequential(torch.nn.Linear(16, 12)), ["0"], num_experts=3, rank=8,
                                   router="external")
    pfk.load_adapters(fresh, tmp_path / "ckpt")
    assert isinstance(fresh[0], RoutedLoRALinear) and fresh[0].expert_ranks == [2, 8, 5]
    out = pfk.export_peft(model, expert=0, path=tmp_path / "e0")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert [t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")] == [2]  # its own rank
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
