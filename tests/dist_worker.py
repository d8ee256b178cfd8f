"""Worker for tests/test_distributed.py: one rank of a 2-process gloo run on CPU (DDP or FSDP2)."""
import os

import torch
import torch.distributed as dist
from helpers import LLAMA_PROJECTIONS, randomize_adapters, tiny_llama

import personafuse_kernels as pfk

BATCH = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(3))


def build_model():
    model = pfk.inject_routed_lora(tiny_llama(), LLAMA_PROJECTIONS, num_experts=3, rank=2, router="token",
                                   verbose=False)
    return randomize_adapters(model).train()


def trainable_grads(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2 keeps sharded DTensor gradients
                g = g.full_tensor()
            out[name] = g.detach().clone()  # the unwrapped model's names: DDP and FSDP2 keep them
    return out


def reference_grads():
    model = build_model()
    model(input_ids=BATCH, labels=BATCH).loss.backward()
    return trainable_grads(model)


def run(rank: int, world: int, port: int, mode: str, out_path: str):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model()
        shard = BATCH.chunk(world)[rank]
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
            wrapped(input_ids=shard, labels=shard).loss.backward()
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model(input_ids=shard, labels=shard).loss.backward()
            # FSDP2 reduce-scatters the mean over ranks, like DDP
        grads = trainable_grads(model)
        if rank == 0:
            torch.save(grads, out_path)
    finally:
        dist.destroy_process_group()
