"""RPC over the in-process transport: calls, streams, deadlines, cancellation, flow control, bad input."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradient_nb.mesh.errors import (
    BadFrame,
    BadRequest,
    CallTimeout,
    MeshError,
    PeerUnreachable,
    RemoteError,
    UnknownMethod,
)
from gradient_nb.mesh.frames import KINDS, Frame, FrameLimits, Message, decode_frame, encode_frame
from gradient_nb.mesh.rpc import CallContext, Limit, RpcEndpoint, Services
from gradient_nb.mesh.transport import Transport, memory_pair

LIMITS = FrameLimits()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for a condition; the timeout only guards against a hang, it is not what the test measures."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - endpoint internals have no event to await
            await asyncio.sleep(0.005)
    assert predicate(), what


class Probe:
    """Shared state between a test and its handlers."""

    def __init__(self) -> None:
        self.ticks = 0
        self.produced = 0
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()
        self.ctx: CallContext | None = None


def make_services(probe: Probe) -> Services:
    services = Services()

    async def echo(msg: Message, ctx: CallContext) -> Message:
        probe.ctx = ctx
        return Message(dict(msg.header), dict(msg.tensors))

    async def none(msg: Message, ctx: CallContext) -> None:
        return None

    async def fail(msg: Message, ctx: CallContext) -> Message:
        raise ValueError(f"cannot do {msg.header.get('what')}")

    async def app_error(msg: Message, ctx: CallContext) -> Message:
        raise RemoteError("QuotaExceeded", "try later")

    async def forwards_unknown(msg: Message, ctx: CallContext) -> Message:
        raise UnknownMethod("UnknownMethod", "downstream has no such method")

    async def spin(msg: Message, ctx: CallContext) -> Message:
        probe.ctx = ctx
        probe.started.set()
        try:
            while True:
                probe.ticks += 1
                await asyncio.sleep(0.001)
        finally:
            probe.stopped.set()

    async def bad_return(msg: Message, ctx: CallContext) -> Message:
        return {"not": "a message"}  # type: ignore[return-value]

    async def bad_header(msg: Message, ctx: CallContext) -> Message:
        return Message({"x": object()})

    async def count(msg: Message, ctx: CallContext) -> AsyncIterator[Message]:
        try:
            for i in range(msg.header["n"]):
                probe.produced = i + 1
                yield Message({"i": i}, {"v": torch.tensor([i])})
        finally:
            probe.stopped.set()

    async def endless(msg: Message, ctx: CallContext) -> AsyncIterator[Message]:
        probe.started.set()
        try:
            i = 0
            while True:
                probe.produced = i + 1
                yield Message({"i": i})
                i += 1
                await asyncio.sleep(0.001)
        finally:
            probe.stopped.set()

    async def stalls(msg: Message, ctx: CallContext) -> AsyncIterator[Message]:
        try:
            yield Message({"i": 0})
            yield Message({"i": 1})
            probe.started.set()
            await asyncio.sleep(3600)
            yield Message({"never": True})
        finally:
            probe.stopped.set()

    async def breaks(msg: Message, ctx: CallContext) -> AsyncIterator[Message]:
        yield Message({"i": 0})
        raise KeyError("item 1 is missing")

    services.unary("echo", echo)
    services.unary("none", none)
    services.unary("fail", fail)
    services.unary("app_error", app_error)
    services.unary("forwards_unknown", forwards_unknown)
    services.unary("spin", spin)
    services.unary("bad_return", bad_return)
    services.unary("bad_header", bad_header)
    services.streaming("count", count)
    services.streaming("endless", endless)
    services.streaming("stalls", stalls)
    services.streaming("breaks", breaks)
    return services


class Pair:
    def __init__(self, *, window: int = 32, **kw: object) -> None:
        self.probe = Probe()
        ta, tb = memory_pair()
        self.ta, self.tb = ta, tb
        self.a = RpcEndpoint(ta, Services(), remote_id="b" * 40, stream_window=window, **kw)  # type: ignore[arg-type]
        self.b = RpcEndpoint(tb, make_services(self.probe), remote_id="a" * 40, stream_window=window,
                             **kw)  # type: ignore[arg-type]

    async def __aenter__(self) -> Pair:
        await self.a.start()
        await self.b.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.a.close()
        await self.b.close()


def test_services_registry() -> None:
    s = Services()

    async def h(msg: Message, ctx: CallContext) -> None:
        return None

    s.unary("b", h)
    s.streaming("a", h)  # type: ignore[arg-type]
    assert s.names() == ["a", "b"]
    s.streaming("b", h)  # type: ignore[arg-type]
    assert s.lookup("b") == ("streaming", h)
    s.remove("a")
    s.remove("missing")
    assert s.names() == ["b"]
    with pytest.raises(ValueError):
        s.unary("", h)


async def test_unary_call_with_header_and_tensors() -> None:
    async with Pair() as p:
        x = torch.randn(3, 4)
        reply = await p.a.call("echo", Message({"k": [1, "two", b"3"]}, {"x": x, "i": torch.arange(3)}))
        assert reply.header == {"k": [1, "two", b"3"]}
        assert torch.equal(reply.tensors["x"], x)
        assert torch.equal(reply.tensors["i"], torch.arange(3))
        assert (await p.a.call("none")).header == {}
        assert (await p.a.call("echo")).header == {}
        assert p.probe.ctx is not None and p.probe.ctx.peer_id == "a" * 40 and p.probe.ctx.method == "echo"
        assert p.a.stats.calls_out == 3 and p.b.stats.calls_in == 3
        assert p.a.stats.bytes_out == p.b.stats.bytes_in > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
async def test_16_mib_tensor_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    numel = (16 << 20) // torch.finfo(dtype).bits * 8
    big = torch.randn(numel, generator=gen).to(dtype).reshape(-1, 1024)
    big[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]).to(dtype)
    async with Pair() as p:
        reply = await p.a.call("echo", Message({}, {"big": big, "t": big[:64].t()}), timeout=60)
    out = reply.tensors["big"]
    assert out.dtype == dtype and out.shape == big.shape
    assert out.numel() * out.element_size() == 16 << 20
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(out.view(bits), big.view(bits))  # bit for bit, NaN and -0.0 included
    assert torch.equal(reply.tensors["t"].view(bits), big[:64].t().contiguous().view(bits))


async def test_handler_errors_reach_the_caller_typed_and_the_endpoint_stays_up() -> None:
    async with Pair() as p:
        with pytest.raises(RemoteError) as info:
            await p.a.call("fail", Message({"what": "magic"}))
        assert info.value.code == "ValueError"
        assert info.value.remote_message == "cannot do magic"
        assert "Traceback" not in str(info.value)
        with pytest.raises(RemoteError) as info:
            await p.a.call("app_error")
        assert (info.value.code, info.value.remote_message) == ("QuotaExceeded", "try later")
        with pytest.raises(UnknownMethod):
            await p.a.call("forwards_unknown")
        with pytest.raises(UnknownMethod, match="no method 'nope'"):
            await p.a.call("nope")
        with pytest.raises(BadRequest, match="streaming method"):
            await p.a.call("count", Message({"n": 1}))
        with pytest.raises(BadRequest, match="unary method"):
            async for _ in p.a.stream("echo"):
                pass
        with pytest.raises(RemoteError, match="TypeError"):
            await p.a.call("bad_return")
        with pytest.raises(RemoteError, match="TypeError"):
            await p.a.call("bad_header")
        assert p.b.stats.errors_sent == 8
        assert (await p.a.call("echo", Message({"still": "up"}))).header == {"still": "up"}
        assert not p.a.closed and not p.b.closed


async def test_sending_what_cannot_be_encoded_fails_locally() -> None:
    async with Pair() as p:
        with pytest.raises(ValueError, match="dtype"):
            await p.a.call("echo", Message({}, {"c": torch.zeros(1, dtype=torch.complex64)}))
        with pytest.raises(ValueError, match="exceeds"):
            await p.a.call("echo", Message({}, {"x": torch.zeros(17 << 20)}))
        assert p.b.stats.frames_in == 0
        assert (await p.a.call("echo", Message({"ok": 1}))).header == {"ok": 1}


async def test_timeout_cancels_the_remote_handler() -> None:
    async with Pair() as p:
        with pytest.raises(CallTimeout):
            await p.a.call("spin", timeout=0.3)
        assert isinstance(CallTimeout("x"), TimeoutError)
        await asyncio.wait_for(p.probe.stopped.wait(), 20)
        ticks = p.probe.ticks
        await asyncio.sleep(0.05)
        assert p.probe.ticks == ticks  # the far side really stopped
        assert (await p.a.call("echo", Message({"after": 1}))).header == {"after": 1}


async def test_deadline_is_enforced_by_the_server_itself() -> None:
    # A raw caller that never sends cancel: the server must stop the handler at the propagated deadline.
    probe = Probe()
    raw, tb = memory_pair()
    server = RpcEndpoint(tb, make_services(probe), remote_id="r" * 40)
    await server.start()
    try:
        await raw.send(encode_frame(Frame("call", 11, method="spin", deadline=0.2)))
        frame = decode_frame(await asyncio.wait_for(raw.recv(), 20), LIMITS)
        assert (frame.kind, frame.call_id, frame.code) == ("error", 11, "DeadlineExceeded")
        assert probe.stopped.is_set()
        assert probe.ctx is not None and probe.ctx.deadline > 0
        assert server.stats.deadlines_exceeded_in == 1
    finally:
        await server.close()


async def test_the_handler_sees_the_callers_deadline() -> None:
    async with Pair() as p:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await p.a.call("echo", timeout=7.0)
        assert p.probe.ctx is not None
        assert before < p.probe.ctx.deadline <= loop.time() + 7.0


async def test_cancelling_the_caller_task_cancels_the_remote_handler() -> None:
    async with Pair() as p:
        task = asyncio.create_task(p.a.call("spin", timeout=60))
        await asyncio.wait_for(p.probe.started.wait(), 20)
        await eventually(lambda: p.probe.ticks > 5, "the handler to spin")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(p.probe.stopped.wait(), 20)
        ticks = p.probe.ticks
        await asyncio.sleep(0.05)
        assert p.probe.ticks == ticks
        assert p.b.stats.cancelled_in == 1 and p.a.stats.cancelled_out == 1
        assert not p.a._pending and not p.b._incoming


async def test_long_stream_arrives_complete_and_in_order() -> None:
    async with Pair() as p:
        items = [m async for m in p.a.stream("count", Message({"n": 2500}))]
        assert [m.header["i"] for m in items] == list(range(2500))
        assert all(int(m.tensors["v"]) == m.header["i"] for m in items)
        assert p.probe.stopped.is_set()
        assert [m.header["i"] async for m in p.a.stream("count", Message({"n": 0}))] == []
        assert not p.a._pending


async def test_leaving_a_stream_early_stops_the_producer() -> None:
    async with Pair() as p:
        got = []
        async for m in p.a.stream("endless"):
            got.append(m.header["i"])
            if len(got) == 10:
                break
        assert got == list(range(10))
        await asyncio.wait_for(p.probe.stopped.wait(), 20)
        produced = p.probe.produced
        await asyncio.sleep(0.05)
        assert p.probe.produced == produced
        assert p.b.stats.cancelled_in == 1
        assert (await p.a.call("echo", Message({"after": 1}))).header == {"after": 1}


async def test_closing_a_stream_explicitly_stops_the_producer() -> None:
    async with Pair() as p:
        async with p.a.stream("endless") as s:  # type: ignore[attr-defined]
            assert (await anext(s)).header == {"i": 0}
        await asyncio.wait_for(p.probe.stopped.wait(), 20)
        assert p.b.stats.cancelled_in == 1


async def test_cancelling_the_consumer_task_stops_the_producer() -> None:
    async with Pair() as p:
        seen = 0

        async def consume() -> None:
            nonlocal seen
            async for _ in p.a.stream("endless"):
                seen += 1

        task = asyncio.create_task(consume())
        await eventually(lambda: seen >= 20, "items to flow")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(p.probe.stopped.wait(), 20)
        produced = p.probe.produced
        await asyncio.sleep(0.05)
        assert p.probe.produced == produced


async def test_slow_consumer_bounds_what_the_producer_runs_ahead() -> None:
    window = 4
    async with Pair(window=window) as p:
        stream = p.a.stream("count", Message({"n": 200}))
        consumed = 0
        for _ in range(3):
            await anext(stream)
            consumed += 1
        # Wait until the producer has used up its credit and is parked waiting for more.
        await eventually(lambda: any(inc.credit == 0 for inc in p.b._incoming.values()), "the producer to stall")
        assert p.probe.produced <= consumed + window
        assert len(stream._items) <= window  # type: ignore[attr-defined]
        rest = [m.header["i"] async for m in stream]
        assert rest == list(range(3, 200))


async def test_producer_that_ignores_credit_fails_the_stream() -> None:
    window = 4
    ta, raw = memory_pair()
    a = RpcEndpoint(ta, Services(), remote_id="r" * 40, stream_window=window)
    await a.start()
    try:
        stream = a.stream("flood")

        async def consume() -> list[int]:
            return [m.header["i"] async for m in stream]

        task = asyncio.create_task(consume())
        call = decode_frame(await asyncio.wait_for(raw.recv(), 20), LIMITS)
        assert (call.kind, call.credit) == ("stream-call", window)
        for i in range(window + 3):
            await raw.send(encode_frame(Frame("stream-item", call.call_id, message=Message({"i": i}))))
        with pytest.raises(BadFrame, match="more stream items than it was granted"):
            await asyncio.wait_for(task, 20)
        # The consumer told the producer to stop (credit frames may come first).
        kinds = []
        while "cancel" not in kinds:
            kinds.append(decode_frame(await asyncio.wait_for(raw.recv(), 20), LIMITS).kind)
        assert a.stats.bad_frames >= 1
    finally:
        await a.close()


async def test_stream_error_midway_and_per_item_timeout() -> None:
    async with Pair() as p:
        got = []
        with pytest.raises(RemoteError) as info:
            async for m in p.a.stream("breaks"):
                got.append(m.header["i"])
        assert got == [0] and info.value.code == "KeyError"
        got = []
        with pytest.raises(CallTimeout):
            async for m in p.a.stream("stalls", timeout=0.3):
                got.append(m.header["i"])
        assert got == [0, 1]
        await asyncio.wait_for(p.probe.stopped.wait(), 20)  # the stalled producer was cancelled


async def test_many_concurrent_calls_both_ways() -> None:
    probe_a = Probe()
    ta, tb = memory_pair()
    p_b = Probe()
    a = RpcEndpoint(ta, make_services(probe_a), remote_id="b" * 40)
    b = RpcEndpoint(tb, make_services(p_b), remote_id="a" * 40)
    await a.start()
    await b.start()
    try:
        async def one(ep: RpcEndpoint, i: int) -> int:
            reply = await ep.call("echo", Message({"i": i}, {"t": torch.full((i % 7 + 1,), i)}))
            assert int(reply.tensors["t"][0]) == i
            return reply.header["i"]

        async def stream_one(ep: RpcEndpoint, n: int) -> list[int]:
            return [m.header["i"] async for m in ep.stream("count", Message({"n": n}))]

        calls: list[Awaitable] = [one(a if i % 2 else b, i) for i in range(300)]
        streams: list[Awaitable] = [stream_one(a if i % 2 else b, 50 + i) for i in range(10)]
        results = await asyncio.gather(*calls, *streams)
        assert results[:300] == list(range(300))
        assert results[300:] == [list(range(50 + i)) for i in range(10)]
        assert not a._pending and not b._pending
    finally:
        await a.close()
        await b.close()


async def test_overload_is_refused_with_an_error() -> None:
    async with Pair(max_concurrent_calls=1) as p:
        task = asyncio.create_task(p.a.call("spin", timeout=60))
        await asyncio.wait_for(p.probe.started.wait(), 20)
        with pytest.raises(RemoteError) as info:
            await p.a.call("echo")
        assert info.value.code == "Overloaded"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(p.probe.stopped.wait(), 20)
        await eventually(lambda: not p.b._incoming, "the spin handler to leave")
        assert (await p.a.call("echo", Message({"ok": 1}))).header == {"ok": 1}


async def test_transport_closing_fails_pending_calls_and_streams_promptly() -> None:
    async with Pair() as p:
        closed = []
        p.a.on_close.append(lambda: closed.append("a"))
        call = asyncio.create_task(p.a.call("spin", timeout=600))
        stream_items = []

        async def consume() -> None:
            async for m in p.a.stream("stalls", timeout=600):
                stream_items.append(m)

        stream = asyncio.create_task(consume())
        await asyncio.wait_for(p.probe.started.wait(), 20)
        await eventually(lambda: len(stream_items) == 2 and p.probe.ticks > 0, "both calls to run")
        await p.tb.close()  # the link goes away under both endpoints
        # 600 s call timeouts, but the failure comes at once: a hang here fails on the guard below.
        with pytest.raises(PeerUnreachable):
            await asyncio.wait_for(call, 20)
        with pytest.raises(PeerUnreachable):
            await asyncio.wait_for(stream, 20)
        await eventually(lambda: p.a.closed and p.b.closed, "both endpoints to close")
        assert closed == ["a"]
        await asyncio.wait_for(p.probe.stopped.wait(), 20)  # the server's handlers were cancelled
        with pytest.raises(PeerUnreachable):
            await p.a.call("echo")
        with pytest.raises(PeerUnreachable):
            async for _ in p.a.stream("count", Message({"n": 1})):
                pass


async def test_close_cancels_running_handlers() -> None:
    async with Pair() as p:
        call = asyncio.create_task(p.a.call("spin", timeout=600))
        await asyncio.wait_for(p.probe.started.wait(), 20)
        await p.b.close()
        assert p.probe.stopped.is_set()
        with pytest.raises(PeerUnreachable):
            await asyncio.wait_for(call, 20)
        await p.b.close()  # idempotent


JUNK = [b"", b"\xff" * 7, b"\x00\x00\x00\x05abcde", msgpack.packb({"kind": "call"}), bytes(1000),
        b"\x00\x00\x00\x01\xc0", encode_frame(Frame("reply", 999, message=Message({"x": 1}))),
        encode_frame(Frame("stream-item", 5)), encode_frame(Frame("credit", 77, credit=5)),
        encode_frame(Frame("cancel", 78)), encode_frame(Frame("error", 3, code="X"))]


async def test_junk_on_a_real_pair_is_counted_and_the_link_stays_up() -> None:
    async with Pair() as p:
        for junk in JUNK:
            await p.ta.send(junk)  # behind endpoint a's back, straight onto the link
        # A call frame with a bad tensor: its id is readable, so it gets a BadRequest reply (to a, which
        # ignores it: a never made call 4242).
        bad_call = msgpack.packb({"v": 1, "kind": "call", "id": 4242, "method": "echo", "tensors": [
            {"name": "t", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 8}]})
        await p.ta.send(len(bad_call).to_bytes(4, "big") + bad_call + bytes(8))
        with pytest.raises(UnknownMethod):
            await p.a.call("no.such.method")
        assert (await p.a.call("echo", Message({"ok": 1}))).header == {"ok": 1}
        assert p.b.stats.bad_frames == 7
        assert p.b.stats.errors_sent >= 2
        assert not p.a.closed and not p.b.closed


async def test_bad_call_frame_gets_a_bad_request_reply() -> None:
    probe = Probe()
    raw, tb = memory_pair()
    server = RpcEndpoint(tb, make_services(probe), remote_id="r" * 40)
    await server.start()
    try:
        bad = msgpack.packb({"v": 1, "kind": "call", "id": 31, "method": "echo", "tensors": [
            {"name": "t", "dtype": "complex64", "shape": [1], "offset": 0, "nbytes": 8}]})
        await raw.send(len(bad).to_bytes(4, "big") + bad + bytes(8))
        frame = decode_frame(await asyncio.wait_for(raw.recv(), 20), LIMITS)
        assert (frame.kind, frame.call_id, frame.code) == ("error", 31, "BadRequest")
        assert "dtype" in frame.error
        assert server.stats.bad_frames == 1
    finally:
        await server.close()


async def test_malformed_reply_fails_only_that_call() -> None:
    ta, raw = memory_pair()
    a = RpcEndpoint(ta, Services(), remote_id="r" * 40)
    await a.start()
    try:
        call = asyncio.create_task(a.call("x", timeout=60))
        frame = decode_frame(await asyncio.wait_for(raw.recv(), 20), LIMITS)
        bad = msgpack.packb({"v": 1, "kind": "reply", "id": frame.call_id, "header": [1]})
        await raw.send(len(bad).to_bytes(4, "big") + bad)
        with pytest.raises(BadFrame, match="malformed reply"):
            await asyncio.wait_for(call, 20)
        assert not a.closed
    finally:
        await a.close()


# -- property-based: an endpoint fed arbitrary frames ----------------------------------------------------

_VALID_SEED = encode_frame(Frame("call", 9, method="echo", deadline=5.0,
                                 message=Message({"a": [1, 2]}, {"t": torch.arange(4, dtype=torch.float32)})))


@st.composite
def _hostile_frame(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        data = bytearray(_VALID_SEED)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                        min_size=1, max_size=6)):
            data[pos] = value
        return bytes(data[:draw(st.integers(0, len(data)))])
    if choice == 2:
        # Well-formed frames of any kind with arbitrary ids: replies to nothing, credits and cancels for
        # calls that don't exist, calls to unknown methods, streams to unary methods...
        kind = draw(st.sampled_from(sorted(KINDS)))
        method = draw(st.sampled_from(["echo", "count", "nope", "fail", "none"]))
        return encode_frame(Frame(kind, draw(st.integers(0, 50)), method=method if "call" in kind else "",
                                  deadline=draw(st.none() | st.floats(0, 5)), credit=draw(st.integers(0, 3)),
                                  message=Message({"n": draw(st.integers(0, 3))})))
    head = draw(st.dictionaries(st.sampled_from(["v", "kind", "id", "method", "deadline", "tensors", "header"]),
                                st.integers(-2, 2) | st.sampled_from(sorted(KINDS)) | st.text(max_size=4)
                                | st.lists(st.integers(0, 3), max_size=3), max_size=7))
    packed = msgpack.packb(head)
    return len(packed).to_bytes(4, "big") + packed + draw(st.binary(max_size=16))


async def _feed(frames: list[bytes]) -> None:
    probe = Probe()
    raw, tb = memory_pair(depth=1024)
    server = RpcEndpoint(tb, make_services(probe), remote_id="f" * 40)
    await server.start()
    try:
        expect_bad, expect_error_ids, live_ids = 0, set(), set()
        for data in frames:
            try:
                frame = decode_frame(data, LIMITS)
                if frame.kind in ("call", "stream-call"):
                    live_ids.add(frame.call_id)  # a bad frame reusing a running call's id gets no reply
            except BadFrame as exc:
                expect_bad += 1
                if exc.call_id is not None and exc.kind in (None, "call", "stream-call"):
                    expect_error_ids.add(exc.call_id)
            await raw.send(data)
        expect_error_ids -= live_ids
        # Then a good call: its reply proves the endpoint survived and processed everything before it.
        good = 10**9
        await raw.send(encode_frame(Frame("call", good, method="echo", deadline=10.0,
                                          message=Message({"good": True}))))
        errors_for: set[int] = set()
        async with asyncio.timeout(20):
            while True:
                frame = decode_frame(await raw.recv(), LIMITS)
                if frame.kind == "error":
                    errors_for.add(frame.call_id)
                if frame.kind == "reply" and frame.call_id == good:
                    assert frame.message.header == {"good": True}
                    break
        assert server.stats.bad_frames >= expect_bad
        assert expect_error_ids <= errors_for
        assert not server.closed
    finally:
        await server.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_hostile_frame(), min_size=1, max_size=6))
def test_endpoint_survives_any_frames(frames: list[bytes]) -> None:
    asyncio.run(_feed(frames))


async def test_transport_protocol_is_what_memory_pair_gives() -> None:
    a, b = memory_pair()
    assert isinstance(a, Transport) and isinstance(b, Transport)
    await a.close()
    with pytest.raises(MeshError):
        ep = RpcEndpoint(b, Services())
        await ep.start()
        await ep.call("echo", timeout=5)


async def test_a_peer_over_its_rate_or_size_limit_is_refused_with_a_clear_error_and_counted() -> None:
    """Per (peer, method) token buckets shared by every link of the serving peer: a flooding peer gets
    RateLimited replies (its handler never runs), another peer is unaffected, a new link does not reset
    the bucket, and an oversized request gets TooLarge."""
    services, ran = Services(), []

    async def work(msg: Message, ctx: CallContext) -> Message:
        ran.append(ctx.peer_id)
        return Message({"ok": True})

    services.unary("svc.work", work)
    services.limit("svc.", Limit(rate=0.001, burst=5, max_bytes=4096))  # no refill within the test
    flooder, other = "f" * 40, "e" * 40

    async def endpoint(remote: str) -> RpcEndpoint:
        ta, tb = memory_pair()
        server = RpcEndpoint(tb, services, remote_id=remote)
        client = RpcEndpoint(ta, Services(), remote_id="s" * 40)
        await server.start()
        await client.start()
        endpoints.extend([server, client])
        return client

    endpoints: list[RpcEndpoint] = []
    try:
        client = await endpoint(flooder)
        outcomes = []
        for _ in range(20):
            try:
                await client.call("svc.work", Message(), timeout=5)
                outcomes.append("ok")
            except RemoteError as exc:
                outcomes.append(exc.code)
                assert "calls/s" in exc.remote_message and "svc.work" in exc.remote_message
        assert outcomes == ["ok"] * 5 + ["RateLimited"] * 15 and ran == [flooder] * 5
        assert endpoints[0].stats.rate_limited == 15 and services.refused[(flooder, "svc.work")] == 15
        assert (await (await endpoint(other)).call("svc.work", Message(), timeout=5)).header == {"ok": True}
        with pytest.raises(RemoteError, match="RateLimited"):  # linking again does not refill the bucket
            await (await endpoint(flooder)).call("svc.work", Message(), timeout=5)
        with pytest.raises(RemoteError, match="TooLarge") as big:
            await (await endpoint("d" * 40)).call("svc.work", Message({}, {"x": torch.zeros(8192)}), timeout=5)
        assert "4096-byte limit" in big.value.remote_message and endpoints[-2].stats.too_large == 1
        assert services.limit_of("dht.find_node").rate < services.limit_of("shard.forward").rate
    finally:
        for ep in endpoints:
            await ep.close()
