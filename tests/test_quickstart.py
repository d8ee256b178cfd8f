"""The README's main job runs end to end (tiny settings) and the loss goes down."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("router", ["token", "sequence"])
def test_quickstart_trains(router):
    cmd = [sys.executable, str(ROOT / "python" / "quickstart.py"), "--steps", "12", "--batch", "4", "--seq", "32",
           "--hidden", "64", "--layers", "1", "--router", router, "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "routed 7 projections" in res.stdout
    assert "tokens/s" in res.stdout and "done: lm loss" in res.stdout


def test_quickstart_bad_device_is_a_clean_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = subprocess.run([sys.executable, str(ROOT / "python" / "quickstart.py"), "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA GPU" in res.stderr
