"""The tree is ruff-clean (pyproject.toml's [tool.ruff]) and clang-format-clean (.clang-format), so style never
needs a review comment. Each check skips, saying so, where its tool is not installed (both are in
requirements-dev.txt, so CI has them)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPP_DIRS = ("csrc", "tests/cuda_emu")
CPP_SUFFIXES = (".h", ".cuh", ".cu", ".cpp")


def _tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name  # the venv's copy, even when the venv is not on PATH
    return str(here) if here.exists() else shutil.which(name)


def test_ruff_clean():
    ruff = _tool("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    res = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", str(ROOT)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_clang_format_clean():
    clang_format = _tool("clang-format")
    if clang_format is None:
        pytest.skip("clang-format is not installed")
    files = sorted(str(p) for d in CPP_DIRS for p in (ROOT / d).rglob("*") if p.suffix in CPP_SUFFIXES)
    assert len(files) > 10
    res = subprocess.run([clang_format, "--dry-run", "-Werror", *files], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, "run `clang-format -i` on:\n" + res.stderr[-4000:]
