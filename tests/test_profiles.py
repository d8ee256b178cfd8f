"""The test profiles and the time budget (tests/profile_plugin.py): a session over its hard limit fails, the
default profile leaves out tests marked `long`, and the line with the measured time is printed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from profile_plugin import budget_verdict

TESTS = Path(__file__).resolve().parent

SUITE = '''
import pytest

def test_short():
    assert 1 + 1 == 2

@pytest.mark.long
def test_sweep():
    assert 2 + 2 == 4
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "pytest", "-p", "profile_plugin", "-p", "no:cacheprovider", "-c", os.devnull,
           "--rootdir", str(tmp_path), str(tmp_path / "test_suite.py"), "-v", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_budget_verdict():
    expected = "[budget] pytest took 1.0 min, target 20 min (within), hard limit 40 min"
    assert budget_verdict(60, 20, 40) == (False, expected)
    over, line = budget_verdict(25 * 60, 20, 40)
    assert not over and "target 20 min (OVER)" in line
    over, line = budget_verdict(41 * 60, 20, 40)
    assert over and "hard limit 40 min: OVER, failing the run" in line
    assert budget_verdict(10_000, None, None) == (False, "[budget] pytest took 166.7 min")


def test_default_profile_deselects_long_and_prints_budget(tmp_path):
    res = _pytest(tmp_path, "--budget-target-min=20", "--budget-limit-min=40")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test_short PASSED" in res.stdout and "test_sweep" not in res.stdout.replace("1 deselected", "")
    assert "1 deselected" in res.stdout
    assert "[budget] pytest took" in res.stdout and "target 20 min (within)" in res.stdout


def test_long_profile_runs_everything(tmp_path):
    res = _pytest(tmp_path, "--profile=long")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test_sweep PASSED" in res.stdout and "[budget]" not in res.stdout


@pytest.mark.parametrize("passing", [True, False])
def test_over_the_hard_limit_fails_the_session(tmp_path, passing):
    res = _pytest(tmp_path, "--budget-limit-min=0", *([] if passing else ["-k", "nothing_matches"]))
    # all tests passed, but the session took longer than 0 minutes: exit code 1 (no tests: pytest's own 5)
    assert res.returncode == (1 if passing else 5), res.stdout + res.stderr
    assert "OVER, failing the run" in res.stdout
