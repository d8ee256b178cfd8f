"""Quickstart: routed LoRA in every projection of a small Llama, trained for a few steps.

A Llama is built from an embedded config (random, frozen weights: no download). Every attention and MLP
projection (q, k, v, o, gate, up, down) becomes a RoutedLoRALinear with E experts and a router; adapters and
routers train on a synthetic task with several "personas" (each sequence follows one of P token rules, so a
good router sends each persona to its own experts). Prints loss and training tokens/s.

    python python/quickstart.py                       # CPU or GPU, defaults below
    python python/quickstart.py --steps 50 --router sequence --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import personafuse_kernels as pfk

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(args):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        sys.exit("quickstart needs transformers: pip install transformers")
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq * 2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    return pfk.inject_routed_lora(model, PROJECTIONS, num_experts=args.experts, rank=args.rank, alpha=2 * args.rank,
                                  dropout=args.dropout, router=args.router)


def persona_batch(batch: int, seq: int, vocab: int, personas: int, gen: torch.Generator):
    """Each row follows one persona's rule next = (a_p * prev + b_p) mod vocab from a random start."""
    p = torch.randint(0, personas, (batch,), generator=gen)
    mult = 1 + 2 * (p + 1)  # odd multipliers 3, 5, 7, ...
    add = 7 * p + 1
    tok = torch.empty(batch, seq, dtype=torch.long)
    tok[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for i in range(1, seq):
        tok[:, i] = (mult * tok[:, i - 1] + add) % vocab
    return tok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--personas", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--router", choices=["token", "sequence"], default="token")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--backend", default="auto", help="routed LoRA backend: auto, torch, triton, cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is visible")

    torch.manual_seed(args.seed)
    model = build_model(args).to(device=args.device, dtype=getattr(torch, args.dtype))
    for layer in pfk.routed_layers(model):
        layer.backend = args.backend
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    backend_used = pfk.dispatch.resolve_backend(args.backend, torch.device(args.device), getattr(torch, args.dtype))
    print(f"quickstart: Llama {args.layers} layers x hidden {args.hidden} on {args.device} ({args.dtype}), "
          f"backend {backend_used}, {args.steps} steps of {args.batch}x{args.seq} tokens")

    model.train()
    num_layers = len(list(pfk.routed_layers(model)))
    first = last = None
    tokens_timed, time_timed = 0, 0.0
    for step in range(1, args.steps + 1):
        ids = persona_batch(args.batch, args.seq, args.vocab, args.personas, gen).to(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mask = torch.ones_like(ids)
        with pfk.routing_inputs(model, attention_mask=mask if args.router == "sequence" else None):
            out = model(input_ids=ids, labels=ids)
        aux = pfk.router_aux_losses(model)
        dev = out.loss.device
        loss = out.loss + 0.01 * aux["load_balancing_loss"].to(dev) + 1e-3 * aux["z_loss"].to(dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step > 1:  # the first step includes one-time setup (kernel compilation, allocator warm-up)
            tokens_timed += ids.numel()
            time_timed += dt
        lm = out.loss.item()
        first = lm if first is None else first
        last = lm
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            lb = aux["load_balancing_loss"].item() / num_layers
            print(f"  step {step:4d}  lm loss {lm:.4f}  aux lb/layer {lb:.3f}  "
                  f"{ids.numel() / dt:,.0f} tok/s")
    tps = tokens_timed / time_timed if time_timed > 0 else float("nan")
    print(f"done: lm loss {first:.4f} -> {last:.4f}; training throughput {tps:,.0f} tokens/s "
          f"(steps 2..{args.steps}, {args.device})")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
