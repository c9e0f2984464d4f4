"""Echo with real processes killed: a sampler mid-rollout (training goes on with the other), then the trainer
(the sampler left goes back to the base weights when its lease runs out; nothing hangs, nothing is left
behind). The trainer is ``gradient-nb echo train CONFIG.yaml --rendezvous URL``, the samplers volunteers'
``gradient-nb peer --serve``, as users run them; the tiny warm-started model, a few short completions a step.
(That a killed parent's own children end with it is ``tests/mesh/test_processes.py``'s.)
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from gradient_nb.mesh.processes import spawn_owned

pytestmark = pytest.mark.slow

EVENT_TIMEOUT = 180.0  # s: bound on waiting for one event line (model loads on a loaded 2-core machine)


class Events:
    """The JSON event lines a child prints, read in a thread so that every wait has a timeout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def drain(self) -> None:
        """Take what was printed so far, so that ``next`` waits for a new event."""
        while True:
            try:
                e = self.lines.get_nowait()
            except queue.Empty:
                return
            if e is None:
                self.lines.put(None)
                return
            self.seen.append(e)

    def next(self, event: str, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                e = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {event!r} event within {timeout:.0f} s; saw {self.seen[-3:]}") from None
            assert e is not None, f"the process ended (code {self.proc.wait()}) before a {event!r} event"
            self.seen.append(e)
            if e["event"] == event:
                return e


def _config(tmp_path: Path, warm: Path, **kw: Any) -> Path:
    cfg = {"task": "format", "mode": "sequential", "model": str(warm), "num_generations": 4, "max_tokens": 8,
           "sync_deadline_s": 10, **kw}
    path = tmp_path / "echo.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return path


def _trainer(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return spawn_owned([sys.executable, "-m", "gradient_nb.cli", "echo", "train", *args], stderr=err)


def _all_gone(procs: list[psutil.Process], timeout: float = 30.0) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"


async def test_kill_a_sampler_mid_rollout_then_the_trainer(warm: Path, tmp_path: Path) -> None:
    from gradient_nb.mesh.identity import Identity
    from gradient_nb.mesh.peer import join
    from gradient_nb.mesh.processes import read_event, spawn_peer, stop_processes
    from gradient_nb.mesh.rendezvous import Rendezvous

    lease, generations = 3.0, 4
    rv = await Rendezvous().start()
    volunteers = [spawn_peer(rv.url, name=f"volunteer-{i}", extra=["--serve", str(warm), "--heartbeat", "0.5",
                                                                   "--peer-timeout", "3"]) for i in (1, 2)]
    trainer = None
    watcher = await join(rv.url, name="watcher", identity=Identity.generate(), observe=True)
    try:
        ids = [(await read_event(v, EVENT_TIMEOUT))["peer_id"] for v in volunteers]
        # A run far longer than the test: it only ends by the kill.
        config = _config(tmp_path, warm, steps=1000, num_generations=generations, sampler_lease_s=lease)
        trainer = _trainer([str(config), "--rendezvous", rv.url, "--peers", "2"], tmp_path / "trainer.log")
        events = Events(trainer)
        tid = (await asyncio.to_thread(events.next, "joined"))["peer_id"]
        await asyncio.to_thread(events.next, "step")

        def echo(i: int) -> dict[str, Any]:
            return (watcher.state.peers().get(ids[i]) or {}).get("echo") or {}

        async def until(predicate, timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while not predicate():
                assert time.monotonic() < deadline, f"{what}: echo records {echo(0)}, {echo(1)}"
                await asyncio.sleep(0.1)

        await until(lambda: all(echo(i).get("trainer") == tid and echo(i).get("tag") for i in (0, 1)), 30,
                    "the volunteers never said they sample for the trainer")
        # Mid-rollout: a step has just ended, so the next batch is being synced and sampled (most of a step:
        # a training step on this model takes a tenth of a rollout).
        events.drain()
        await asyncio.to_thread(events.next, "step")
        volunteers[0].send_signal(signal.SIGKILL)
        after = [await asyncio.to_thread(events.next, "step") for _ in range(2)]
        assert all(e["samples"] == generations for e in after), after  # full batches, from the sampler left
        assert len({e["version"] for e in after}) == 2  # each one a new version, trained on

        trainer_tree = [psutil.Process(trainer.pid), *psutil.Process(trainer.pid).children(recursive=True)]
        trainer.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(trainer.wait, 30) == -signal.SIGKILL
        # Its lease runs out: no run's tag on its replies any more, the base weights back, said in its record
        # (heartbeats every 0.5 s carry it to the watcher; the margin is for a loaded machine).
        await until(lambda: echo(1).get("tag") is None and "stopped" in str(echo(1).get("state")), lease + 30,
                    "the volunteer still samples for a dead trainer")
        assert "no sync from the trainer" in echo(1)["state"]
        assert volunteers[1].poll() is None  # a volunteer outlives the trainers it sampled for
        _all_gone(trainer_tree)
    finally:
        await watcher.leave()
        await asyncio.to_thread(stop_processes, [p for p in (trainer, *volunteers) if p is not None])
        await rv.stop()
    assert volunteers[1].returncode == 0  # SIGTERM: it left cleanly, nothing hung
