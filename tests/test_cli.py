"""The `personafuse` command: check, bench and demo with tiny settings; bad arguments are one line, exit 2."""
import json
import os
import re
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
    res = cli("bench", "--quick", "--device", "cpu", "--out", str(tmp_path),
              "--providers", "base,loop,xlora,stacked,torch,triton",
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


def test_bad_arguments_exit_2_from_the_console():
    """One real process: the exit code and a one-line message (the cases below run in-process, faster)."""
    res = cli("frobnicate", timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    err = res.stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err, err


def _demo_module():
    from personafuse_kernels import demo

    return demo


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a command got past its argument checks into real work (a benchmark or training)."""
    from personafuse_kernels.bench import kernel_bench

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(kernel_bench, "run", refuse)
    monkeypatch.setattr(_demo_module(), "demo", refuse)


@pytest.mark.parametrize("args,match", [
    (["bench", "--providers", "nope"], "unknown provider"),
    (["bench", "--providers", ","], "--providers ',' names nothing"),
    (["bench", "--modes", ""], "--modes '' names nothing"),
    (["bench", "--shapes", "1,2,3"], "a shape is"),
    (["bench", "--shapes", "gigantic"], "unknown shape preset"),
    (["bench", "--modes", "sideways"], "unknown mode"),
    (["bench", "--dtype", "float8"], "invalid choice"),
    (["bench", "--out", "{file}"], "is a file, not a folder"),
    (["demo", "--model", "/no/such/model"], "is not a folder"),
    (["demo", "--model", "{dir}"], "holds no config.json"),
    (["demo", "--mix", "Z+=1"], "unknown persona"),
    (["demo", "--mix", "E+=nan"], "weights must be finite"),
    (["demo", "--mix", "E+=0.5,E+=0.3"], "appears twice"),
    (["demo", "--steps", "zero"], "invalid int value"),
    (["demo", "--timing-steps", "0"], "--timing-steps must be >= 1"),
    (["demo", "--rank", "0"], "--rank must be >= 1"),
    (["demo", "--dropout", "1.5"], r"--dropout must be in \[0, 1\)"),
    (["demo", "--hidden", "3"], "--hidden must be a multiple of 4"),
    (["demo", "--device", "xyz"], "is not a device"),
    (["demo", "--out", "{file}"], "is a file, not a folder"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_are_one_line_exit_2_and_before_any_work(args, match, tmp_path, capsys, no_work):
    from personafuse_kernels.cli import main

    (tmp_path / "afile").write_text("x")
    args = [a.format(file=tmp_path / "afile", dir=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    assert re.search(match, err), err


@pytest.mark.parametrize("verb", ["bench", "demo"])
def test_unwritable_out_is_refused_before_any_work(verb, tmp_path, monkeypatch, capsys, no_work):
    """CI runs as root, where chmod does not stop writes: the failure is injected into the write probe."""
    import errno
    from pathlib import Path

    from personafuse_kernels.cli import main

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    assert main([verb, "--out", str(tmp_path / "out")]) == 2
    assert "is not writable (Read-only file system)" in capsys.readouterr().err


def test_recipe_script_runs_the_demo_command_line():
    res = subprocess.run([sys.executable, str(ROOT / "python" / "persona_demo.py"), "--rank", "0"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--rank must be >= 1" in res.stderr, res.stderr


def test_demo_without_out_removes_its_temporary_folder(tmp_path, monkeypatch):
    demo_module = _demo_module()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    used = []

    def fake_demo(args, mix, out):
        used.append(out)
        (out / "adapters").mkdir()
        if len(used) == 2:
            raise RuntimeError("failed mid-demo")
        return 0

    monkeypatch.setattr(demo_module, "demo", fake_demo)
    assert demo_module.main(["--steps", "1"]) == 0
    with pytest.raises(RuntimeError, match="failed mid-demo"):
        demo_module.main(["--steps", "1"])
    assert all(str(p).startswith(str(tmp_path)) and not p.exists() for p in used), used


def test_bf16_self_test_passes_torch_and_catches_an_off_kernel(monkeypatch):
    """`personafuse check`'s bfloat16 self-test (run per kernel backend on GPUs): the 3x rule holds for the
    reference itself, and a backend whose output is 2 % off fails it."""
    import personafuse_kernels.functional as functional
    from personafuse_kernels import selftest

    ok, ratio, _ = selftest.self_test_bf16("torch", "cpu")
    assert ok and ratio <= 1.0
    real = functional.routed_lora

    def off_by_two_percent(*args, backend=None, **kwargs):
        y = real(*args, backend="torch", **kwargs)
        return y * 1.02 if backend == "fake" else y

    monkeypatch.setattr(functional, "routed_lora", off_by_two_percent)
    ok, ratio, detail = selftest.self_test_bf16("fake", "cpu")
    assert not ok and ratio > 3 and detail.startswith("y (decode)"), detail
