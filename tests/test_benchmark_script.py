"""The benchmark script runs (CPU quick mode), writes rows with the run's facts, and rejects bad arguments."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_routed_lora.py"


def test_quick_run_writes_rows(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--providers", "base,loop,stacked,torch",
                          "--shapes", "3,32,48,4,8", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {r["provider"] for r in rows} == {"base", "loop", "stacked", "torch"}
    assert all(r["ms"] > 0 and r["commit"] and r["device"].startswith("cpu") for r in rows)
    base = [r for r in rows if r["provider"] == "base" and r["mode"] == "fwd"][0]
    assert base["ratio_to_base"] == 1.0
    import csv

    with open(tmp_path / "rows.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and [r["provider"] for r in csv_rows] == [r["provider"] for r in rows]
    assert "ratio to base" in res.stdout


def test_bad_arguments_exit_2():
    for args in (["--providers", "nope"], ["--shapes", "1,2,3"], ["--modes", "sideways"]):
        res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2, (args, res.stderr)


def test_every_provider_computes_the_same_function():
    """The baselines are honest: loop, peft's X-LoRA layer, stacked torch and our backends agree."""
    import torch

    from personafuse_kernels.bench.providers import make_provider, unavailable

    torch.manual_seed(0)
    T, K, N, E, r = 7, 33, 45, 3, 4
    args = (torch.randn(T, K), torch.randn(N, K), torch.randn(N), torch.randn(E, r, K), torch.randn(E, N, r),
            torch.rand(T, E), torch.tensor([0.5, 1.0, 2.0]))
    ref = make_provider("loop")(*args)
    for name in ("xlora", "stacked", "torch"):
        if unavailable(name, "cpu"):
            continue
        torch.testing.assert_close(make_provider(name)(*args), ref, rtol=1e-5, atol=1e-4, msg=name)


def test_tuner_runs_every_variant_in_the_interpreter():
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_triton.py"), "--device", "cpu",
                          "--buckets", "1,100"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "failed" not in res.stdout, res.stdout
    assert res.stdout.count("ran (interpreter") >= 10
