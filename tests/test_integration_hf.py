"""Drop-in integration with Hugging Face models (small models built from configs, no downloads)."""
import copy

import pytest
import torch
from conftest import assert_close, requires_cuda
from helpers import LLAMA_PROJECTIONS, randomize_adapters, tiny_llama

import personafuse_kernels as pfk

transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[5, 9, 3, 7, 1, 22, 8], [4, 4, 17, 30, 2, 11, 6]])


def test_inject_llama_all_projections_equals_base_at_init(capsys):
    base = tiny_llama()
    model = pfk.inject_routed_lora(copy.deepcopy(base), LLAMA_PROJECTIONS, num_experts=10, rank=4, router="token")
    out = capsys.readouterr().out
    assert "routed 14 projections" in out and "trainable params" in out
    assert len(list(pfk.routed_layers(model))) == 14
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".router." in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_inject_other_families(family):
    if family == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)
        model = transformers.Qwen2ForCausalLM(cfg).eval()
    else:
        cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)
        model = transformers.MistralForCausalLM(cfg).eval()
    base = copy.deepcopy(model)
    pfk.inject_routed_lora(model, ["q_proj", "v_proj", "down_proj"], num_experts=3, rank=2, verbose=False)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)
    randomize_adapters(model)
    model(IDS).logits.sum().backward()
    assert all(m.lora_A.grad is not None for m in pfk.routed_layers(model))


def test_inject_gpt2_conv1d():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    base = copy.deepcopy(model)
    pfk.inject_routed_lora(model, ["c_attn", "c_proj", "c_fc"], num_experts=2, rank=2, verbose=False)
    assert len(list(pfk.routed_layers(model))) == 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    with torch.no_grad():
        assert_close(model(IDS).logits, base(IDS).logits, 1e-5)


def test_inject_errors_leave_model_unchanged():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="match no module"):
        pfk.inject_routed_lora(model, ["q_proj", "nope_proj"], verbose=False)
    with pytest.raises(TypeError, match="only nn.Linear"):
        pfk.inject_routed_lora(model, ["embed_tokens"], verbose=False)
    with pytest.raises(ValueError, match="top_k routing needs router='token'"):
        pfk.inject_routed_lora(model, ["q_proj"], top_k=2, router="sequence", verbose=False)
    assert not list(pfk.routed_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_generate_with_sequence_router_holds_prompt_gates():
    model = pfk.inject_routed_lora(tiny_llama(), LLAMA_PROJECTIONS, num_experts=4, rank=2, router="sequence",
                                   verbose=False)
    randomize_adapters(model)
    calls = []
    for m in pfk.routed_layers(model):
        m.router.register_forward_pre_hook(lambda mod, args: calls.append(mod._held is None))
    mask = torch.ones_like(IDS)
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
              attention_mask=mask, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(IDS, use_cache=True, **kw)
        computed_per_layer = sum(calls) / 14
        uncached = model.generate(IDS, use_cache=False, **kw)
    assert computed_per_layer == 1, "each sequence router computes gates once per generate (the prompt)"
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        assert_close(a, b, 1e-4)
    assert all(m.router._held is None and not m.router._holding for m in pfk.routed_layers(model))


def test_persona_gates_per_sequence_mix_and_generate():
    model = pfk.inject_routed_lora(tiny_llama(), LLAMA_PROJECTIONS, num_experts=3, rank=2, router="external",
                                   verbose=False)
    randomize_adapters(model)
    mixes = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    with torch.no_grad(), pfk.persona_gates(model, mixes):
        batched = model(IDS).logits
        out = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, IDS.shape[1] + 3)
    for row in range(2):
        with torch.no_grad(), pfk.persona_gates(model, mixes[row]):
            alone = model(IDS[row : row + 1]).logits
        assert_close(batched[row : row + 1], alone, 1e-5, f"row {row}")
    with pytest.raises(RuntimeError, match="set_gates"):
        model(IDS)  # gates are cleared after the block
    with pytest.raises(ValueError, match="E = 3"):
        with pfk.persona_gates(model, torch.rand(2, 4)):
            pass


def test_save_and_load_adapters_roundtrip_and_mismatch(tmp_path):
    model = pfk.inject_routed_lora(tiny_llama(), ["q_proj", "v_proj"], num_experts=3, rank=2, verbose=False)
    randomize_adapters(model)
    pfk.save_adapters(model, tmp_path / "ckpt")
    other = pfk.inject_routed_lora(tiny_llama(), ["q_proj", "v_proj"], num_experts=3, rank=2, verbose=False)
    with torch.no_grad():
        assert not torch.equal(other(IDS).logits, model(IDS).logits)
        pfk.load_adapters(other, tmp_path / "ckpt")
        assert torch.equal(other(IDS).logits, model(IDS).logits)
    for kw, match in [(dict(num_experts=4, rank=2), "num_experts"), (dict(num_experts=3, rank=3), "rank"),
                      (dict(num_experts=3, rank=2, router="sequence"), "router")]:
        wrong = pfk.inject_routed_lora(tiny_llama(), ["q_proj", "v_proj"], verbose=False, **kw)
        before = {k: v.clone() for k, v in wrong.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            pfk.load_adapters(wrong, tmp_path / "ckpt")
        assert all(torch.equal(v, before[k]) for k, v in wrong.state_dict().items()), "model must be unchanged"
    fewer = pfk.inject_routed_lora(tiny_llama(), ["q_proj"], num_experts=3, rank=2, verbose=False)
    with pytest.raises(ValueError, match="not routed in the model"):
        pfk.load_adapters(fewer, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError):
        pfk.load_adapters(other, tmp_path / "nowhere")


def test_merge_and_unmerge_exactly():
    model = pfk.inject_routed_lora(tiny_llama(), LLAMA_PROJECTIONS, num_experts=3, rank=2, router="external",
                                   verbose=False)
    randomize_adapters(model)
    weights = {n: m.weight.detach().clone() for n, m in pfk.named_routed_layers(model)}
    mix = torch.tensor([0.2, 0.5, 0.3])
    with torch.no_grad(), pfk.persona_gates(model, mix):
        routed = model(IDS).logits
    pfk.merge(model, mix)
    with torch.no_grad():
        merged = model(IDS).logits  # no gates needed: the mix is in W
    assert_close(merged, routed, 1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        pfk.merge(model, mix)
    with pytest.raises(RuntimeError, match="unmerge"):
        pfk.save_adapters(model, "/tmp/never-written")
    pfk.unmerge(model)
    assert all(torch.equal(m.weight, weights[n]) for n, m in pfk.named_routed_layers(model)), "bit-exact unmerge"
    with pytest.raises(ValueError, match="one mix"):
        pfk.merge(model, torch.rand(2, 3))
    with pytest.raises(RuntimeError, match="not merged"):
        pfk.unmerge(model)


def test_torch_compile_fullgraph_llama_matches_eager():
    torch._dynamo.reset()
    model = pfk.inject_routed_lora(tiny_llama(layers=1), LLAMA_PROJECTIONS, num_experts=3, rank=2, router="token",
                                   verbose=False)
    randomize_adapters(model)
    eager = model(IDS, labels=IDS).loss
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert_close(loss, eager, 1e-5, "loss")
    for n, p in model.named_parameters():
        if p.requires_grad:  # inductor reorders fp32 reductions; router-bias grads are sums with cancellation
            assert_close(p.grad, grads[n], 1e-3, n)


def test_hf_trainer_trains_routed_model(tmp_path):
    pytest.importorskip("accelerate")
    model = pfk.inject_routed_lora(tiny_llama(), LLAMA_PROJECTIONS, num_experts=3, rank=2, router="token",
                                   verbose=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 64, (16, 12))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                          logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=data)
    result = trainer.train()
    assert result.training_loss == result.training_loss  # finite, not NaN
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".lora_B" in n for n in changed) and any(".router." in n for n in changed)
    assert not any("base_layer" in n for n, p in model.named_parameters() if p.requires_grad)


@requires_cuda
def test_cuda_graph_capture_of_a_decoding_step():
    model = pfk.inject_routed_lora(tiny_llama(), LLAMA_PROJECTIONS, num_experts=3, rank=2, router="external",
                                   verbose=False).cuda()
    randomize_adapters(model)
    gates = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]], device="cuda")
    hidden = torch.randn(2, 1, 32, device="cuda")
    layer = model.model.layers[0].mlp
    with torch.no_grad(), pfk.persona_gates(model, gates):
        layer(hidden)  # warm up (kernel compilation)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(hidden)
        hidden.copy_(torch.randn_like(hidden))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, layer(hidden), 1e-5)
