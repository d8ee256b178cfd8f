"""Test profiles and the time budget of the default one (loaded by tests/conftest.py).

--profile=default  deselects the tests marked `long` (big interpreter grids, long property-based runs,
                   builds of the wheel and the JIT extension); CI runs this profile.
--profile=long     runs everything.
--budget-target-min / --budget-limit-min: after the session, one line says how long pytest took against the
target; over the hard limit the session fails, so a suite that creeps towards CI's wall is seen early. The
limit is generous because the 2-core CI machine runs up to 3x slower under load than idle.
"""
from __future__ import annotations

import time

import pytest

_START = pytest.StashKey[float]()
PROFILE = "default"  # set in pytest_configure, before test modules are imported: property suites size themselves


def examples(default: int) -> int:
    """Hypothesis examples for a property test: `default` in the default profile, ten times as many in the long."""
    return default * 10 if PROFILE == "long" else default


def pytest_addoption(parser):
    group = parser.getgroup("personafuse profiles")
    group.addoption("--profile", choices=("default", "long"), default="default",
                    help="default: leave out tests marked `long`; long: run everything")
    group.addoption("--budget-target-min", type=float, default=None,
                    help="print the session's time against this target (minutes)")
    group.addoption("--budget-limit-min", type=float, default=None,
                    help="fail the session when it runs longer than this (minutes)")


def pytest_configure(config):
    global PROFILE
    PROFILE = config.getoption("--profile")
    config.addinivalue_line("markers", "long: long sweep, only in the long profile (--profile=long)")
    config.stash[_START] = time.monotonic()


def pytest_collection_modifyitems(config, items):
    if config.getoption("--profile") == "long":
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("long") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def budget_verdict(elapsed_s: float, target_min: float | None, limit_min: float | None) -> tuple[bool, str]:
    """(over the hard limit, the line to print) for a session that took `elapsed_s` seconds."""
    minutes = elapsed_s / 60
    parts = [f"pytest took {minutes:.1f} min"]
    if target_min is not None:
        parts.append(f"target {target_min:g} min ({'within' if minutes <= target_min else 'OVER'})")
    over = limit_min is not None and minutes > limit_min
    if limit_min is not None:
        parts.append(f"hard limit {limit_min:g} min" + (": OVER, failing the run" if over else ""))
    return over, "[budget] " + ", ".join(parts)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    target, limit = config.getoption("--budget-target-min"), config.getoption("--budget-limit-min")
    if target is None and limit is None:
        return
    over, line = budget_verdict(time.monotonic() - config.stash[_START], target, limit)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(line, red=over, bold=over)
    if over and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
