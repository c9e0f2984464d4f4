"""Request/response and streaming RPC over one :class:`~gradient_nb.mesh.transport.Transport`.

Both ends of a transport are symmetric: each can call methods the other offers. Frame kinds tell the
direction of a call id: ``call``/``stream-call``/``cancel``/``credit`` refer to calls the *receiver*
serves, ``reply``/``stream-item``/``stream-end``/``error`` to calls the receiver made. So the two call-id
spaces never collide.

- **Deadlines.** A call carries the caller's remaining time; the server runs the handler under that
  deadline and cancels it when it passes (streams: per item, matching the caller's per-item timeout).
- **Cancellation.** A caller that times out, is cancelled, or leaves a stream early sends ``cancel``; the
  server cancels the handler task, so work the caller no longer wants stops.
- **Flow control.** A stream consumer grants credit (``stream_window`` items at first, topped up as it
  consumes), and the producer waits when it has none, so a slow consumer bounds what is buffered on both
  sides. A producer that ignores credit fails the stream instead of growing our queue.
- **Bad input.** A frame that fails to decode is counted and, when its call id could be read, answered
  with a ``BadRequest`` error; the endpoint keeps serving. Handler exceptions reach the caller as
  :class:`RemoteError` with the exception's type name and message (no traceback).
- **Limits per peer.** Every offered method has a :class:`Limit`: a token bucket per (calling peer,
  method) and a bound on the request's size. The buckets live in :class:`Services`, shared by all of a
  peer's links, so a caller cannot reset them by linking again. A call over its limit is refused before
  its handler runs, with a ``RateLimited`` or ``TooLarge`` error reply that says the limit, and counted
  (``RpcStats.rate_limited`` / ``too_large``, ``Services.refused``). Defaults are generous for the data
  path (a token per call, 1000/s) and tight for the mesh's own bookkeeping (``dht.*``, ``mesh.*``).
- **Sending.** One lock serialises whole frames on the transport (a link chunks large frames, so two
  concurrent sends must not interleave). Each send runs as a task the endpoint owns, shielded from the
  caller's cancellation, so a cancelled caller never leaves half a frame on the link.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from .errors import (
    BadFrame,
    CallCancelled,
    CallTimeout,
    LinkLost,
    MeshError,
    PeerUnreachable,
    RemoteError,
    remote_error,
)
from .frames import (
    MAX_CALL_ID,
    MAX_ERROR_LEN,
    MAX_NAME_LEN,
    Frame,
    FrameLimits,
    Message,
    decode_frame,
    encode_frame,
)
from .transport import LinkClosed, LinkDied, Transport

log = logging.getLogger(__name__)

Handler = Callable[[Message, "CallContext"], Awaitable[Message | None]]
StreamHandler = Callable[[Message, "CallContext"], AsyncIterator[Message]]

DEFAULT_DEADLINE = 30.0
# A stream producer waits this long at most for the consumer to grant credit before giving up.
STREAM_IDLE_LIMIT = 600.0
# Error replies to bad frames are sent by background tasks; past this many queued sends they are dropped,
# so a peer that floods garbage and never reads cannot make us pile up tasks.
MAX_QUEUED_CONTROL_SENDS = 256
CLOSE_GRACE = 5.0


@dataclass
class CallContext:
    peer_id: str
    method: str
    deadline: float  # loop.time() by which the handler's answer (or next stream item) is due


@dataclass
class RpcStats:
    calls_out: int = 0
    streams_out: int = 0
    calls_in: int = 0
    streams_in: int = 0
    frames_out: int = 0
    frames_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    bad_frames: int = 0
    errors_sent: int = 0
    errors_received: int = 0
    cancelled_in: int = 0
    cancelled_out: int = 0
    timeouts_out: int = 0
    deadlines_exceeded_in: int = 0
    dropped_control_frames: int = 0
    rate_limited: int = 0
    too_large: int = 0


@dataclass(frozen=True)
class Limit:
    """Per (calling peer, method): ``rate`` calls a second on average, bursts of up to ``burst``, and
    requests (the whole frame) of at most ``max_bytes``."""

    rate: float
    burst: float
    max_bytes: int = 64 << 20


# The data path (shard.forward and friends) runs many small calls a second; the mesh's own services
# answer a handful a second per peer, so a peer flooding them is refused early.
DEFAULT_LIMIT = Limit(rate=1000.0, burst=2000.0)
BUILTIN_LIMITS = {
    "dht.": Limit(rate=50.0, burst=200.0, max_bytes=64 << 10),
    "mesh.relay": Limit(rate=20.0, burst=60.0, max_bytes=64 << 10),
    "mesh.ping": Limit(rate=20.0, burst=60.0, max_bytes=1 << 20),
}
MAX_BUCKETS = 50_000


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens, self.at = tokens, at


class Services:
    """The methods a peer offers; one instance is shared by every endpoint (link) of the peer."""

    def __init__(self, default_limit: Limit = DEFAULT_LIMIT) -> None:
        self._unary: dict[str, Handler] = {}
        self._streaming: dict[str, StreamHandler] = {}
        self.default_limit = default_limit
        self._limits: dict[str, Limit] = dict(BUILTIN_LIMITS)
        self._buckets: collections.OrderedDict[tuple[str, str], _Bucket] = collections.OrderedDict()
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()  # (peer, method) -> calls

    def limit(self, method_or_prefix: str, limit: Limit) -> None:
        """Set the limit of a method, or of every method under a prefix ending in ``.``."""
        self._limits[method_or_prefix] = limit

    def limit_of(self, method: str) -> Limit:
        if method in self._limits:
            return self._limits[method]
        best = max((p for p in self._limits if p.endswith(".") and method.startswith(p)), key=len, default=None)
        return self._limits[best] if best is not None else self.default_limit

    def admit(self, peer_id: str, method: str, nbytes: int) -> str | None:
        """None when ``peer_id`` may call ``method`` now with a request of ``nbytes``; otherwise the error
        code (``TooLarge`` or ``RateLimited``) and the call is counted as refused."""
        lim = self.limit_of(method)
        if nbytes > lim.max_bytes:
            self.refused[(peer_id, method)] += 1
            return "TooLarge"
        now = time.monotonic()
        key = (peer_id, method)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(lim.burst, now)
            if len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b.tokens = min(lim.burst, b.tokens + (now - b.at) * lim.rate)
            b.at = now
        if b.tokens < 1.0:
            self.refused[key] += 1
            return "RateLimited"
        b.tokens -= 1.0
        return None

    @staticmethod
    def _check(method: str) -> None:
        if not isinstance(method, str) or not method or len(method) > MAX_NAME_LEN:
            raise ValueError(f"method names are non-empty strings of at most {MAX_NAME_LEN} chars: {method!r}")

    def unary(self, method: str, handler: Handler) -> None:
        self._check(method)
        self._streaming.pop(method, None)
        self._unary[method] = handler

    def streaming(self, method: str, handler: StreamHandler) -> None:
        self._check(method)
        self._unary.pop(method, None)
        self._streaming[method] = handler

    def remove(self, method: str) -> None:
        self._unary.pop(method, None)
        self._streaming.pop(method, None)

    def names(self) -> list[str]:
        return sorted([*self._unary, *self._streaming])

    def lookup(self, method: str) -> tuple[str, Callable[..., Any]] | None:
        """``("unary", handler)``, ``("streaming", handler)`` or None."""
        if method in self._unary:
            return "unary", self._unary[method]
        if method in self._streaming:
            return "streaming", self._streaming[method]
        return None


@dataclass
class _Incoming:
    task: asyncio.Task | None
    credit: int
    wake: asyncio.Event


def _link_closed_error(remote_id: str, exc: LinkClosed) -> PeerUnreachable:
    if isinstance(exc, LinkDied):
        return LinkLost(f"{exc}; retry: the mesh re-links at once")
    return PeerUnreachable(f"link to {remote_id[:8] or 'peer'} closed")


class RpcEndpoint:
    """One side of an RPC session over ``transport``. ``await start()`` before use; ``await close()`` ends
    it (and closes the transport)."""

    def __init__(self, transport: Transport, services: Services, *, remote_id: str = "",
                 limits: FrameLimits | None = None, stream_window: int = 32,
                 max_concurrent_calls: int = 1024) -> None:
        if stream_window < 1:
            raise ValueError("stream_window must be >= 1")
        self.transport = transport
        self.services = services
        self.remote_id = remote_id
        self.limits = limits if limits is not None else FrameLimits()
        self.stream_window = stream_window
        self.max_concurrent_calls = max_concurrent_calls
        self.stats = RpcStats()
        self.on_close: list[Callable[[], None]] = []
        self._closed = False
        self._close_reason = ""
        self.last_call = time.monotonic()  # when a call or stream last started, either way
        self._close_type: type[PeerUnreachable] = PeerUnreachable
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Message] | _StreamState] = {}
        self._incoming: dict[int, _Incoming] = {}
        self._tasks: set[asyncio.Task] = set()
        self._control_sends = 0
        self._reader: asyncio.Task | None = None
        self._closer: asyncio.Future | None = None
        self._send_lock = asyncio.Lock()
        max_send = min(self.limits.max_frame_bytes, getattr(transport, "max_message_size", 1 << 62))
        self._send_limits = replace(self.limits, max_frame_bytes=max_send)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        """Whether calls are in flight over this endpoint, either way."""
        return bool(self._pending or self._incoming)

    def __repr__(self) -> str:
        return f"RpcEndpoint(remote={self.remote_id[:8]!r}, closed={self._closed})"

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._reader is None and not self._closed:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(),
                                                                  name=f"rpc-reader-{self.remote_id[:8]}")

    async def close(self) -> None:
        """Fail pending calls with PeerUnreachable, cancel running handlers, close the transport."""
        self._teardown(PeerUnreachable(f"RPC endpoint to {self.remote_id[:8] or 'peer'} closed"))
        with contextlib.suppress(Exception):
            await self.transport.close()
        me = asyncio.current_task()
        tasks = [t for t in (*self._tasks, self._reader) if t is not None and t is not me and not t.done()]
        if tasks:
            # Handlers that swallow cancellation must not hang close() forever.
            await asyncio.wait(tasks, timeout=CLOSE_GRACE)

    def _closed_error(self) -> PeerUnreachable:
        # A fresh exception per raise: one instance raised in many tasks would pile up their tracebacks.
        # A link that died gives LinkLost (retryable), any other close PeerUnreachable.
        return self._close_type(self._close_reason or "RPC endpoint closed")

    def _teardown(self, error: MeshError) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_reason = str(error)
        self._close_type = LinkLost if isinstance(error, LinkLost) else PeerUnreachable
        me = asyncio.current_task()
        for t in (*self._tasks, self._reader):
            if t is not None and t is not me:
                t.cancel()
        pending, self._pending = self._pending, {}
        for p in pending.values():
            self._fail_pending(p, self._closed_error())
        self._incoming.clear()
        for cb in list(self.on_close):
            try:
                cb()
            except Exception:
                log.exception("RPC on_close callback failed")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()  # retrieved, so a shielded send whose caller left logs nothing
            if exc is not None and not isinstance(exc, (MeshError, LinkClosed)):
                log.debug("RPC task %s failed: %r", task.get_name(), exc)

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    # -- sending -------------------------------------------------------------------------------
    async def _send_now(self, data: bytes) -> None:
        async with self._send_lock:
            self._check_open()
            try:
                await self.transport.send(data)
            except LinkClosed as exc:
                self._teardown(_link_closed_error(self.remote_id, exc))
                raise self._closed_error() from None
            self.stats.frames_out += 1
            self.stats.bytes_out += len(data)

    async def _send(self, data: bytes) -> None:
        task = self._spawn(self._send_now(data), "rpc-send")
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and self._closed and (me is None or not me.cancelling()):
                # The endpoint shut down under the send (not our caller being cancelled): say why.
                raise self._closed_error() from None
            raise

    def _send_soon(self, frame: Frame) -> None:
        """Queue a small control frame (cancel, credit, error) without waiting for it."""
        if self._closed:
            return
        if self._control_sends >= MAX_QUEUED_CONTROL_SENDS:
            self.stats.dropped_control_frames += 1
            return
        try:
            data = encode_frame(frame, self._send_limits)
        except (ValueError, TypeError):
            log.exception("cannot encode a %s frame", frame.kind)
            return

        async def send() -> None:
            try:
                await self._send_now(data)
            finally:
                self._control_sends -= 1

        coro = send()
        try:
            self._spawn(coro, f"rpc-{frame.kind}")
        except RuntimeError:  # no running loop (a finalizer at interpreter exit): nothing to tell anyone
            coro.close()
            return
        self._control_sends += 1

    def _send_error_soon(self, call_id: int, code: str, message: str) -> None:
        self.stats.errors_sent += 1
        self._send_soon(Frame("error", call_id, code=code[:MAX_NAME_LEN], error=message[:MAX_ERROR_LEN]))

    def _cancel_remote(self, call_id: int) -> None:
        self.stats.cancelled_out += 1
        self._send_soon(Frame("cancel", call_id))

    def _new_id(self) -> int:
        self._next_id = self._next_id + 1 if self._next_id < MAX_CALL_ID else 1
        return self._next_id

    # -- calling -------------------------------------------------------------------------------
    async def call(self, method: str, message: Message | None = None, *, timeout: float = 30.0) -> Message:
        """Call a unary ``method`` on the far side. Raises CallTimeout, RemoteError (and its typed
        subclasses) or PeerUnreachable; ValueError/TypeError for a message that cannot be sent."""
        self._check_open()
        if not 0 < timeout < math.inf:
            raise ValueError("timeout must be a finite number of seconds > 0")
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        call_id = self._new_id()
        self.last_call = time.monotonic()
        data = encode_frame(Frame("call", call_id, method=method, deadline=timeout, message=message or Message()),
                            self._send_limits)
        fut: asyncio.Future[Message] = loop.create_future()
        self._pending[call_id] = fut
        self.stats.calls_out += 1
        try:
            cm = asyncio.timeout_at(deadline)
            try:
                async with cm:
                    await self._send(data)
                    return await fut
            except TimeoutError:
                if not cm.expired():
                    raise  # the remote handler ran out of time (CallTimeout from an error reply)
                self.stats.timeouts_out += 1
                self._cancel_remote(call_id)
                raise CallTimeout(f"{method} on {self.remote_id[:8] or 'peer'}: no reply within {timeout:g} s"
                                  ) from None
            except asyncio.CancelledError:
                self._cancel_remote(call_id)
                raise
        finally:
            self._pending.pop(call_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved: a close racing with a timeout must not log noise

    def stream(self, method: str, message: Message | None = None, *,
               timeout: float = 30.0) -> AsyncIterator[Message]:
        """The items of a streaming ``method``. ``timeout`` bounds the wait for each item. Leaving the
        ``async for`` early (or cancelling the consuming task) cancels the handler on the far side."""
        if not 0 < timeout < math.inf:
            raise ValueError("timeout must be a finite number of seconds > 0")
        return _StreamCall(self, method, message or Message(), timeout)

    # -- receiving -----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        error: MeshError = PeerUnreachable(f"link to {self.remote_id[:8] or 'peer'} closed")
        try:
            while True:
                data = await self.transport.recv()
                self.stats.frames_in += 1
                self.stats.bytes_in += len(data)
                try:
                    frame = decode_frame(data, self.limits)
                except BadFrame as exc:
                    self._on_bad_frame(exc)
                    continue
                try:
                    self._dispatch(frame, len(data))
                except Exception:
                    # A bug here must not take the link down with it; count it like a bad frame.
                    self.stats.bad_frames += 1
                    log.exception("RPC dispatch failed for a %s frame", frame.kind)
        except LinkClosed as exc:
            error = _link_closed_error(self.remote_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("RPC reader stopped")
            error = PeerUnreachable(f"link to {self.remote_id[:8] or 'peer'} failed: {exc}")
        finally:
            self._teardown(error)
            if not self.transport.closed:
                # The transport needs closing when the reader died for another reason than its close.
                self._closer = asyncio.ensure_future(self.transport.close())

    def _on_bad_frame(self, exc: BadFrame) -> None:
        self.stats.bad_frames += 1
        log.debug("bad frame from %s: %s", self.remote_id[:8], exc.reason)
        call_id, kind = exc.call_id, exc.kind
        if call_id is None:
            return
        if kind in ("reply", "stream-item", "stream-end", "error"):
            p = self._pending.pop(call_id, None)
            if p is not None:
                self._fail_pending(p, BadFrame(f"malformed {kind} from the peer: {exc.reason}"))
            return
        if kind in ("cancel", "credit"):
            return
        if call_id not in self._incoming:
            self._send_error_soon(call_id, "BadRequest", exc.reason)

    def _fail_pending(self, p: asyncio.Future[Message] | _StreamState, error: BaseException) -> None:
        if isinstance(p, _StreamState):
            p._fail(error)
        elif not p.done():
            p.set_exception(error)

    def _dispatch(self, frame: Frame, nbytes: int = 0) -> None:
        kind, call_id = frame.kind, frame.call_id
        if kind in ("call", "stream-call"):
            self._on_call(frame, nbytes)
        elif kind == "cancel":
            inc = self._incoming.pop(call_id, None)
            if inc is not None and inc.task is not None:
                self.stats.cancelled_in += 1
                inc.task.cancel()
        elif kind == "credit":
            inc = self._incoming.get(call_id)
            if inc is not None:
                inc.credit += frame.credit
                inc.wake.set()
        elif kind == "reply":
            p = self._pending.pop(call_id, None)
            if isinstance(p, _StreamState):
                self.stats.bad_frames += 1
                p._fail(BadFrame("the peer answered a stream with a unary reply"))
                self._cancel_remote(call_id)
            elif p is not None and not p.done():
                p.set_result(frame.message)
        elif kind == "error":
            self.stats.errors_received += 1
            p = self._pending.pop(call_id, None)
            if p is not None:
                self._fail_pending(p, remote_error(frame.code, frame.error))
        elif kind in ("stream-item", "stream-end"):
            p = self._pending.get(call_id)
            if p is None:
                return  # a late item for a stream we already left
            if not isinstance(p, _StreamState):
                self.stats.bad_frames += 1
                self._pending.pop(call_id, None)
                self._fail_pending(p, BadFrame(f"the peer answered a unary call with {kind}"))
                return
            if kind == "stream-end":
                self._pending.pop(call_id, None)
                p._end()
            elif not p._push(frame.message):
                self.stats.bad_frames += 1
                self._pending.pop(call_id, None)
                p._fail(BadFrame("the peer sent more stream items than it was granted"))
                self._cancel_remote(call_id)

    def _on_call(self, frame: Frame, nbytes: int = 0) -> None:
        call_id, method = frame.call_id, frame.method
        if call_id in self._incoming:
            self.stats.bad_frames += 1  # a reused id of a call still running: the peer is confused
            return
        streaming = frame.kind == "stream-call"
        self.last_call = time.monotonic()
        if streaming:
            self.stats.streams_in += 1
        else:
            self.stats.calls_in += 1
        if len(self._incoming) >= self.max_concurrent_calls:
            self._send_error_soon(call_id, "Overloaded", f"more than {self.max_concurrent_calls} calls in flight")
            return
        entry = self.services.lookup(method)
        if entry is None:
            self._send_error_soon(call_id, "UnknownMethod", f"no method {method!r}")
            return
        kind, handler = entry
        refused = self.services.admit(self.remote_id, method, nbytes)
        if refused is not None:
            lim = self.services.limit_of(method)
            if refused == "TooLarge":
                self.stats.too_large += 1
                why = f"a {nbytes}-byte request exceeds the {lim.max_bytes}-byte limit of {method!r}"
            else:
                self.stats.rate_limited += 1
                why = (f"more than {lim.rate:g} calls/s (bursts of {lim.burst:g}) to {method!r} from this peer; "
                       f"retry in {1 / lim.rate:.2g} s or later")
            self._send_error_soon(call_id, refused, why)
            return
        if (kind == "streaming") != streaming:
            self._send_error_soon(call_id, "BadRequest", f"{method!r} is a {kind} method; "
                                  f"use {'stream()' if kind == 'streaming' else 'call()'}")
            return
        budget = frame.deadline if frame.deadline is not None else DEFAULT_DEADLINE
        ctx = CallContext(self.remote_id, method, asyncio.get_running_loop().time() + budget)
        inc = _Incoming(None, frame.credit, asyncio.Event())
        self._incoming[call_id] = inc
        coro = (self._serve_stream(call_id, handler, frame.message, ctx, budget, inc) if streaming
                else self._serve_unary(call_id, handler, frame.message, ctx))
        inc.task = self._spawn(coro, f"rpc-serve-{method}")

    async def _serve_unary(self, call_id: int, handler: Handler, msg: Message, ctx: CallContext) -> None:
        try:
            cm = asyncio.timeout_at(ctx.deadline)
            try:
                async with cm:
                    result = await handler(msg, ctx)
                if result is None:
                    result = Message()
                if not isinstance(result, Message):
                    raise TypeError(f"handler returned {type(result).__name__}, not a Message")
                data = encode_frame(Frame("reply", call_id, message=result), self._send_limits)
            except TimeoutError as exc:
                self._handler_failed(call_id, ctx, exc, expired=cm.expired())
                return
            except Exception as exc:
                self._handler_failed(call_id, ctx, exc)
                return
            try:
                await self._send_now(data)
            except MeshError:
                pass  # the link closed under us: nobody is left to tell
            except (ValueError, TypeError) as exc:  # the transport refused the reply (e.g. its size)
                self._handler_failed(call_id, ctx, exc)
        finally:
            self._incoming.pop(call_id, None)

    async def _serve_stream(self, call_id: int, handler: StreamHandler, msg: Message, ctx: CallContext,
                            per_item: float, inc: _Incoming) -> None:
        loop = asyncio.get_running_loop()
        agen: Any = None
        try:
            try:
                agen = handler(msg, ctx)
                if not hasattr(agen, "__anext__"):
                    raise TypeError(f"streaming handler returned {type(agen).__name__}, not an async iterator")
                while True:
                    while inc.credit <= 0:
                        inc.wake.clear()
                        try:
                            async with asyncio.timeout(STREAM_IDLE_LIMIT):
                                await inc.wake.wait()
                        except TimeoutError:
                            raise CallCancelled("the consumer granted no credit for too long") from None
                    ctx.deadline = loop.time() + per_item
                    cm = asyncio.timeout_at(ctx.deadline)
                    try:
                        async with cm:
                            item = await agen.__anext__()
                    except StopAsyncIteration:
                        break
                    except TimeoutError as exc:
                        self._handler_failed(call_id, ctx, exc, expired=cm.expired())
                        return
                    if not isinstance(item, Message):
                        raise TypeError(f"stream handler yielded {type(item).__name__}, not a Message")
                    data = encode_frame(Frame("stream-item", call_id, message=item), self._send_limits)
                    inc.credit -= 1
                    await self._send_now(data)
                await self._send_now(encode_frame(Frame("stream-end", call_id), self._send_limits))
            except MeshError as exc:
                if not self._closed:
                    self._handler_failed(call_id, ctx, exc)
            except Exception as exc:
                self._handler_failed(call_id, ctx, exc)
        finally:
            self._incoming.pop(call_id, None)
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                # Run the generator's own cleanup (its finally blocks) now rather than at GC time.
                with contextlib.suppress(Exception):
                    await aclose()

    def _handler_failed(self, call_id: int, ctx: CallContext, exc: BaseException, *, expired: bool = False) -> None:
        if expired:
            self.stats.deadlines_exceeded_in += 1
            self._send_error_soon(call_id, "DeadlineExceeded", f"{ctx.method} ran past the caller's deadline")
            return
        if isinstance(exc, RemoteError):
            code, message = exc.code, exc.remote_message
        else:
            code, message = type(exc).__name__, str(exc)
            log.info("handler %s for %s failed", ctx.method, ctx.peer_id[:8], exc_info=exc)
        self._send_error_soon(call_id, code, message)


class _StreamState:
    """What the endpoint's reader delivers into for one stream. It holds no reference to the consumer's
    iterator, so that dropping the iterator (``break`` in ``async for``) frees it and cancels the call."""

    def __init__(self, window: int) -> None:
        self.items: collections.deque[Message] = collections.deque()
        self.wake = asyncio.Event()
        self.error: BaseException | None = None
        self.ended = False  # the producer said stream-end (or the stream failed)
        self.outstanding = window  # granted but not yet received

    def _push(self, message: Message) -> bool:
        if self.outstanding <= 0:
            return False
        self.outstanding -= 1
        self.items.append(message)
        self.wake.set()
        return True

    def _end(self) -> None:
        self.ended = True
        self.wake.set()

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.ended = True
        self.wake.set()


class _StreamCall:
    """The consumer side of one streaming call (what :meth:`RpcEndpoint.stream` returns)."""

    def __init__(self, endpoint: RpcEndpoint, method: str, message: Message, timeout: float) -> None:
        self._ep = endpoint
        self._method = method
        self._message = message
        self._timeout = timeout
        self._id: int | None = None
        self._state = _StreamState(endpoint.stream_window)
        self._done = False  # we stopped consuming
        self._consumed = 0  # taken by the consumer since the last grant

    @property
    def _items(self) -> collections.deque[Message]:
        return self._state.items

    def __aiter__(self) -> _StreamCall:
        return self

    async def __aenter__(self) -> _StreamCall:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _start(self) -> None:
        ep = self._ep
        ep._check_open()
        await ep.start()
        self._id = ep._new_id()
        ep.last_call = time.monotonic()
        data = encode_frame(Frame("stream-call", self._id, method=self._method, deadline=self._timeout,
                                  message=self._message, credit=ep.stream_window), ep._send_limits)
        self._message = Message()  # don't keep the request's tensors alive for the whole stream
        ep._pending[self._id] = self._state
        ep.stats.streams_out += 1
        await ep._send(data)

    async def __anext__(self) -> Message:
        if self._done:
            raise StopAsyncIteration
        st = self._state
        try:
            if self._id is None:
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._start()
                except TimeoutError:
                    raise CallTimeout(f"{self._method}: could not send the call within {self._timeout:g} s"
                                      ) from None
            while not st.items:
                if st.error is not None:
                    raise st.error
                if st.ended:
                    self._done = True
                    raise StopAsyncIteration
                st.wake.clear()
                try:
                    async with asyncio.timeout(self._timeout):
                        await st.wake.wait()
                except TimeoutError:
                    self._ep.stats.timeouts_out += 1
                    raise CallTimeout(f"{self._method} on {self._ep.remote_id[:8] or 'peer'}: no stream item "
                                      f"within {self._timeout:g} s") from None
            item = st.items.popleft()
            self._consumed += 1
            if not st.ended and self._consumed >= max(1, self._ep.stream_window // 2):
                self._ep._send_soon(Frame("credit", self._id, credit=self._consumed))
                st.outstanding += self._consumed
                self._consumed = 0
            return item
        except StopAsyncIteration:
            raise
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """Stop consuming; tell the producer to stop if it may still be running."""
        if self._done:
            return
        self._done = True
        st = self._state
        st.items.clear()
        if self._id is None:
            return
        if self._ep._pending.get(self._id) is st:
            del self._ep._pending[self._id]
        if not st.ended:
            st.ended = True
            self._ep._cancel_remote(self._id)

    async def aclose(self) -> None:
        self._abort()

    def __del__(self) -> None:
        # A consumer that broke out of ``async for`` without closing us: cancel the far side now (CPython
        # frees the iterator right after the loop) rather than leave the producer waiting for credit.
        if not self._done and self._id is not None:
            with contextlib.suppress(Exception):
                self._abort()
