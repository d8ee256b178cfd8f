"""What the command-line entry points share: usage errors (one line on stderr, exit 2) and argument checks that
run before any work."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument or missing input: one line on stderr, exit 2."""


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UsageError), not the whole usage block."""

    def error(self, message):  # argparse's default prints the whole usage block; one line is enough
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def writable_folder(path, what: str) -> Path:
    """The folder `path`, created if needed and checked writable before any work starts (a benchmark or a
    training run must not fail at its end for want of a place to write)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".personafuse-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{what} {folder} is not writable ({exc.strerror or exc})") from None
    return folder


def csv_list(text: str, flag: str, prog: str) -> list[str]:
    """'a, b' -> ['a', 'b']; an empty list is a usage error naming the flag."""
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        raise UsageError(f"{prog}: {flag} {text!r} names nothing")
    return items
