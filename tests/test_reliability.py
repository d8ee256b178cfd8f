"""No silent wrong answers, nothing changed on failure, bad input refused before work: the layer constructor,
inject_routed_lora and from_peft (checks first, then changes), peft's pattern rule and JSON types, the fp16
router."""
from __future__ import annotations

import copy
import json
import time

import pytest
import torch
import torch.nn as nn
from helpers import tiny_llama

import personafuse_kernels as pfk
from personafuse_kernels.integration.peft_adapters import check_pattern_key, pattern_key


def _state(model):
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}, \
        [type(m).__name__ for m in model.modules()]


def _assert_unchanged(model, before):
    params, kinds = before
    now_params, now_kinds = _state(model)
    assert now_kinds == kinds, "modules were replaced"
    assert {n: rg for n, (rg, _) in now_params.items()} == {n: rg for n, (rg, _) in params.items()}, \
        "requires_grad changed"
    assert all(torch.equal(now_params[n][1], t) for n, (_, t) in params.items())


# ---------------------------------------------------------------- constructor checks (item 11)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"num_experts": True}, TypeError, "num_experts must be an int"),
    ({"rank": True}, TypeError, "rank must be an int"),
    ({"rank": 0}, ValueError, "rank must be an int >= 1"),
    ({"num_experts": 2.0}, TypeError, "num_experts must be an int"),
    ({"alpha": float("nan")}, ValueError, "alpha must be finite"),
    ({"alpha": float("inf")}, ValueError, "alpha must be finite"),
    ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
    ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
    ({"top_k": 2, "capacity_factor": float("inf")}, ValueError, "capacity_factor must be finite"),
    ({"top_k": 2, "capacity_factor": 0.0}, ValueError, "capacity_factor must be > 0"),
    ({"capacity_factor": 1.25}, ValueError, "capacity_factor needs top_k"),
    ({"top_k": 1.5}, TypeError, "top_k must be an int"),
    ({"top_k": 9}, ValueError, "top_k must be in"),
    ({"dropout": "0.1"}, TypeError, "dropout must be a number"),
    ({"dropout": 1.0}, ValueError, "dropout must be in"),
    ({"router": "bogus"}, ValueError, "router must be one of"),
    ({"context_features": 4}, ValueError, "context_features needs router='sequence'"),
])
def test_constructor_refuses_bad_arguments_and_leaves_the_linear_alone(kwargs, error, match):
    lin = nn.Linear(8, 6)
    args = {"num_experts": 4, "rank": 2, **kwargs}
    with pytest.raises(error, match=match):
        pfk.RoutedLoRALinear(lin, **args)
    assert all(p.requires_grad for p in lin.parameters()), "a failed constructor froze the base linear"


def test_wrong_input_is_our_error_not_the_routers():
    layer = pfk.RoutedLoRALinear(nn.Linear(8, 6), 4, 2, router="token")
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., in_features = 8\], got \(3, 5\)"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x must be a tensor"):
        layer([[1.0] * 8])


# ---------------------------------------------------------------- fp16 router (item 14)


@pytest.mark.parametrize("router_cls", ["token", "sequence"])
def test_fp16_router_computes_logits_in_fp32(router_cls):
    """Logits past fp16's 65504 overflowed to inf and gave NaN gates; the router math now runs in float32."""
    K, E = 16, 4
    if router_cls == "token":
        router = pfk.TokenRouter(K, E, dtype=torch.float16)
    else:
        router = pfk.SequenceRouter(K, E, dtype=torch.float16)
    with torch.no_grad():
        router.proj.weight.fill_(0.0)
        router.proj.weight[0].fill_(300.0)  # logit 0 = 300 * 16 * 250 = 1.2e6 > 65504
        router.proj.bias.zero_()
    x = torch.full((2, 3, K), 250.0, dtype=torch.float16)
    out = router(x)
    gates = out.gates if router_cls == "token" else out
    assert torch.isfinite(gates).all()
    assert torch.allclose(gates[..., 0], torch.ones_like(gates[..., 0]))
    ref = pfk.TokenRouter(K, E) if router_cls == "token" else pfk.SequenceRouter(K, E)
    ref.load_state_dict({k: v.float() for k, v in router.state_dict().items()})
    ref_out = ref(x.float())
    torch.testing.assert_close(gates, ref_out.gates if router_cls == "token" else ref_out)


# ---------------------------------------------------------------- inject: check, then change (item 3)


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"top_k": 2, "capacity_factor": -1.0},
                                    {"router": "bogus"}, {"temperature": float("nan")}, {"alpha": float("inf")}])
def test_failed_inject_leaves_the_model_unchanged(kwargs):
    model = tiny_llama()
    before = _state(model)
    with pytest.raises((ValueError, TypeError)):
        pfk.inject_routed_lora(model, ["q_proj", "v_proj"], num_experts=4, rank=2, verbose=False, **kwargs)
    _assert_unchanged(model, before)


def test_inject_failing_in_a_later_layer_restores_the_earlier_ones(monkeypatch):
    """A constructor that raises on the third target: the two built before it froze their (shared) base
    linears, which is undone."""
    from personafuse_kernels.integration import inject

    model = tiny_llama()
    before = _state(model)
    real, calls = inject._routed, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(inject, "_routed", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        pfk.inject_routed_lora(model, ["q_proj", "v_proj"], num_experts=2, rank=2, verbose=False)
    _assert_unchanged(model, before)


# ---------------------------------------------------------------- peft adapters (items 2, 3, 9)


peft = pytest.importorskip("peft")


def _adapter(folder, base, config_overrides=None, target_modules=("q_proj", "v_proj"), r=4, alpha=8, seed=0):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                                  target_modules=list(target_modules)))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    pm.save_pretrained(str(folder))
    if config_overrides is not None:
        cfg_path = folder / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        if callable(config_overrides):
            cfg = config_overrides(cfg)
        else:
            cfg.update(config_overrides)
        cfg_path.write_text(json.dumps(cfg))
    return folder


IDS = torch.tensor([[5, 9, 3, 7, 1, 22, 8]])


def test_alpha_pattern_alternation_matches_peft(tmp_path):
    """{"v_proj|q_proj": 16}: peft scales both layers (alpha 16 / r 4 = 4.0); the old rule gave q_proj 2.0."""
    base = tiny_llama()
    folder = _adapter(tmp_path / "a", base, {"alpha_pattern": {"v_proj|q_proj": 16}})
    model = pfk.from_peft(copy.deepcopy(base), [folder], verbose=False)
    for name, m in pfk.named_routed_layers(model):
        assert float(m.scaling[0]) == 4.0, name
    expected = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad(), pfk.persona_gates(model, torch.ones(1)):
        torch.testing.assert_close(model(IDS).logits, expected(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys", [["q_proj"], ["v_proj|q_proj"], [r"layers\.0\..*_proj"], ["self_attn.v_proj"],
                                  ["model.layers.1.self_attn.q_proj"], ["k_proj", "q_proj"], ["[qv]_proj"],
                                  ["nothing_matches"]])
def test_pattern_rule_is_peft_rule(keys):
    from peft.utils.other import get_pattern_key

    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"):
        assert pattern_key(keys, path) == get_pattern_key(keys, path)


@pytest.mark.parametrize("key,match", [
    ("(.*a){30}", "nests repetition"), ("(a+)+", "nests repetition"), ("((ab)*c)*", "nests repetition"),
    ("(", "is not a valid regular expression"), ("", "non-empty strings"), ("x" * 5000, "at most 1000"),
])
def test_hostile_pattern_keys_are_refused_quickly(key, match):
    start = time.monotonic()
    with pytest.raises(ValueError, match=match):
        check_pattern_key(key, "alpha_pattern", "adapter")
    assert time.monotonic() - start < 1.0


def test_hostile_key_in_an_adapter_fails_fast_and_names_the_key(tmp_path):
    base = tiny_llama()
    folder = _adapter(tmp_path / "a", base, {"alpha_pattern": {"(.*a){30}": 16}})
    model = copy.deepcopy(base)
    before = _state(model)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"alpha_pattern key '\(\.\*a\)\{30\}' nests repetition"):
        pfk.from_peft(model, [folder], verbose=False)
    assert time.monotonic() - start < 5.0
    _assert_unchanged(model, before)


@pytest.mark.parametrize("overrides,match", [
    ({"use_rslora": "false"}, "use_rslora must be true or false"),
    ({"lora_alpha": "8"}, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"peft_type": None}, 'peft_type must be "LORA"'),
    ({"peft_type": "IA3"}, 'peft_type must be "LORA"'),
    ({"bias": None}, 'bias must be "none"'),
    ({"bias": "all"}, 'bias must be "none"'),
    ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\)"),
    ({"use_dora": "yes"}, "use_dora must be true or false"),
    ({"alpha_pattern": ["q_proj"]}, "alpha_pattern must be a JSON object"),
    ({"alpha_pattern": {"q_proj": "16"}}, "alpha_pattern must be a finite number"),
    (lambda cfg: [cfg], "must hold a JSON object"),
])
def test_peft_config_types_are_checked_and_named(tmp_path, overrides, match):
    base = tiny_llama()
    folder = _adapter(tmp_path / "a", base, overrides)
    model = copy.deepcopy(base)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        pfk.from_peft(model, [folder], verbose=False)
    _assert_unchanged(model, before)


def test_use_rslora_false_string_was_truthy_now_refused_and_real_false_scales_alpha_over_r(tmp_path):
    base = tiny_llama()
    folder = _adapter(tmp_path / "a", base, {"use_rslora": False})
    model = pfk.from_peft(copy.deepcopy(base), [folder], verbose=False)
    assert all(float(m.scaling[0]) == 2.0 for m in pfk.routed_layers(model))  # 8 / 4, not 8 / sqrt(4)


def test_rank_zero_and_scalar_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    folder = _adapter(tmp_path / "a", base)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_A" in k)
    for bad in (torch.tensor(1.0), torch.zeros(0, tensors[key].shape[1])):
        save_file({**tensors, key: bad}, str(path))
        with pytest.raises(ValueError, match=r"expected \[r, K\] and \[N, r\] with r >= 1"):
            pfk.from_peft(copy.deepcopy(base), [folder], verbose=False)


@pytest.mark.parametrize("kwargs", [{"router": "bogus"}, {"temperature": 0.0}, {"router": "token", "top_k": 7}])
def test_failed_from_peft_leaves_the_model_unchanged(tmp_path, kwargs):
    base = tiny_llama()
    folder = _adapter(tmp_path / "a", base)
    model = copy.deepcopy(base)
    before = _state(model)
    with pytest.raises(ValueError):
        pfk.from_peft(model, [folder], verbose=False, **kwargs)
    _assert_unchanged(model, before)


