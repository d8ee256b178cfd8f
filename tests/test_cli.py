"""The `personafuse` command: check, bench and demo with tiny settings; bad arguments are one line, exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "personafuse_kernels.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_console_script_is_installed():
    from importlib import metadata

    try:
        metadata.distribution("personafuse-kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("running from a checkout that was not pip-installed (no console scripts)")
    script = Path(sys.executable).parent / "personafuse"
    assert script.exists(), "setup.py must install the `personafuse` console script"


def test_check_reports_backends_and_passes_self_test():
    res = cli("check")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "backends:" in out and "torch" in out and "self-test" in out
    assert "torch   PASS" in out and "all available backends pass" in out
    assert "CUDA extension built:" in out


def test_bench_quick_writes_rows_table_and_plot(tmp_path):
    res = cli("bench", "--quick", "--device", "cpu", "--out", str(tmp_path), "--providers", "base,loop,xlora,stacked,torch,triton",
              "--modes", "fwd,bwd,fwdbwd", "--shapes", "5,48,40,10,16", "--no-progress", "--e2e")
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwdbwd"}
    ok = [r for r in rows if "error" not in r]
    assert {r["provider"] for r in ok} >= {"base", "loop", "xlora", "stacked", "torch"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["commit"] for r in ok)
    triton = [r for r in rows if r["provider"] == "triton"]
    assert all("error" in r for r in triton), "triton needs a CUDA device: recorded as n/a, not timed on CPU"
    assert (tmp_path / "rows.csv").exists()
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "bench.png").stat().st_size > 1000
    except ImportError:
        assert "plot: skipped" in res.stdout
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert {r["provider"] for r in e2e} == {"personafuse", "loop"} and all(r["tokens_per_s"] > 0 for r in e2e)
    assert "ratio" in res.stdout and "speed-up over the per-expert loop" in res.stdout


def test_demo_runs_end_to_end(tmp_path):
    res = cli("demo", "--steps", "20", "--batch", "8", "--hidden", "32", "--rank", "4", "--timing-steps", "1",
              "--no-progress", "--out", str(tmp_path), "--mix", "O+=1")
    assert res.returncode == 0, res.stdout + res.stderr
    for step in range(1, 7):
        assert f"[{step}/6]" in res.stdout
    assert "outputs identical" in res.stdout and "unseen prompts" in res.stdout
    assert (tmp_path / "adapters" / "adapters.safetensors").exists() and (tmp_path / "router.safetensors").exists()


@pytest.mark.parametrize("args", [
    ["bench", "--providers", "nope"],
    ["bench", "--shapes", "1,2,3"],
    ["bench", "--shapes", "gigantic"],
    ["bench", "--modes", "sideways"],
    ["bench", "--dtype", "float8"],
    ["demo", "--model", "/no/such/model"],
    ["demo", "--mix", "Z+=1"],
    ["demo", "--steps", "zero"],
    ["frobnicate"],
])
def test_bad_arguments_are_one_line_and_exit_2(args):
    res = cli(*args, timeout=120)
    assert res.returncode == 2, (args, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err, err


def test_bf16_self_test_passes_torch_and_catches_an_off_kernel(monkeypatch):
    """`personafuse check`'s bfloat16 self-test (run per kernel backend on GPUs): the 3x rule holds for the
    reference itself, and a backend whose output is 2 % off fails it."""
    import personafuse_kernels.cli as cli
    import personafuse_kernels.functional as functional

    ok, ratio, _ = cli.self_test_bf16("torch", "cpu")
    assert ok and ratio <= 1.0
    real = functional.routed_lora

    def off_by_two_percent(*args, backend=None, **kwargs):
        y = real(*args, backend="torch", **kwargs)
        return y * 1.02 if backend == "fake" else y

    monkeypatch.setattr(functional, "routed_lora", off_by_two_percent)
    ok, ratio, detail = cli.self_test_bf16("fake", "cpu")
    assert not ok and ratio > 3 and detail.startswith("y (decode)"), detail
