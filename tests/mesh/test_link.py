"""Real aiortc links: two peer connections over this machine's host candidates (no mocks)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing as mp
import os

import pytest

from gradient_nb.mesh.ice import IceConfig
from gradient_nb.mesh.link import (
    CHANNELS,
    STANDARD_PACKET,
    Link,
    LinkFailed,
    SctpTuning,
    answer_link,
    offer_link,
    sdp_fingerprints,
)
from gradient_nb.mesh.transport import LinkClosed, Transport

pytestmark = pytest.mark.timeout(120)


async def _pair(*, tuning: object = True, a_kwargs: dict | None = None,
                b_kwargs: dict | None = None) -> tuple[Link, Link, str, str]:
    pending, offer = await offer_link("peer-b", IceConfig(), tuning=tuning, **(a_kwargs or {}))
    b, answer = await answer_link("peer-a", IceConfig(), offer, tuning=tuning, **(b_kwargs or {}))
    a = await pending.complete(answer)
    await asyncio.gather(a.wait_connected(20), b.wait_connected(20))
    return a, b, offer, answer


@pytest.fixture
async def links():
    made: list[Link] = []

    async def make(**kw: object) -> tuple[Link, Link]:
        a, b, _, _ = await _pair(**kw)  # type: ignore[arg-type]
        made.extend((a, b))
        return a, b

    yield make
    for link in made:
        await link.close()


async def test_connects_on_host_candidates_and_reports_stats(links) -> None:
    a, b = await links()
    assert set(CHANNELS) <= set(a.transports) and set(CHANNELS) <= set(b.transports)
    assert all(isinstance(t, Transport) for t in a.transports.values())
    await a.transports["rpc"].send(b"x" * 1000)
    assert await asyncio.wait_for(b.transports["rpc"].recv(), 10) == b"x" * 1000
    rtt = await a.ping()
    st = a.stats()
    assert st.local_candidate_type == "host" and st.remote_candidate_type == "host"
    assert st.relayed is False
    assert st.state == "connected"
    assert rtt > 0
    assert st.rtt_ms is not None and st.rtt_ms > 0
    assert st.bytes_sent > 1000 and st.bytes_received > 0
    assert st.local_address and st.remote_address
    assert b.stats().remote_address == st.local_address


async def test_fingerprints_match_the_sdp(links) -> None:
    pending, offer = await offer_link("peer-b", IceConfig())
    b, answer = await answer_link("peer-a", IceConfig(), offer)
    a = await pending.complete(answer)
    try:
        fps = sdp_fingerprints(offer)
        assert fps and all(fp.startswith(("sha-256 ", "sha-384 ", "sha-512 ")) for fp in fps)
        assert any(fp.startswith("sha-256 ") and len(fp.split()[1].split(":")) == 32 for fp in fps)
        assert a.local_fingerprints() == fps == b.remote_fingerprints()
        assert b.local_fingerprints() == sdp_fingerprints(answer) == a.remote_fingerprints()
        assert set(a.local_fingerprints()).isdisjoint(b.local_fingerprints())
    finally:
        await a.close()
        await b.close()


SIZES = [0, 1, 256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 16 * 1024 * 1024]


STANDARD = SctpTuning(packet_bytes=STANDARD_PACKET)  # the tuning as it runs across a real network


@pytest.mark.parametrize("tuning", [True, STANDARD, False], ids=["tuned", "standard_packets", "untuned"])
async def test_messages_bit_exact_in_order_both_channels_both_ways(links, tuning: object) -> None:
    a, b = await links(tuning=tuning)
    if tuning is True:
        # same host: the tuned link uses large SCTP packets
        assert a.stats().sctp_packet_bytes == b.stats().sctp_packet_bytes == 16384
    else:
        assert a.stats().sctp_packet_bytes is None and b.stats().sctp_packet_bytes is None
    # 16 MiB in small packets takes half a minute on a busy 2-core machine: the tuned run covers it
    sizes = SIZES if tuning is True else [*SIZES[:-1], 2 * 1024 * 1024]
    rng = [os.urandom(n) for n in sizes]

    async def one_way(src: Link, dst: Link, label: str) -> None:
        async def receive() -> list[bytes]:
            return [await asyncio.wait_for(dst.transports[label].recv(), 60) for _ in rng]

        rx = asyncio.create_task(receive())
        for msg in rng:
            await src.transports[label].send(msg)
        got = await rx
        assert [len(m) for m in got] == sizes
        assert [hashlib.sha256(m).digest() for m in got] == [hashlib.sha256(m).digest() for m in rng]

    await asyncio.gather(*(one_way(src, dst, label) for label in CHANNELS for src, dst in ((a, b), (b, a))))


@pytest.mark.parametrize("tuning", [True, STANDARD], ids=["large_packets", "standard_packets"])
async def test_lost_datagrams_are_retransmitted(links, tuning: object) -> None:
    # Drop some datagrams on their way into b: the tuned sender's retransmission path (fast
    # retransmit and the T3 timer, through the patched _transmit) must deliver every byte.
    a, b = await links(tuning=tuning)
    conn = b._pc.sctp.transport.transport._connection
    deliver = conn.data_received
    seen = 0

    def lossy(data: bytes, component: int) -> None:
        nonlocal seen
        seen += 1
        if seen % 23 == 0:
            return
        deliver(data, component)

    conn.data_received = lossy
    msgs = [os.urandom(1 << 20) for _ in range(3)]
    for m in msgs:
        await a.transports["state"].send(m)
    got = [await asyncio.wait_for(b.transports["state"].recv(), 60) for _ in msgs]
    assert got == msgs
    assert seen >= 23  # something was dropped


async def test_respects_a_remote_max_message_size_of_64k() -> None:
    # RFC 8841: a peer may advertise a smaller SCTP max-message-size (older peers say 65536);
    # aiortc raises on anything bigger, so the transport must chunk below it.
    pending, offer = await offer_link("peer-b", IceConfig())
    b, answer = await answer_link("peer-a", IceConfig(), offer)
    assert "a=max-message-size:262144" in answer
    a = await pending.complete(answer.replace("a=max-message-size:262144", "a=max-message-size:65536"))
    try:
        await asyncio.gather(a.wait_connected(20), b.wait_connected(20))
        assert a._remote_max_message_size() == 65536
        msg = os.urandom(1 << 20)
        await a.transports["rpc"].send(msg)
        assert await asyncio.wait_for(b.transports["rpc"].recv(), 30) == msg
    finally:
        await a.close()
        await b.close()


async def test_concurrent_sends_do_not_interleave(links) -> None:
    a, b = await links()
    msgs = [bytes([i]) * (600_000 + i) for i in range(4)]
    await asyncio.gather(*(a.transports["rpc"].send(m) for m in msgs))
    got = [await asyncio.wait_for(b.transports["rpc"].recv(), 30) for _ in msgs]
    assert sorted(got) == sorted(msgs)


async def test_backpressure_bounds_memory_of_a_fast_sender(links) -> None:
    window = 2 << 20
    a, b = await links(a_kwargs={"credit_window": window}, b_kwargs={"credit_window": window})
    tx, rx = a.transports["state"], b.transports["state"]
    blob = os.urandom(1 << 20)
    count = 24  # far more than the window

    async def sender() -> int:
        for i in range(count):
            await tx.send(bytes([i]) + blob)
        return count

    task = asyncio.create_task(sender())
    peak_buffered = 0
    # Nobody reads on b: the sender must stall with bounded memory on both ends.
    for _ in range(100):
        await asyncio.sleep(0.02)
        peak_buffered = max(peak_buffered, tx._channel.bufferedAmount)  # type: ignore[attr-defined]
    assert not task.done()
    inbox = rx._inbox_bytes  # type: ignore[attr-defined]
    assert inbox <= window + len(blob) + 64
    assert peak_buffered <= 2 << 20
    got = []
    for _ in range(count):
        got.append(await asyncio.wait_for(rx.recv(), 30))
    assert await asyncio.wait_for(task, 30) == count
    assert [m[0] for m in got] == list(range(count))
    assert all(m[1:] == blob for m in got)


async def test_oversized_message_refused_and_link_stays_up(links) -> None:
    limit = 1 << 20
    a, b = await links(b_kwargs={"max_message_size": limit})
    # the sender's own limit: refused before anything is sent
    with pytest.raises(ValueError):
        await b.transports["rpc"].send(b"\0" * (limit + 1))
    # a bigger limit on the sender: the receiver skips the message and counts it
    await a.transports["rpc"].send(os.urandom(limit + 1))
    await a.transports["rpc"].send(b"after")
    assert await asyncio.wait_for(b.transports["rpc"].recv(), 30) == b"after"
    assert b.transports["rpc"].refused_messages == 1  # type: ignore[attr-defined]
    await b.transports["rpc"].send(b"still up")
    assert await asyncio.wait_for(a.transports["rpc"].recv(), 10) == b"still up"
    assert not a.closed and not b.closed


async def test_close_propagates_to_the_other_side(links) -> None:
    a, b = await links()
    closed_a, closed_b = asyncio.Event(), asyncio.Event()
    a.on_close.append(closed_a.set)
    b.on_close.append(closed_b.set)
    waiting = asyncio.create_task(b.transports["rpc"].recv())
    await asyncio.sleep(0.05)
    await a.close()
    assert a.closed and closed_a.is_set()
    with pytest.raises(LinkClosed):
        await a.transports["state"].send(b"x")
    with pytest.raises(LinkClosed):
        await asyncio.wait_for(waiting, 30)
    with pytest.raises(LinkClosed):
        await asyncio.wait_for(b.transports["state"].recv(), 30)
    await asyncio.wait_for(closed_b.wait(), 30)
    assert b.closed and b.stats().state == "closed"


async def test_unanswered_link_times_out_with_ice_details() -> None:
    pending, offer = await offer_link("peer-b", IceConfig())
    b, answer = await answer_link("peer-a", IceConfig(), offer)
    await b.close()  # the answerer is gone before ICE can check anything
    a = await pending.complete(answer)
    try:
        with pytest.raises((TimeoutError, LinkFailed)) as info:
            await a.wait_connected(3)
        assert "ICE" in str(info.value)
    finally:
        await a.close()


async def test_bad_answer_fails_cleanly() -> None:
    pending, _ = await offer_link("peer-b", IceConfig())
    with pytest.raises(LinkFailed):
        await pending.complete("v=0\r\nthis is not an answer\r\n")


def test_tuning_is_checked_against_this_aiortc() -> None:
    # The patch of aiortc internals is pinned: a new aiortc must be re-measured before it is tuned.
    import aiortc

    assert SctpTuning.supported() == aiortc.__version__.startswith("1.16.")


@pytest.mark.slow
async def test_link_between_two_processes() -> None:
    from gradient_nb.bench.transport import _child

    bulk = 8 << 20
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child_conn, "link", bulk), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    pending, offer = await offer_link("child", IceConfig())
    link = None
    try:
        parent_conn.send(offer)
        answer = await asyncio.wait_for(loop.run_in_executor(None, parent_conn.recv), 60)
        link = await pending.complete(answer)
        await link.wait_connected(30)
        rpc, state = link.transports["rpc"], link.transports["state"]
        for n in SIZES:  # the child echoes rpc messages
            msg = os.urandom(n)
            await rpc.send(msg)
            assert await asyncio.wait_for(rpc.recv(), 60) == msg
        blob = os.urandom(1 << 20)
        for _ in range(bulk // len(blob)):
            await state.send(blob)
        done = json.loads(await asyncio.wait_for(state.recv(), 60))
        assert done["done"] is True
        st = link.stats()
        assert st.local_candidate_type == st.remote_candidate_type == "host"
        assert st.sctp_packet_bytes and st.bytes_sent > bulk
    finally:
        if link is not None:
            await link.close()
        else:
            await pending.close()
        await loop.run_in_executor(None, proc.join, 30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def _delay_into(link: Link, seconds: float, arrivals: list[float] | None = None) -> None:
    """Every datagram into ``link`` arrives ``seconds`` late (a path with that one-way delay)."""
    conn = link._pc.sctp.transport.transport._connection
    deliver = conn.data_received
    loop = asyncio.get_running_loop()

    def late(data: bytes, component: int) -> None:
        def arrive() -> None:
            if arrivals is not None and len(data) > 200:  # DATA, not SACKs or pings
                arrivals.append(loop.time())
            deliver(data, component)

        loop.call_later(seconds, arrive)

    conn.data_received = late


def _flights(arrivals: list[float], gap: float) -> int:
    """Bursts of packets separated by at least ``gap`` (a round trip each, on a delayed path)."""
    return sum(1 for i, t in enumerate(arrivals) if i == 0 or t - arrivals[i - 1] >= gap)


async def test_messages_cross_a_delayed_path_in_few_flights(links) -> None:
    """Issue 18 item 4: with 100 ms of one-way delay and standard (real-network) packets, an 18 KB
    message leaves in one flight and an 85 KB one in two, where aiortc's 4-chunk bursts and small
    window took 3 and 5-9 round trips. Counts flights (bursts a round trip apart), not time."""
    a, b = await links(tuning=STANDARD)
    delay = 0.1
    arrivals: list[float] = []
    _delay_into(b, delay, arrivals)
    _delay_into(a, delay)
    rpc_a, rpc_b = a.transports["rpc"], b.transports["rpc"]
    flights = {}
    for name, size in (("warm-up", 85_000), ("18 KB", 18_000), ("85 KB", 85_000)):
        await asyncio.sleep(2 * delay)  # idle: everything acknowledged
        arrivals.clear()
        msg = os.urandom(size)
        await rpc_a.send(msg)
        assert await asyncio.wait_for(rpc_b.recv(), 30) == msg
        flights[name] = _flights(arrivals, delay)
    assert flights["18 KB"] == 1, flights
    assert flights["85 KB"] <= 2, flights


def test_published_rtt_ignores_pings_that_queued() -> None:
    from gradient_nb.mesh.direct import robust_rtt

    # Relay links published 846-1634 ms while their echo took 0.5-52 ms: pings queued behind bulk
    # data or answered during the first connect. The published figure is the path's.
    assert robust_rtt([1634.0, 2.1, 846.0, 1.9, 2.4, 1200.0, 2.2]) < 3.0
    assert robust_rtt([5.0]) == 5.0 and robust_rtt([]) is None
