"""DistributedDataParallel and FSDP2 (fully_shard) give one process's gradients (gloo, 2 CPU processes)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, mode, out_path):
    import dist_worker

    dist_worker.run(rank, world, port, mode, out_path)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_process_gradients_match_single_process(mode, tmp_path):
    import dist_worker

    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("torch.distributed.fsdp.fully_shard is not available")
    out = tmp_path / "grads.pt"
    mp.spawn(_entry, args=(2, _free_port(), mode, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    ref = dist_worker.reference_grads()
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:5]
    for name in ref:
        assert_close(got[name], ref[name], 1e-4, name)
