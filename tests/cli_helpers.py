"""Helpers for tests that run an `anomaly-sidecar` command as a process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["sidecar_process", "wait_for_text"]


@contextmanager
def sidecar_process(
    args: Sequence[str], stderr_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m sidecar ARGS`, its log in `stderr_path`.

    A process the test left running (it failed before stopping it) is killed
    on the way out, so no sidecar outlives its test.
    """
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for_text(path: Path, text: str, timeout: float) -> None:
    """Wait until `text` is in the file; fail with the file's content if not."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{path.read_text()}"
        time.sleep(0.1)
