"""Benchmark timing on CPU shows its noise: quartiles from torch.utils.benchmark, a spread per row, noisy rows
flagged in the table, whiskers in the plot, and a missing matplotlib named with the extra that installs it."""
from __future__ import annotations

import sys
import time

import pytest
import torch

from personafuse_kernels.bench import kernel_bench as kb


def test_time_call_reports_quartiles_and_resets_grads():
    w = torch.randn(64, 64, requires_grad=True)
    calls = []

    def fn():
        calls.append(w.grad)  # None every time: the timer resets the gradient before each call
        (w @ w).sum().backward()

    t = kb.time_call(fn, "cpu", grad_to_none=[w])
    assert 0 < t.q25_ms <= t.median_ms <= t.q75_ms
    assert t.reps >= 1 and len(calls) >= t.reps and all(g is None for g in calls)
    assert t.spread == pytest.approx((t.q75_ms - t.q25_ms) / t.median_ms)


def test_time_call_measures_what_it_times():
    t = kb.time_call(lambda: time.sleep(0.002), "cpu")
    assert 1.9 < t.median_ms < 20, t


def _row(provider, ms, spread, ratio=None):
    return {"provider": provider, "mode": "fwd", "shape": "", "T": 4, "K": 8, "N": 8, "E": 2, "r": 2, "top_k": 0,
            "ms": ms, "q25_ms": ms * (1 - spread / 2), "q75_ms": ms * (1 + spread / 2), "spread": spread,
            "noisy": spread > kb.NOISY_SPREAD, "ratio_to_base": ratio if ratio is not None else 1.0}


def test_table_flags_noisy_rows_and_says_why():
    rows = [_row("base", 0.5, 0.02), _row("torch", 0.75, 0.4, ratio=1.5)]
    table = kb.format_table(rows)
    assert "0.500ms " in table and "1.50x~" in table
    assert "noisy: interquartile range over 10% of the median in 1 of 2 timings (worst 40%, torch fwd)" in table
    quiet = kb.format_table([_row("base", 0.5, 0.02), _row("torch", 0.75, 0.05, ratio=1.5)])
    assert "~" not in quiet and "noisy" not in quiet


def test_plot_draws_whiskers(tmp_path):
    pytest.importorskip("matplotlib")
    from personafuse_kernels.bench.plot import plot_rows

    rows = [{**_row(p, ms, 0.2, ms / 0.5), "mode": "fwdbwd"} for p, ms in (("base", 0.5), ("loop", 2.0),
                                                                             ("torch", 0.7))]
    png = plot_rows(rows, tmp_path / "bench.png")
    assert png is not None and png.stat().st_size > 1000


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    from personafuse_kernels import cli
    from personafuse_kernels.bench import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert not plot.have_matplotlib()
    with pytest.raises(ImportError, match=r"personafuse-kernels\[bench\]"):
        plot.plot_rows([_row("base", 0.5, 0.0)], tmp_path / "x.png")
    rc = cli.main(["bench", "--device", "cpu", "--providers", "base", "--modes", "fwd", "--shapes", "2,8,8,2,2",
                   "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "plot: skipped: matplotlib is not installed: pip install 'personafuse-kernels[bench]'" in out
