"""WebRTC links between peers: one aiortc ``RTCPeerConnection`` carrying message transports.

A link is made by plain offer/answer (aiortc gathers every candidate before
``setLocalDescription`` returns, so the SDP carries them all: no trickle). Every link has the data
channels in :data:`CHANNELS`, created ``negotiated=True`` with fixed stream ids on both sides, so
neither side waits for an ``ondatachannel`` event or a DCEP round trip, plus one private control
channel (``_link``) for the link's own business: a hello that agrees on the bulk tuning and small
pings that measure the round-trip time.

Each channel is wrapped in a :class:`~gradient_nb.mesh.transport.Transport` that

- chunks messages into data-channel messages no larger than the remote SCTP ``max-message-size``
  (aiortc says 262144, RFC 8841 peers that say nothing mean 65536) and reassembles them into a
  bounded buffer (``max_message_size``; a larger message is refused and skipped, the link stays up);
- keeps memory bounded on both ends: the sender waits on ``bufferedAmount`` (the
  ``bufferedamountlow`` event) before queueing more, and a credit window (bytes the receiver's
  application has not taken with ``recv`` yet) stops a fast sender from piling messages up in a
  slow receiver. The credit is needed because aiortc's SCTP sender ignores the peer's advertised
  receive window and its receiver hands every message up at once.

On the wire a data-channel message is one flag byte (FIRST, LAST, CREDIT), then for a FIRST
fragment the whole message's length (u64, so a receiver refuses an oversized message before
buffering any of it), then the payload; a CREDIT frame carries a u64 byte count.

Bulk throughput, where its time goes and the tuning (:class:`SctpTuning`) are explained in the
"bulk tuning" comment further down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc import rtcsctptransport as _sctp_mod

from .direct import robust_rtt
from .ice import IceConfig
from .sctp_tuning import STANDARD_PACKET, SctpTuning  # noqa: F401  (STANDARD_PACKET: re-exported)
from .transport import LinkClosed, LinkDied, Transport

log = logging.getLogger(__name__)

CHANNELS = ("rpc", "state")
_CONTROL = "_link"
# Fixed SCTP stream ids for the negotiated channels: the same on both sides by construction.
_CHANNEL_IDS = {"rpc": 0, "state": 1, _CONTROL: 2}

DEFAULT_MAX_MESSAGE_SIZE = 64 << 20
# Bytes a receiver may hold that its application has not taken yet (plus one message in flight).
DEFAULT_CREDIT_WINDOW = 8 << 20
# The sender queues at most this much in aiortc (bufferedAmount) before it waits.
_BUFFER_HIGH = 1 << 20
_BUFFER_LOW = 256 << 10
# A data-channel message never exceeds this, whatever the remote allows: aiortc's own limit.
_CHUNK_CAP = 262144

# Fragment header: one flag byte; the first fragment carries the whole message's length (u64).
_F_FIRST, _F_LAST, _F_CREDIT = 0x01, 0x02, 0x80
_U64 = struct.Struct("!Q")

# Pings measure the RTT and keep the link honest: DEAD_AFTER seconds with nothing heard, and 3 pings in
# a row unanswered, and the link is declared dead (a NAT that forgot its mapping: ICE consent alone
# would take ~30 s), closed with the reason, and the mesh re-links.
_PING_INTERVAL = 1.0
DEAD_AFTER = 5.0


class LinkFailed(ConnectionError):
    """The link could not be established or broke; the message carries the ICE details."""


# --------------------------------------------------------------------------------------------
# transports over data channels


class _ChannelTransport:
    """A :class:`Transport` over one ordered, reliable RTCDataChannel."""

    def __init__(self, link: Link, channel: Any, *, max_message_size: int, credit_window: int) -> None:
        self.label: str = channel.label
        self.max_message_size = max_message_size
        self._link = link
        self._channel = channel
        self._window = credit_window
        self._closed = False
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()  # set while bufferedAmount is low
        self._writable.set()
        self._credit_changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._unacked = 0  # bytes sent that the receiver's application has not taken yet
        self._consumed = 0  # bytes our application took that we have not credited back yet
        # reassembly of one incoming message
        self._partial: bytearray | None = None
        self._partial_total = 0
        self._skipping = False
        self.refused_messages = 0  # oversized incoming messages skipped
        channel.bufferedAmountLowThreshold = _BUFFER_LOW
        channel.on("bufferedamountlow", self._writable.set)
        channel.on("message", self._on_message)
        channel.on("close", self._on_channel_close)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- sending ------------------------------------------------------------------------------
    def _chunk_size(self) -> int:
        remote = self._link._remote_max_message_size()
        limit = _CHUNK_CAP if not remote else min(remote, _CHUNK_CAP)
        return limit - 1 - _U64.size

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise self._link.closed_error(f"({self.label})")
        n = len(data)
        if n > self.max_message_size:
            raise ValueError(f"message of {n} bytes exceeds {self.max_message_size}")
        view = memoryview(data)
        async with self._send_lock:
            # A message starts only inside the credit window, but once started it is sent whole:
            # the receiver can only give credit back for messages it has completed.
            while self._unacked >= self._window:
                self._credit_changed.clear()
                await self._wait(self._credit_changed)
            self._unacked += n + 16
            step = self._chunk_size()
            pos = 0
            first = True
            while True:
                piece = view[pos : pos + step]
                pos += len(piece)
                flags = (_F_FIRST if first else 0) | (_F_LAST if pos >= n else 0)
                head = bytes((flags,)) + (_U64.pack(n) if first else b"")
                while self._channel.bufferedAmount > _BUFFER_HIGH:
                    self._writable.clear()
                    if self._channel.bufferedAmount <= _BUFFER_HIGH:
                        break
                    await self._wait(self._writable)
                self._channel_send(head + piece)
                first = False
                if pos >= n:
                    break

    def _channel_send(self, frame: bytes) -> None:
        if self._closed or self._channel.readyState != "open":
            self._mark_closed()
            raise self._link.closed_error(f"({self.label})")
        try:
            self._channel.send(frame)
        except Exception as exc:  # aiortc raises InvalidStateError once the channel is closing
            self._mark_closed()
            raise self._link.closed_error(f"({self.label}): {exc}") from exc

    async def _wait(self, event: asyncio.Event) -> None:
        # A wake-up each second re-checks the link, so a send never hangs on a dead link.
        while not event.is_set():
            if self._closed:
                raise self._link.closed_error(f"({self.label})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 1.0)
        if self._closed:
            raise self._link.closed_error(f"({self.label})")

    # -- receiving ----------------------------------------------------------------------------
    def _on_message(self, frame: bytes | str) -> None:
        self._link._last_heard = time.monotonic()
        if isinstance(frame, str) or not frame:
            return  # not ours: our frames are binary and never empty
        flags = frame[0]
        if flags & _F_CREDIT:
            if len(frame) == 1 + _U64.size:
                self._unacked = max(0, self._unacked - _U64.unpack_from(frame, 1)[0])
                self._credit_changed.set()
            return
        body = memoryview(frame)[1:]
        if flags & _F_FIRST:
            if len(body) < _U64.size:
                return
            total = _U64.unpack_from(body)[0]
            body = body[_U64.size :]
            self._partial = None
            self._skipping = total > self.max_message_size
            if self._skipping:
                self.refused_messages += 1
                log.warning("link %s/%s: refused a %d-byte message (limit %d)", self._link.remote_id[:8],
                            self.label, total, self.max_message_size)
                # Credit it back at once, or the sender would wait forever on bytes nobody will take.
                self._give_credit(total + 16)
            else:
                self._partial = bytearray()
                self._partial_total = total
        if self._skipping:
            if flags & _F_LAST:
                self._skipping = False
            return
        if self._partial is None:
            return  # a fragment without a start: ignore
        if len(self._partial) + len(body) > self._partial_total:
            log.warning("link %s/%s: fragment overruns its message; dropped", self._link.remote_id[:8], self.label)
            self._partial = None
            return
        self._partial += body
        if flags & _F_LAST:
            msg, self._partial = bytes(self._partial), None
            if len(msg) != self._partial_total:
                log.warning("link %s/%s: short message dropped", self._link.remote_id[:8], self.label)
                self._give_credit(self._partial_total + 16)
                return
            self._inbox.append(msg)
            self._inbox_bytes += len(msg) + 16
            if self._inbox_bytes > 2 * self._window + self.max_message_size:
                # Only a peer that ignores the credit window gets here.
                log.warning("link %s/%s: peer overran the credit window; closing", self._link.remote_id[:8],
                            self.label)
                self._link._spawn_close()
            self._readable.set()

    def _give_credit(self, n: int) -> None:
        # Credit goes back in batches of a quarter window, not per message: a small-message RPC
        # would otherwise send a credit frame for every message. No deadlock: a blocked sender has
        # a full window outstanding, so a reading application always crosses the threshold.
        self._consumed += n
        if self._consumed >= self._window // 4:
            credit, self._consumed = self._consumed, 0
            with contextlib.suppress(LinkClosed):
                self._channel_send(bytes((_F_CREDIT,)) + _U64.pack(credit))

    async def recv(self) -> bytes:
        while not self._inbox:
            if self._closed:
                raise self._link.closed_error(f"({self.label})")
            self._readable.clear()
            await self._readable.wait()
        msg = self._inbox.popleft()
        self._inbox_bytes -= len(msg) + 16
        if not self._closed:
            self._give_credit(len(msg) + 16)
        return msg

    # -- closing ------------------------------------------------------------------------------
    def _on_channel_close(self) -> None:
        self._mark_closed()
        self._link._spawn_close()

    def _mark_closed(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wake every waiter so it sees the close.
        self._readable.set()
        self._writable.set()
        self._credit_changed.set()

    async def close(self) -> None:
        """Closing one transport closes its link: a link's channels live and die together."""
        await self._link.close()


# --------------------------------------------------------------------------------------------
# the link


@dataclass
class LinkStats:
    local_candidate_type: str | None
    remote_candidate_type: str | None
    relayed: bool
    rtt_ms: float | None
    bytes_sent: int
    bytes_received: int
    local_address: str | None
    remote_address: str | None
    state: str
    tuned: bool = False
    sctp_packet_bytes: int | None = None
    # direct-tcp (mesh/direct.py), webrtc-direct or webrtc-relay
    kind: str = "webrtc-direct"


_FP_RE = re.compile(r"^a=fingerprint:(\S+)\s+([0-9A-Fa-f:]+)\s*$", re.MULTILINE)


def sdp_fingerprints(sdp: str) -> list[str]:
    """The DTLS certificate fingerprints in an SDP, as ``"sha-256 AB:CD:..."`` (sorted, unique)."""
    return sorted({f"{algo.lower()} {value.upper()}" for algo, value in _FP_RE.findall(sdp)})


class Link:
    """One established (or establishing) WebRTC link to ``remote_id``."""

    def __init__(self, remote_id: str, pc: RTCPeerConnection, *, tuning: SctpTuning | None,
                 max_message_size: int, credit_window: int) -> None:
        self.remote_id = remote_id
        self.on_close: list[Callable[[], None]] = []
        self._pc = pc
        self._tuning = tuning
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._closed_fut: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._local_sdp = ""
        self._remote_sdp = ""
        # The last few samples: their median is the link's RTT, robust to one ping that queued
        # behind bulk data (channels share one SCTP send queue).
        self._rtt_samples: deque[float] = deque(maxlen=8)
        self.lost_reason: str | None = None  # set when the link died rather than being closed
        self._last_heard = time.monotonic()
        self._pong_waiters: dict[int, asyncio.Future[float]] = {}
        self._pings: dict[int, float] = {}
        self._ping_seq = 0
        self._remote_hello: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._packet_bytes: int | None = None
        self._failed_reason: str | None = None
        self._state_changed = asyncio.Event()
        self.dead_after = DEAD_AFTER
        self._sack_timer: asyncio.TimerHandle | None = None
        pc.on("connectionstatechange", self._on_state)
        channels = {label: pc.createDataChannel(label, negotiated=True, id=_CHANNEL_IDS[label], ordered=True)
                    for label in (*CHANNELS, _CONTROL)}
        self._control = channels.pop(_CONTROL)
        self._control.on("message", self._on_control)
        self._control.on("open", self._send_hello)
        self.transports: dict[str, Transport] = {
            label: _ChannelTransport(self, ch, max_message_size=max_message_size, credit_window=credit_window)
            for label, ch in channels.items()
        }

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def kind(self) -> str:
        return self.stats().kind

    def closed_error(self, where: str = "") -> LinkClosed:
        """LinkDied when the link died under us (its reason said), LinkClosed when it was closed."""
        if self.lost_reason:
            return LinkDied(f"link to {self.remote_id[:8]} lost {where}: {self.lost_reason}")
        return LinkClosed(f"link to {self.remote_id[:8]} closed {where}".rstrip())

    def _on_state(self) -> None:
        self._state_changed.set()
        if self._pc.connectionState in ("failed", "closed"):
            self._failed_reason = self._failed_reason or f"connection {self._pc.connectionState}"
            if self._pc.connectionState == "failed" and not self._closed:
                self.lost_reason = self.lost_reason or "ICE connection failed (consent lost)"
            self._spawn_close()

    def _sctp_ready(self) -> bool:
        sctp = self._pc.sctp
        return (sctp is not None and sctp._association_state == _sctp_mod.RTCSctpTransport.State.ESTABLISHED
                and all(t._channel.readyState == "open" for t in self.transports.values()))  # type: ignore[attr-defined]

    async def wait_connected(self, timeout: float) -> None:
        """Wait until ICE, DTLS and SCTP are up and every channel is open.

        Raises ``TimeoutError`` (with the ICE state in its message) after ``timeout`` seconds,
        :class:`LinkFailed` if the connection fails or closes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._closed or self._pc.connectionState in ("failed", "closed"):
                raise LinkFailed(f"link to {self.remote_id[:8]} failed: {self._failed_reason or 'closed'}; "
                                 f"{self._ice_details()}")
            if self._pc.connectionState == "connected" and self._sctp_ready():
                break
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"link to {self.remote_id[:8]} not connected after {timeout:.1f} s; "
                                   f"{self._ice_details()}")
            self._state_changed.clear()
            # SCTP and channel opening raise no peer-connection event: poll them, briefly.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), min(left, 0.05))
        # The hello agrees on the tuning before bulk data flows; an old peer that never answers
        # just leaves the link untuned.
        with contextlib.suppress(TimeoutError):
            left = max(0.1, deadline - loop.time())
            await asyncio.wait_for(asyncio.shield(self._remote_hello), min(left, 5.0))
        if not any(t.get_name() == "link-ping" for t in self._tasks):
            self._spawn(self._ping_loop(), "link-ping")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_close(self) -> None:
        if not self._closed and self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self.close(), name="link-close")

    async def close(self) -> None:
        """Close the peer connection (the other side sees every transport close), cancel this
        link's tasks, then run the ``on_close`` callbacks. Every caller returns once that is done."""
        if self._closed_fut is not None:
            await asyncio.shield(self._closed_fut)
            return
        self._closed_fut = asyncio.get_running_loop().create_future()
        self._closed = True
        try:
            await self._close()
        finally:
            self._closed_fut.set_result(None)

    async def _close(self) -> None:
        for t in self.transports.values():
            t._mark_closed()  # type: ignore[attr-defined]
        if self._sack_timer is not None:
            self._sack_timer.cancel()
        for waiter in self._pong_waiters.values():
            if not waiter.done():
                waiter.set_exception(LinkClosed(f"link to {self.remote_id[:8]} closed"))
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        try:
            await asyncio.wait_for(self._pc.close(), 5.0)
        except Exception as exc:  # closing must not fail: the link is gone either way
            log.debug("closing link to %s: %r", self.remote_id[:8], exc)
        callbacks, self.on_close = self.on_close, []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("link on_close callback failed")

    # -- control channel: hello (tuning) and pings (RTT) ----------------------------------------
    def _control_send(self, msg: dict) -> None:
        if self._control.readyState == "open" and not self._closed:
            with contextlib.suppress(Exception):
                self._control.send(json.dumps(msg, separators=(",", ":")))

    def _send_hello(self) -> None:
        hello: dict[str, Any] = {"t": "hello", "v": 1}
        if self._tuning is not None:
            try:
                self._tuning.prepare(self)
                hello["tune"] = self._tuning.offer(self)
            except Exception:  # aiortc internals moved: run untuned rather than fail the link
                log.exception("link tuning unavailable; running untuned")
                self._tuning = None
        self._control_send(hello)

    def _on_control(self, raw: bytes | str) -> None:
        self._last_heard = time.monotonic()
        try:
            msg = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(msg, dict):
            return
        kind = msg.get("t")
        if kind == "ping" and isinstance(msg.get("n"), int):
            self._control_send({"t": "pong", "n": msg["n"]})
        elif kind == "pong" and isinstance(msg.get("n"), int):
            sent = self._pings.pop(msg["n"], None)
            if sent is not None:
                self._rtt_samples.append((time.perf_counter() - sent) * 1000.0)
                waiter = self._pong_waiters.pop(msg["n"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(self._rtt_samples[-1])
        elif kind == "hello" and not self._remote_hello.done():
            self._remote_hello.set_result(msg)
            if self._tuning is not None:
                try:
                    self._packet_bytes = self._tuning.apply(self, msg.get("tune"))
                except Exception:
                    log.exception("link tuning failed; running untuned")

    def _send_ping(self) -> int:
        self._ping_seq += 1
        now = time.perf_counter()
        # forget pings whose pong never came (lost with a closing link, or a stalled peer)
        self._pings = {n: t for n, t in self._pings.items() if now - t < 60.0}
        self._pings[self._ping_seq] = now
        self._control_send({"t": "ping", "n": self._ping_seq})
        return self._ping_seq

    async def _ping_loop(self) -> None:
        # RTT from a tiny ping on the control channel: aioice keeps no RTT for its candidate pairs
        # (and aiortc's SCTP srtt only moves while data flows).
        for _ in range(3):  # a few samples at once, so stats() has a figure right after connecting
            self._send_ping()
            await asyncio.sleep(0.05)
        misses = 0
        while not self._closed:
            sent = time.monotonic()
            self._send_ping()
            await asyncio.sleep(_PING_INTERVAL)
            # A stall of this side's own event loop sends no pings, so it cannot pass for a dead link.
            misses = misses + 1 if self._last_heard < sent else 0
            if misses >= 3 and time.monotonic() - self._last_heard > self.dead_after:
                self.lost_reason = f"no reply to pings for {time.monotonic() - self._last_heard:.1f} s"
                log.warning("link to %s: %s; closing it", self.remote_id[:8], self.lost_reason)
                self._spawn_close()
                return

    async def ping(self, timeout: float = 5.0) -> float:
        """Measure the round-trip time now, in ms (also recorded for :meth:`stats`)."""
        if self._closed:
            raise LinkClosed(f"link to {self.remote_id[:8]} closed")
        seq = self._send_ping()
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pong_waiters[seq] = waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise LinkFailed(f"no pong from {self.remote_id[:8]} in {timeout:.1f} s") from None
        finally:
            self._pong_waiters.pop(seq, None)

    # -- introspection ------------------------------------------------------------------------
    def _ice_connection(self) -> Any:
        sctp = self._pc.sctp
        if sctp is None:
            return None
        return sctp.transport.transport._connection

    def _selected_pair(self) -> Any:
        conn = self._ice_connection()
        if conn is None:
            return None
        return conn._nominated.get(1)

    def _ice_details(self) -> str:
        conn = self._ice_connection()
        if conn is None:
            return "no ICE transport"
        try:
            local = ", ".join(f"{c.type} {c.host}:{c.port}" for c in conn.local_candidates) or "none"
            remote = ", ".join(f"{c.type} {c.host}:{c.port}" for c in conn._remote_candidates) or "none"
            pairs = ", ".join(f"{p.local_addr[0]}->{p.remote_addr[0]}:{p.remote_addr[1]} {p.state.name}"
                              for p in conn._check_list) or "none"
            return (f"ICE state {self._pc.iceConnectionState}, local candidates [{local}], "
                    f"remote candidates [{remote}], pairs [{pairs}]")
        except Exception as exc:  # aioice internals moved: say what we can
            return f"ICE state {self._pc.iceConnectionState} ({exc!r})"

    def _remote_max_message_size(self) -> int:
        sctp = self._pc.sctp
        return sctp._remote_max_message_size if sctp is not None else _sctp_mod.REMOTE_DEFAULT_MAX_MESSAGE_SIZE

    def stats(self) -> LinkStats:
        pair = self._selected_pair()
        lt = rt = la = ra = None
        if pair is not None:
            lt, rt = pair.local_candidate.type, pair.remote_candidate.type
            la = f"{pair.local_addr[0]}:{pair.local_addr[1]}"
            ra = f"{pair.remote_addr[0]}:{pair.remote_addr[1]}"
        sent = received = 0
        sctp = self._pc.sctp
        if sctp is not None:
            with contextlib.suppress(Exception):
                for s in sctp.transport._get_stats().values():
                    sent, received = s.bytesSent, s.bytesReceived
        return LinkStats(local_candidate_type=lt, remote_candidate_type=rt, relayed="relay" in (lt, rt),
                         rtt_ms=robust_rtt(self._rtt_samples),
                         bytes_sent=sent, bytes_received=received, local_address=la,
                         remote_address=ra, state="closed" if self._closed else self._pc.connectionState,
                         tuned=self._packet_bytes is not None, sctp_packet_bytes=self._packet_bytes,
                         kind="webrtc-relay" if "relay" in (lt, rt) else "webrtc-direct")

    def local_fingerprints(self) -> list[str]:
        return sdp_fingerprints(self._local_sdp)

    def remote_fingerprints(self) -> list[str]:
        return sdp_fingerprints(self._remote_sdp)


class PendingLink:
    """The offering side of a link, waiting for the answer."""

    def __init__(self, link: Link) -> None:
        self._link = link

    async def complete(self, answer_sdp: str) -> Link:
        link = self._link
        try:
            await link._pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        except Exception as exc:
            await link.close()
            raise LinkFailed(f"bad answer from {link.remote_id[:8]}: {exc}") from exc
        link._remote_sdp = answer_sdp
        return link

    async def close(self) -> None:
        await self._link.close()


def _new_link(remote_id: str, ice: IceConfig, tuning: SctpTuning | bool | None, max_message_size: int,
              credit_window: int) -> Link:
    if tuning is True:
        tuning = SctpTuning()
    elif tuning is False:
        tuning = None
    pc = RTCPeerConnection(configuration=ice.to_rtc())
    return Link(remote_id, pc, tuning=tuning, max_message_size=max_message_size, credit_window=credit_window)


async def offer_link(remote_id: str, ice: IceConfig, *, tuning: SctpTuning | bool | None = True,
                     max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                     credit_window: int = DEFAULT_CREDIT_WINDOW) -> tuple[PendingLink, str]:
    """Start a link: returns the pending link and the offer SDP (all candidates in it)."""
    link = _new_link(remote_id, ice, tuning, max_message_size, credit_window)
    try:
        await link._pc.setLocalDescription(await link._pc.createOffer())
    except BaseException:
        await link.close()
        raise
    link._local_sdp = link._pc.localDescription.sdp
    return PendingLink(link), link._local_sdp


async def answer_link(remote_id: str, ice: IceConfig, offer_sdp: str, *,
                      tuning: SctpTuning | bool | None = True, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                      credit_window: int = DEFAULT_CREDIT_WINDOW) -> tuple[Link, str]:
    """Answer an offer: returns the link (connecting; see :meth:`Link.wait_connected`) and the answer SDP."""
    link = _new_link(remote_id, ice, tuning, max_message_size, credit_window)
    try:
        await link._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        link._remote_sdp = offer_sdp
        await link._pc.setLocalDescription(await link._pc.createAnswer())
    except Exception as exc:
        await link.close()
        raise LinkFailed(f"bad offer from {remote_id[:8]}: {exc}") from exc
    link._local_sdp = link._pc.localDescription.sdp
    return link, link._local_sdp
