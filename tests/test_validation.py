"""Bad input raises a clear ValueError/TypeError naming the argument; nothing broadcasts silently."""
import pytest
import torch

import personafuse_kernels as pfk


def good(**over):
    T, K, N, E, r = 4, 8, 6, 3, 2
    args = dict(x=torch.randn(2, T, K), weight=torch.randn(N, K), bias=torch.randn(N), lora_A=torch.randn(E, r, K),
                lora_B=torch.randn(E, N, r), gates=torch.rand(2, T, E))
    args.update(over)
    return args


def call(args, **kw):
    return pfk.routed_lora(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], args["gates"], **kw)


def test_good_input_runs():
    assert call(good()).shape == (2, 4, 6)
    assert call(good(gates=torch.rand(2, 3))).shape == (2, 4, 6)  # per sequence


@pytest.mark.parametrize("over,exc,match", [
    (dict(weight=torch.randn(6, 9)), ValueError, r"weight must be \[N, K\].*x \(2, 4, 8\)"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must be \[N\]"),
    (dict(lora_A=torch.randn(3, 2, 9)), ValueError, r"lora_A must be \[E, r, K\]"),
    (dict(lora_B=torch.randn(4, 6, 2)), ValueError, r"number of experts"),
    (dict(lora_B=torch.randn(3, 7, 2)), ValueError, r"lora_B must be \[E, N, r\]"),
    (dict(lora_B=torch.randn(3, 6, 5)), ValueError, r"rank r"),
    (dict(lora_A=torch.randn(3, 8)), ValueError, r"lora_A must have 3 dims"),
    (dict(gates=torch.rand(2, 4, 5)), ValueError, r"expert dim E = 3"),
    (dict(gates=torch.rand(4, 3)), ValueError, r"fit neither layout"),
    (dict(gates=torch.rand(2, 1, 3)), ValueError, r"never broadcast"),
    (dict(gates=torch.rand(1, 4, 3)), ValueError, r"fit neither layout"),
    (dict(gates=torch.randint(0, 2, (2, 4, 3))), TypeError, r"gates must be a floating-point"),
    (dict(gates=torch.rand(2, 4, 3, dtype=torch.float64)), TypeError, r"gates must be float32"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, r"share one dtype"),
    (dict(x=torch.randn(2, 4, 8).numpy()), TypeError, r"x must be a torch.Tensor"),
    (dict(bias=torch.randn(6, device="meta")), ValueError, r"one device"),
])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        call(good(**over))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p"),
    (dict(scaling=torch.ones(4)), ValueError, r"scaling must be a float or a tensor \[E\]"),
    (dict(scaling="2"), TypeError, r"scaling"),
    (dict(scaling=torch.ones(3, requires_grad=True)), ValueError, r"constant"),
    (dict(backend="nope"), ValueError, r"unknown backend"),
])
def test_bad_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(good(), **kw)


def test_explicit_backend_that_cannot_run_fails_loudly():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the cuda backend may run")
    with pytest.raises(RuntimeError, match=r"'cuda' cannot run"):
        call(good(), backend="cuda")


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("PERSONAFUSE_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"PERSONAFUSE_BACKEND='nope'"):
        call(good())
    monkeypatch.setenv("PERSONAFUSE_BACKEND", "torch")
    assert call(good()).shape == (2, 4, 6)


def test_available_backends_has_torch_and_reasons_for_others():
    avail = pfk.available_backends()
    assert "torch" in avail
    for name, why in pfk.unavailable_reasons().items():
        assert name not in avail and why


def test_measured_dispatch_table_steers_auto(monkeypatch):
    """auto follows a measured per-GPU table when one exists (simulated: no GPU here)."""
    import personafuse_kernels.dispatch as d

    monkeypatch.setattr(d, "measured_table", lambda name: {"T<=64": "cuda", "T<=4096": "triton"})
    monkeypatch.setattr(d, "_why_not", lambda backend, device, dtype: None)
    monkeypatch.setattr(d.torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    d._resolve.cache_clear()
    try:
        assert d._resolve("auto", "", "cuda", torch.bfloat16, 0, 64) == "cuda"
        assert d._resolve("auto", "", "cuda", torch.bfloat16, 0, 4096) == "triton"
        assert d._resolve("auto", "", "cuda", torch.bfloat16, 0, 32768) == "triton"  # not in table
        assert d._resolve("auto", "", "cpu", torch.float32, None, 64) == "torch"
    finally:
        d._resolve.cache_clear()


def test_make_dispatch_table_picks_the_faster_backend_per_bucket():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "mdt", Path(__file__).resolve().parents[1] / "benchmarks" / "make_dispatch_table.py")
    mdt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mdt)
    rows = [dict(mode="fwdbwd", provider=p, T=T, ratio_to_base=ratio, device="NVIDIA H200")
            for p, T, ratio in [("triton", 16, 1.9), ("cuda", 16, 1.4), ("triton", 4096, 1.2), ("cuda", 4096, 1.5),
                                ("cuda", 4096, 1.6)]]
    assert mdt.choose(rows, "fwdbwd") == {"T<=16": "cuda", "T<=4096": "triton"}


def test_make_dispatch_table_measures_the_topk_grouped_rule():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "mdt", Path(__file__).resolve().parents[1] / "benchmarks" / "make_dispatch_table.py")
    mdt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mdt)

    def row(provider, E, ratio):
        return dict(mode="fwdbwd", provider=provider, T=8192, K=4096, N=4096, E=E, r=16, top_k=2,
                    ratio_to_base=ratio, device="NVIDIA H200")

    # dense wins at E = 8 and 16 (E r / k = 64, 128), grouped from E = 32 on
    rows = [row(p, E, ratio) for E, g, d in [(8, 1.6, 1.3), (16, 1.7, 1.5), (32, 1.6, 1.8), (64, 1.5, 2.4)]
            for p, ratio in (("triton", g), ("triton-dense", d))]
    assert mdt.topk_threshold(rows, "fwdbwd") == 128
    assert mdt.topk_threshold([row("triton", 8, 1.0)], "fwdbwd") is None  # no -dense twin: no rule
    assert mdt.topk_threshold(rows[-2:], "fwdbwd") == 0.0  # grouped won everywhere measured


def test_prefer_grouped_uses_a_measured_threshold(monkeypatch):
    from personafuse_kernels import dispatch as d

    assert d.prefer_grouped(64, 16, 2) and not d.prefer_grouped(10, 16, 2)
    assert d.prefer_grouped(10, 16, 2, threshold=64) and not d.prefer_grouped(64, 16, 2, threshold=1024)
    monkeypatch.setattr(d.torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    monkeypatch.setattr(d, "measured_table", lambda name: {"topk_grouped_above": 64.0} if name == "Fake GPU" else {})
    d._topk_threshold.cache_clear()
    try:
        assert d._topk_threshold("cuda", 0) == 64.0 and d._topk_threshold("cpu", None) == d.DEFAULT_TOPK_GROUPED_ABOVE
    finally:
        d._topk_threshold.cache_clear()
