"""End-to-end: training-step tokens/s and peak memory of a Llama-style model with routed LoRA in all seven
projections, personafuse kernels against the same model computing with the per-expert loop."""
from __future__ import annotations

import time

import torch

from ..integration.inject import inject_routed_lora
from .providers import per_expert_loop

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# about 1.1B parameters (TinyLlama-like) on a GPU; a tiny one on CPU
GPU_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)
CPU_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)


def build_model(device: str, dtype: torch.dtype, experts: int, rank: int, config: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False,
                      **(config or (GPU_MODEL if device == "cuda" else CPU_MODEL)))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    inject_routed_lora(model, LLAMA_PROJECTIONS, num_experts=experts, rank=rank, alpha=2 * rank, router="token",
                       verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 3:  # lora_B: non-zero, so the branch is real work
                p.normal_(std=0.01)
    return model.train()


def train_tokens_per_s(model, batch: int, seq: int, steps: int, device: str) -> tuple[float, float | None]:
    """(tokens/s over `steps` timed steps after one warm-up step, peak MiB on a GPU)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return batch * seq * steps / elapsed, peak


def run_e2e(device: str, dtype: torch.dtype, batch: int, seq: int, steps: int, experts: int = 10, rank: int = 16,
            config: dict | None = None) -> list[dict]:
    rows = []
    model = build_model(device, dtype, experts, rank, config)
    params = sum(p.numel() for p in model.parameters())
    for provider in ("personafuse", "loop"):
        if provider == "loop":
            with per_expert_loop(model):
                tps, peak = train_tokens_per_s(model, batch, seq, steps, device)
        else:
            tps, peak = train_tokens_per_s(model, batch, seq, steps, device)
        rows.append({"provider": provider, "mode": "e2e-train", "params": params, "batch": batch, "seq": seq,
                     "E": experts, "r": rank, "dtype": str(dtype).replace("torch.", ""),
                     "tokens_per_s": round(tps, 1), "peak_mib": None if peak is None else round(peak, 1)})
    return rows


def format_e2e(rows: list[dict]) -> str:
    by = {r["provider"]: r for r in rows}
    lines = [f"end-to-end training step, Llama-style {rows[0]['params'] / 1e6:.1f}M params, batch {rows[0]['batch']}"
             f" x seq {rows[0]['seq']}, E={rows[0]['E']} r={rows[0]['r']}, {rows[0]['dtype']}"]
    for name, r in by.items():
        mem = f", peak {r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else ""
        lines.append(f"  {name:<12}{r['tokens_per_s']:>12,.0f} tokens/s{mem}")
    if "loop" in by and "personafuse" in by:
        speedup = by["personafuse"]["tokens_per_s"] / by["loop"]["tokens_per_s"]
        lines.append(f"  speed-up over the per-expert loop: {speedup:.2f}x")
    return "\n".join(lines)
