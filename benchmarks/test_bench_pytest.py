"""pytest-benchmark cases of the routed LoRA op: `pytest benchmarks/ --benchmark-only`.

Small shapes on CPU, the PersonaFuse / Llama-3.1-8B shapes on a GPU. Each case is one provider x mode x shape;
the base F.linear runs as its own case so ratios can be read off the same session's table.
"""
import pytest
import torch

from personafuse_kernels.bench.kernel_bench import Shape, _inputs, preset_shapes
from personafuse_kernels.bench.providers import PROVIDERS, make_provider, unavailable

pytest.importorskip("pytest_benchmark")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPES = (preset_shapes("issue") if DEVICE == "cuda"
          else [Shape(16, 256, 256, 10, 16, "tiny"), Shape(256, 256, 512, 10, 16, "tiny")])


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label().replace(" ", "_"))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "compile"])
def test_routed_lora(benchmark, provider, mode, shape):
    why = unavailable(provider, DEVICE)
    if why:
        pytest.skip(why)
    W, b, A, B, sets = _inputs(shape, DEVICE, DTYPE, grads=mode == "fwdbwd")
    x, g = sets[0]
    s = torch.full((shape.E,), 2.0, device=DEVICE)
    fwd = make_provider(provider)
    dy = torch.randn(shape.T, shape.N, device=DEVICE, dtype=DTYPE)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fwd(x, W, b, A, B, g, s)
        else:
            fwd(x, W, b, A, B, g, s).backward(dy)
        _sync()

    benchmark.extra_info.update(provider=provider, mode=mode, shape=shape.label(), device=DEVICE)
    benchmark(run)
