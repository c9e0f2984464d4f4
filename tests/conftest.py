"""Shared fixtures: real processes (rendezvous, headless peers), always stopped after the test."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from gradient_nb.mesh.demo import spawn_peer, stop_processes

# Fast liveness settings for tests: a killed peer must leave every registry within
# PEER_TIMEOUT + a heartbeat or two.
HEARTBEAT = 0.5
PEER_TIMEOUT = 3.0
FAST_PEER = ["--heartbeat", str(HEARTBEAT), "--peer-timeout", str(PEER_TIMEOUT)]


class Procs:
    """Processes a test started; every one is stopped at the end, whatever happened."""

    def __init__(self) -> None:
        self.all: list[subprocess.Popen] = []

    def rendezvous(self, *extra: str) -> tuple[subprocess.Popen, str]:
        p = subprocess.Popen([sys.executable, "-m", "gradient_nb.cli", "rendezvous", "--port", "0", *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.all.append(p)
        line = p.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"rendezvous did not start: {p.stderr.read()}")  # type: ignore[union-attr]
        return p, json.loads(line)["url"]

    def peer(self, url: str, name: str, *extra: str, mesh: str = "default") -> subprocess.Popen:
        # Test peers offer the diag.* services (production peers do not).
        p = spawn_peer(url, name=name, mesh=mesh, extra=[*FAST_PEER, *extra], module="gradient_nb.testing.diagpeer")
        self.all.append(p)
        return p

    def stop(self) -> None:
        stop_processes(self.all)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop()


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def ipython():
    """The IPython shell of this test process (IPython keeps one per process). ``globalipapp.get_ipython``
    as imported returns the shell on its first call in a process and None after, so a test that used it
    broke whenever another test module had called it first: tests take the shell from here."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing import globalipapp

    if not InteractiveShell.initialized():
        globalipapp.start_ipython()
    return InteractiveShell.instance()
