"""A cell's work ends with the cell, and the kernel's mesh ends with the kernel: real kernels, real meshes.

- Interrupting a running ``%%parallax ask`` cell cancels that request (no more tokens, no request left
  in flight on the entry), while the serving peer and the mesh go on: the next cell and the next ask work.
- ``%%parallax ask --background`` returns at once and ``%parallax cancel`` stops it.
- Shutting the kernel down makes it leave the mesh: the other peers see it (and the peer it spawned) go
  long before the liveness timeout would have dropped them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kernel_driver import CellResult, Kernel, kill_pids, pid_alive

from gradient_nb.mesh.demo import read_event
from gradient_nb.mesh.frames import Message
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from tests.conftest import Procs

pytestmark = pytest.mark.slow

LONG = 400  # tokens a long answer may take: far more than arrive before the interrupt
STORY = "Tell me a long story about a dragon."
# Below pytest's 300 s per test, so that a hang fails with what was awaited rather than a thread dump.
SERVED_TIMEOUT = 200  # the model loads in ~20 s the first time on a fresh machine (it is cached after)
ANSWER_TIMEOUT = 120  # a bound, not a speed: CI's 2 cores also run the serving peer and pytest


@pytest.fixture(scope="module")
def served_url() -> Iterator[str]:
    """A rendezvous and one headless peer serving the whole bundled model, shared by the ask tests."""
    procs = Procs()
    try:
        _, url = procs.rendezvous()
        procs.peer(url, "server", "--serve", "default")
        yield url
    finally:
        procs.stop()


def _answer_widget(kernel: Kernel) -> dict[str, Any] | None:
    """The newest answer widget, as the front-end holds it."""
    found = [w for w in kernel.widgets_of("HTMLModel") if "gradient-nb-answer" in w.get("_dom_classes", [])]
    return found[-1] if found else None


def _streaming(kernel: Kernel) -> Callable[[CellResult], bool]:
    def check(_cell: CellResult) -> bool:
        w = _answer_widget(kernel)
        return w is not None and "▌" in w.get("value", "")  # text has arrived and more is coming
    return check


def _assert_request_stopped(kernel: Kernel) -> int:
    """The last request is over: cancelled, nothing in flight on the entry, and no token arrives any more."""
    cancelled, tokens, inflight = kernel.value(
        "[nb._ask_task.cancelled(), nb.engine.traces[-1].tokens, sum(nb.engine._inflight.values())]")
    assert cancelled, "the request was not cancelled"
    assert 0 < tokens < LONG
    assert inflight == 0, "the cancelled request is still counted in flight on its route"
    kernel.pump(2.0)  # a request still running would add several tokens meanwhile
    assert kernel.value("nb.engine.traces[-1].tokens") == tokens, "tokens kept arriving after the cancel"
    return tokens


def _join_served(kernel: Kernel, url: str) -> None:
    kernel.run("%load_ext gradient_nb\nfrom gradient_nb.notebook.session import current\nnb = current()")
    # Slack for a serving peer whose loop shares CI's 2 cores with its model thread and this kernel: if
    # the kernel takes it for gone, the route goes with it and the next ask waits for it to come back.
    kernel.run(f"%mesh join {url} --ephemeral --name notebook --heartbeat 0.5 --peer-timeout 8")
    kernel.run(f"await nb.ready(serving_peers=1, timeout={SERVED_TIMEOUT})", timeout=SERVED_TIMEOUT + 10)


def test_interrupting_an_ask_cell_cancels_only_that_request(kernel: Kernel, served_url: str) -> None:
    _join_served(kernel, served_url)

    code = f"%%parallax ask --max-tokens {LONG}\n{STORY}"
    msg_id = kernel.start(code)
    kernel.read_until(msg_id, _streaming(kernel), timeout=ANSWER_TIMEOUT, what="the answer to stream")
    assert kernel.partial(msg_id).status == "?", "the ask cell returned before its answer was complete"
    kernel.interrupt()
    cell = kernel.finish(msg_id, timeout=60, ok=False, code=code)
    # One line, no traceback of the magic's internals.
    assert cell.status == "error" and cell.error["ename"] == "UsageError", cell.error
    assert "interrupted" in cell.error["evalue"] and "Traceback" not in cell.stderr, cell.stderr

    _assert_request_stopped(kernel)
    kernel.pump(0.5)
    shown = _answer_widget(kernel)["value"]
    assert "(cancelled after" in shown and "▌" not in shown, shown  # what arrived stays, the cursor goes

    # Only the request stopped: the kernel runs the next cell, the mesh still serves, the next ask works.
    assert kernel.value("sum(range(10))") == 45
    assert kernel.value("len(nb.engine.current_route())") >= 1
    kernel.run("%%parallax ask\nWhat is the capital of France?", timeout=ANSWER_TIMEOUT)
    # The cell returned only once its answer was complete.
    done, answer = kernel.value("[nb._ask_task.done(), nb.last_answer]")
    assert done and "Paris" in answer, answer
    assert kernel.value("sum(nb.engine._inflight.values())") == 0


def test_a_background_ask_is_stopped_by_parallax_cancel(kernel: Kernel, served_url: str) -> None:
    _join_served(kernel, served_url)

    kernel.run(f"%%parallax ask --background --max-tokens {LONG}\n{STORY}")
    # The cell returned at once; other cells run while the answer streams.
    running, tokens, _ = kernel.wait_value("[not nb._ask_task.done(), nb.answer_tokens, 1 + 1]",
                                           lambda v: v[1] > 0 or not v[0], timeout=ANSWER_TIMEOUT,
                                           what="the first tokens")
    assert running and tokens < LONG
    assert kernel.run("%parallax cancel").stdout.strip() == "cancelled 1 answer"
    kernel.wait_value("nb._ask_task.done()", bool, timeout=30, what="the cancel to land")
    _assert_request_stopped(kernel)
    assert kernel.run("%parallax cancel").stdout.strip() == "no answer is streaming"

    kernel.run("%%parallax ask --background\nWhat is the capital of France?")
    assert "Paris" in kernel.value("await nb.answer()", timeout=ANSWER_TIMEOUT)


async def test_kernel_shutdown_leaves_the_mesh_at_once(procs: Procs) -> None:
    # Slow liveness on purpose: a peer that stops heartbeating is dropped only after PEER_TIMEOUT, so a
    # departure seen sooner than that can only be the kernel leaving.
    heartbeat, peer_timeout = 1.0, 20.0
    # jupyter_client is blocking: it runs in one thread of its own, while this loop runs the observer peer.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()

    def in_kernel(fn: Callable[[], Any]) -> asyncio.Future:
        return loop.run_in_executor(pool, fn)

    k: Kernel = await in_kernel(Kernel)
    observer = None
    pids: list[int] = []
    try:
        await in_kernel(lambda: k.run("import asyncio\n%load_ext gradient_nb\n"
                                      "from gradient_nb.notebook.session import current\nnb = current()"))
        # A local mesh introduced by the kernel itself, and a volunteer peer process the kernel starts.
        await in_kernel(lambda: k.run(f"%mesh join --ephemeral --name notebook --heartbeat {heartbeat} "
                                      f"--peer-timeout {peer_timeout}"))
        await in_kernel(lambda: k.run("%mesh spawn 1"))
        await in_kernel(lambda: k.wait_value("len(nb.local_peers)", lambda n: n == 1, timeout=60,
                                             what="the volunteer to start"))
        url = await in_kernel(lambda: k.value("(await nb.wait_mesh()).url"))
        kernel_ids = await in_kernel(lambda: k.value(
            "[nb.mesh.id] + [await asyncio.wait_for(p.joined, 120) for p in nb.local_peers]"))
        assert len(kernel_ids) == 2
        pids = await in_kernel(lambda: k.value("[p.pid for p in nb.local_peers]"))

        # Two other peers: this test process, and a separate peer process.
        other = procs.peer(url, "other", "--heartbeat", str(heartbeat), "--peer-timeout", str(peer_timeout))
        other_id = (await read_event(other))["peer_id"]
        observer = await join(url, name="observer", identity=Identity.generate(), heartbeat=heartbeat,
                              peer_timeout=peer_timeout, probe_seconds=0.05)

        async def other_sees() -> set[str]:
            view = await observer.call(other_id, "diag.view", Message({"namespace": ""}), timeout=10)
            return set(view.header["peers"])

        everyone = {*kernel_ids, other_id, observer.id}
        deadline = time.monotonic() + 60
        while not (everyone <= {p.id for p in observer.peers()} and everyone <= await other_sees()):
            assert time.monotonic() < deadline, "the peers did not all see each other"
            await asyncio.sleep(0.2)

        started = time.monotonic()
        shutdown = in_kernel(lambda: k.km.shutdown_kernel(now=False))
        # Were the kernel's peers dropped by timeout, it would be PEER_TIMEOUT after their last heartbeat
        # at the soonest, and the last one may have come up to a heartbeat before the shutdown began.
        bound = peer_timeout - heartbeat
        while True:
            left_observer = not set(kernel_ids) & {p.id for p in observer.peers()}
            if left_observer and not set(kernel_ids) & await other_sees():
                break
            assert time.monotonic() - started < bound, "the kernel's peers were not seen leaving"
            await asyncio.sleep(0.1)
        await asyncio.wait_for(shutdown, 30)
        # The peers that stay are still in the mesh, linked to each other.
        assert {other_id, observer.id} <= await other_sees()
    finally:
        if observer is not None:
            await observer.leave()
        await in_kernel(k.kc.stop_channels)
        if k.km.has_kernel:
            await in_kernel(lambda: k.km.shutdown_kernel(now=True))
        kill_pids([p for p in pids if pid_alive(p)])
        pool.shutdown()
