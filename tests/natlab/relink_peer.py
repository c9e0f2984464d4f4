"""A mesh peer for the dead-link test, run inside a NAT lab host: ``serve`` or ``drive``.

``serve URL ICE``: joins, offers ``t.echo`` and a paced streaming ``t.count``, prints its peer id,
runs until stdin closes.

``drive URL ICE PEER``: joins, calls the server, starts a long paced stream and prints
``{"streaming": ...}`` once items flow. The test then makes the NAT forget its mappings and writes
``broken`` on stdin. The driver reports how the stream ended (the error's type and message, and
how long after ``broken``), then that the mesh re-linked by itself and that new calls and
streams work over the new link, and the published RTT of the new link.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable

from gradient_nb.mesh.errors import MeshError
from gradient_nb.mesh.frames import Message
from gradient_nb.mesh.ice import IceConfig
from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.rpc import CallContext


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def until(check: Callable[[], bool]) -> None:
    """Poll ``check`` (the caller bounds the wait)."""
    while True:
        if check():
            return
        await asyncio.sleep(0.1)


async def stdin_lines() -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            queue.put_nowait(line.strip())
        queue.put_nowait("")

    asyncio.get_running_loop().run_in_executor(None, read)
    return queue


async def serve(url: str, ice: IceConfig) -> None:
    mesh = await join(url, mesh="relink", name="server", identity=Identity.generate(), ice=ice,
                      heartbeat=0.5, peer_timeout=20.0, check_links=False)

    async def echo(msg: Message, ctx: CallContext) -> Message:
        return Message(dict(msg.header))

    async def count(msg: Message, ctx: CallContext) -> AsyncIterator[Message]:
        for i in range(int(msg.header["n"])):
            await asyncio.sleep(float(msg.header["delay"]))
            yield Message({"i": i})

    mesh.offer("t.echo", echo)
    mesh.offer("t.count", count, streaming=True)
    say(peer_id=mesh.id)
    lines = await stdin_lines()
    while await lines.get():
        pass
    await mesh.leave()


async def drive(url: str, ice: IceConfig, peer: str) -> None:
    mesh = await join(url, mesh="relink", name="driver", identity=Identity.generate(), ice=ice,
                      heartbeat=0.5, peer_timeout=20.0, check_links=False)
    try:
        lines = await stdin_lines()
        async with asyncio.timeout(120):
            await until(lambda: peer in {p.id for p in mesh.peers()})
            await mesh.call(peer, "t.echo", Message({"k": 1}), timeout=60)
        first = mesh.links()[peer]
        got = 0
        broken_at: float | None = None
        outcome: dict[str, object] = {}

        async def wait_broken() -> None:
            nonlocal broken_at
            if await lines.get() == "broken":
                broken_at = time.monotonic()

        waiter = asyncio.ensure_future(wait_broken())
        try:
            # Each item may take up to 30 s: a CallTimeout would mean the loss went unnoticed.
            async for _ in mesh.stream(peer, "t.count", Message({"n": 100000, "delay": 0.05}), timeout=30):
                got += 1
                if got == 10:
                    say(streaming=True, kind=first["kind"], rtt_ms=first["rtt_ms"])
        except MeshError as exc:
            outcome = {"error_type": type(exc).__name__, "message": str(exc),
                       "retryable": bool(getattr(exc, "retryable", False)),
                       "after_broken_s": None if broken_at is None else round(time.monotonic() - broken_at, 2)}
        waiter.cancel()
        say(stream_ended=True, items=got, **outcome)
        # The mesh re-links by itself; a retry then works, stream included.
        t0 = time.monotonic()
        async with asyncio.timeout(90):
            await until(lambda: peer in mesh.links())
        relinked_s = round(time.monotonic() - t0, 2)
        items = [m.header["i"] async for m in mesh.stream(peer, "t.count", Message({"n": 20, "delay": 0.01}),
                                                          timeout=30)]
        echo = (await mesh.call(peer, "t.echo", Message({"k": 2}), timeout=30)).header
        await asyncio.sleep(3)  # a few pings on the new link
        say(resumed=items == list(range(20)) and echo.get("k") == 2, relinked_s=relinked_s,
            kind=mesh.links()[peer]["kind"], rtt_ms=mesh.links()[peer]["rtt_ms"])
    finally:
        await mesh.leave()


def main() -> None:
    role, url, ice = sys.argv[1], sys.argv[2], IceConfig.from_dict(json.loads(sys.argv[3]))
    asyncio.run(serve(url, ice) if role == "serve" else drive(url, ice, sys.argv[4]))


if __name__ == "__main__":
    main()
