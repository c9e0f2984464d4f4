"""Patches to aiortc 1.16's SCTP (``aiortc.rtcsctptransport``) that make data channels fast enough
to carry a mesh: bulk tuning, and congestion-window fixes for messages under network delay.

They apply per association (one link), never to the aiortc module, and only on the aiortc
versions they were checked against (:data:`_TUNED_AIORTC`); elsewhere only the socket buffers change
and the link runs plain aiortc. :class:`SctpTuning` is what ``link.py`` uses.

Where the time goes (aiortc 1.16, cProfile of both ends, two processes on one host). The limit
is CPU per packet, not the protocol's windows: on an idle machine both ends sit at ~100% of a core
(on a busy one each gets ~50%, which looks like pacing). aiortc never reads the peer's rwnd, and
cwnd grows freely on loopback; what costs is:
- every SCTP packet is one DATA chunk of at most 1160 bytes (SCTP_MAX_PACKET_LENGTH = 1189, sized
  for the minimum IPv6 MTU after DTLS/UDP), one DTLS record, one sendto, and one SACK back;
- the receiver's ``InboundStream.pop_messages`` rescans the reassembly list on every chunk:
  O(n^2) in the 226 fragments of a 256 KiB message (its top item, ~35% of its time);
- the sender's ``_transmit`` walks the whole sent queue for chunks to retransmit on every SACK
  (~50 us per call with a 1 MiB window), and SACK handling walks it again once a gap shows;
- bursts above the default 208 KiB UDP receive buffer get dropped on loopback: gaps, fast
  retransmits and cwnd halving on top of the above.

The tuning, per link (``SctpTuning``), and where each part applies:
1. Any path: bigger kernel socket buffers (SO_RCVBUF/SO_SNDBUF, up to the kernel's limit) on the
   link's ICE sockets. Nothing changes on the wire.
2. Any path: ``_transmit`` skips its sent-queue walk unless a chunk may be marked for
   retransmission (a counter kept by the chunks themselves); reassembly skips the rescan for a
   chunk that cannot complete a message. Same behaviour, less work.
3. Any path: delayed SACK, one per 2 DATA packets (RFC 9260 section 6.2) with a 5 ms timer,
   at once on a gap or duplicate. Half the SACKs to encrypt, send, decrypt and process.
4. Same host only: 16 KiB SCTP packets (one full DTLS record) and a SACK per 4 packets, when the
   selected pair is host<->host between two of this machine's own addresses: the datagrams take
   the loopback route (MTU 65536), so neither IP fragmentation nor path MTU arises. Both sides
   must agree: each side first makes its DTLS layer able to read large records, then says in its
   hello how big a packet it takes; each sends large packets only after the peer's hello said so.
   A peer without the tuning (a browser, plain aiortc) sends no hello and gets standard packets.
   Across a real network (LAN included: a LAN's 1500-byte MTU would fragment them, and some
   networks drop fragments) packets keep aiortc's IPv6-safe size.

Measured (``gradient-nb bench transport``, 64 MiB in 1 MiB messages, two processes, idle 2-core
machine): untuned ~18 MB/s; items 1-3 alone (standard packets) ~33 MB/s (1.8x); with item 4
~200-315 MB/s (11-17x, 0.6-0.9x raw loopback TCP).

How: aiortc reads USERDATA_MAX_LENGTH, DataChunk and InboundStream as module globals inside its
methods, so the patched methods are the same code objects re-bound, on that one association
only, to a private copy of the module globals (``_patch_sctp``); ``_transmit`` alone is a copy
of aiortc's with the changes of items 2 and 5. Pinned to the aiortc versions it was checked against
(``_TUNED_AIORTC``): on any other version only item 1 applies and the link otherwise runs plain.

Messages under delay (issue 18, item 4). Served across the NAT lab with 10-25 ms one-way delay, an
18 KB hidden-state message cost about 2 extra round trips and an 85 KB prefill about 20. Counting
the flights of packets (``tests/mesh/test_link.py::test_messages_cross_a_delayed_path_in_few_flights``)
showed why, in aiortc 1.16's sender:

- ``_transmit`` caps every call at ``flight size + 4 chunks`` (SCTP's Max.Burst applied per call),
  and a message is handed to SCTP in one call, so after an idle moment only 4 chunks (4.6 KB) leave
  and the rest waits for the next SACK, a round trip later, however large cwnd is: an 18 KB
  message took 3 flights with cwnd at 36 KB;
- the initial cwnd is 3 chunks (3.5 KB), and cwnd only grows while it is fully used, which
  application-limited RPC traffic rarely does;
- after a loss ssthresh falls to 4 chunks and congestion avoidance then adds one chunk per round
  trip at best: an 85 KB message took 8 flights long after the loss.

5. Any path: the burst cap is the congestion window itself (RFC 9260 section 7.2.4 makes
   Max.Burst a MAY; the window already bounds what is in flight); the initial window is
   :data:`INITIAL_WINDOW_PACKETS` packets (RFC 6928's IW10 for TCP) and the window never falls
   below it after a loss (:data:`MIN_WINDOW_PACKETS`): messages of up to ~10 packets leave in one
   flight. The bytes on the wire are the same; only when they leave changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiortc
from aiortc import rtcsctptransport as _sctp_mod

if TYPE_CHECKING:
    from .link import Link

_TUNED_AIORTC = ("1.16.",)
_SCTP_METHODS_WITH_PACKET_SIZE = ("_receive_sack_chunk", "_t3_expired", "_transmit", "_send",
                                  "_get_inbound_stream")
# A DTLS record carries at most 16384 bytes of plaintext; one SCTP packet must fit in one record.
_MAX_LOCAL_PACKET = 16384
# aiortc's own SCTP packet size (fits the IPv6 minimum MTU after DTLS/UDP): what real networks get.
STANDARD_PACKET = _sctp_mod.SCTP_MAX_PACKET_LENGTH
_SOCKET_BUFFER = 4 << 20
# Longest wait for the second packet of a delayed SACK (RFC 9260 allows 200 ms; a short delay keeps
# a cwnd-limited sender moving when a message ends on an odd packet).
_SACK_DELAY = 0.005
# Item 5: the congestion window starts at (and after a loss stays above) this many packets.
INITIAL_WINDOW_PACKETS = 10


def _local_addresses() -> set[str]:
    from aioice.ice import get_host_addresses

    addrs = set(get_host_addresses(use_ipv4=True, use_ipv6=True))
    addrs.update(("127.0.0.1", "::1"))
    return addrs


class _LargeRecordSSL:
    """Wraps the DTLS ``SSL.Connection`` so aiortc's fixed 1500-byte reads fit a large record."""

    def __init__(self, ssl: Any, size: int) -> None:
        self._gnb_ssl = ssl
        self._gnb_size = size

    def recv(self, n: int) -> bytes:
        return self._gnb_ssl.recv(max(n, self._gnb_size))

    def bio_read(self, n: int) -> bytes:
        return self._gnb_ssl.bio_read(max(n, self._gnb_size))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gnb_ssl, name)


@dataclass(frozen=True)
class SctpTuning:
    """Bulk tuning of one link (see the comment above).

    ``packet_bytes``: the SCTP packet size on a same-host path (at most 16384, one DTLS record;
    ``STANDARD_PACKET`` turns large packets off); ``socket_buffer``: requested kernel buffer per
    ICE socket; ``sack_every``: delayed SACK on any path (2 = RFC 9260); ``local_sack_every``: the
    same on a same-host path with large packets, where both ends are ours."""

    packet_bytes: int = _MAX_LOCAL_PACKET
    socket_buffer: int = _SOCKET_BUFFER
    sack_every: int = 2
    local_sack_every: int = 4

    @staticmethod
    def supported() -> bool:
        return aiortc.__version__.startswith(_TUNED_AIORTC)

    def offer(self, link: Link) -> dict:
        """What the hello says: the largest SCTP packet this side can take on this path."""
        big = self.supported() and self.packet_bytes > STANDARD_PACKET and _same_host_pair(link)
        return {"max_packet": min(self.packet_bytes, _MAX_LOCAL_PACKET) if big else STANDARD_PACKET}

    def prepare(self, link: Link) -> None:
        """Before the hello goes out: make this side able to receive what it will offer."""
        sctp = link._pc.sctp
        if sctp is None:
            return
        conn = sctp.transport.transport._connection
        for proto in getattr(conn, "_protocols", []):
            transport = getattr(proto, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_buffer)
        if not self.supported():
            return
        if self.offer(link)["max_packet"] > STANDARD_PACKET:
            dtls = sctp.transport
            if not isinstance(dtls._ssl, _LargeRecordSSL) and dtls._ssl is not None:
                dtls._ssl = _LargeRecordSSL(dtls._ssl, _MAX_LOCAL_PACKET + 1024)
        _patch_sctp(sctp, None)
        if self.sack_every > 1:
            _install_sack_coalescing(link, sctp, self.sack_every)

    def apply(self, link: Link, remote: Any) -> int | None:
        """After the peer's hello: the SCTP packet size this side sends with (None: standard)."""
        if not self.supported() or not isinstance(remote, dict):
            return None
        peer_max = remote.get("max_packet")
        if not isinstance(peer_max, int) or peer_max <= STANDARD_PACKET:
            return None
        mine = self.offer(link)["max_packet"]
        if mine <= STANDARD_PACKET or not isinstance(link._pc.sctp.transport._ssl, _LargeRecordSSL):
            return None
        size = min(mine, peer_max)
        _patch_sctp(link._pc.sctp, size)
        if self.local_sack_every > 1:
            _install_sack_coalescing(link, link._pc.sctp, self.local_sack_every)
        return size


def _same_host_pair(link: Link) -> bool:
    """The selected pair is host<->host and both addresses are this machine's: the datagrams take
    the loopback route (MTU 65536) and never meet a real network's MTU."""
    pair = link._selected_pair()
    if pair is None or pair.local_candidate.type != "host" or pair.remote_candidate.type != "host":
        return False
    local = _local_addresses()
    return pair.remote_addr[0] in local and pair.local_addr[0] in local


def _patch_sctp(sctp: Any, packet: int | None) -> None:
    """Re-bind the packet-size-dependent methods of one association (``packet=None``: aiortc's
    size) and give it the O(1) transmit path. Idempotent per association."""
    env = dict(vars(_sctp_mod))
    if packet is not None:
        env["SCTP_MAX_PACKET_LENGTH"] = packet
        env["USERDATA_MAX_LENGTH"] = (
            packet - _sctp_mod.SCTP_COMMON_HEADER_LENGTH - _sctp_mod.SCTP_DATA_CHUNK_HEADER_LENGTH) // 4 * 4
    if not hasattr(sctp, "_gnb_retransmits"):
        sctp._gnb_retransmits = 0
        sctp._gnb_chunk_class = _tracked_chunk_class(sctp)
    env["DataChunk"] = tracked = sctp._gnb_chunk_class
    # Chunks queued before the patch join the count too, or a retransmission of one could be missed.
    for chunk in (*sctp._sent_queue, *sctp._outbound_queue):
        if not isinstance(chunk, tracked):
            flagged = chunk.__dict__.pop("_retransmit", False)
            chunk._gnb_rt = False
            chunk.__class__ = tracked
            chunk._retransmit = flagged
    env["InboundStream"] = _FastInboundStream
    for stream in sctp._inbound_streams.values():
        if type(stream) is _sctp_mod.InboundStream:
            stream.__class__ = _FastInboundStream
    for name in _SCTP_METHODS_WITH_PACKET_SIZE:
        fn = _transmit if name == "_transmit" else getattr(type(sctp), name)
        clone = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
        clone.__kwdefaults__ = fn.__kwdefaults__
        setattr(sctp, name, types.MethodType(clone, sctp))
    # Item 5: a window of INITIAL_WINDOW_PACKETS to start with, and never less after a loss.
    floor = INITIAL_WINDOW_PACKETS * env["USERDATA_MAX_LENGTH"]
    sctp._cwnd = max(sctp._cwnd, floor)
    receive_sack = sctp._receive_sack_chunk

    async def receive_sack_with_floor(chunk: Any) -> None:
        await receive_sack(chunk)
        if sctp._ssthresh < floor:
            sctp._ssthresh = floor
        if sctp._cwnd < floor:
            sctp._cwnd = floor

    sctp._receive_sack_chunk = receive_sack_with_floor


class _FastInboundStream(_sctp_mod.InboundStream):
    """aiortc's ``InboundStream.pop_messages`` rescans the whole reassembly list for every DATA
    chunk: O(n^2) in the fragments of a message (226 for 256 KiB in standard packets), the top item
    of the receiver's profile. A chunk appended after every other one that is not the last
    fragment of its message cannot complete any message, so the scan is skipped for it."""

    _gnb_tail = False

    def add_chunk(self, chunk: Any) -> None:
        self._gnb_tail = not self.reassembly or _sctp_mod.uint32_gt(chunk.tsn, self.reassembly[-1].tsn)
        super().add_chunk(chunk)

    def pop_messages(self) -> Any:
        tail, self._gnb_tail = self._gnb_tail, False
        if tail and not (self.reassembly[-1].flags & _sctp_mod.SCTP_DATA_LAST_FRAG):
            return iter(())
        return super().pop_messages()


def _tracked_chunk_class(sctp: Any) -> type:
    """A DataChunk that keeps ``sctp._gnb_retransmits`` >= the number of chunks marked for
    retransmission, so :func:`_transmit` can skip its scan of the sent queue when it is 0."""

    class _TrackedDataChunk(_sctp_mod.DataChunk):  # type: ignore[misc]
        @property
        def _retransmit(self) -> bool:
            return self._gnb_rt

        @_retransmit.setter
        def _retransmit(self, value: bool) -> None:
            if value and not getattr(self, "_gnb_rt", False):
                sctp._gnb_retransmits += 1
            self._gnb_rt = value

    return _TrackedDataChunk


async def _transmit(self: Any) -> None:
    """aiortc 1.16's ``RTCSctpTransport._transmit`` with two changes: outside fast recovery the burst
    cap is the congestion window (item 5), and the walk over the whole sent
    queue looking for chunks to retransmit (O(cwnd / packet) on every SACK, the top item of the
    profile at ~50 us per call) runs only when some chunk may be marked for retransmission.
    Runs with the globals of :func:`_patch_sctp` (``USERDATA_MAX_LENGTH`` per association)."""
    if self._forward_tsn_chunk is not None:
        await self._send_chunk(self._forward_tsn_chunk)
        self._forward_tsn_chunk = None
        if not self._t3_handle:
            self._t3_start()

    if self._fast_recovery_exit is not None:
        cwnd = min(self._flight_size + 2 * USERDATA_MAX_LENGTH, self._cwnd)  # type: ignore[name-defined]  # noqa: F821
    else:
        # Item 5: no burst cap below the window (aiortc: flight + 4 chunks per call).
        cwnd = self._cwnd

    if self._gnb_retransmits:
        retransmit_earliest = True
        for chunk in self._sent_queue:
            if chunk._retransmit:
                if self._fast_recovery_transmit:
                    self._fast_recovery_transmit = False
                elif self._flight_size >= cwnd:
                    return
                self._flight_size_increase(chunk)

                chunk._misses = 0
                chunk._retransmit = False
                chunk._sent_count += 1
                await self._send_chunk(chunk)
                if retransmit_earliest:
                    self._t3_restart()
            retransmit_earliest = False
        # exact again (chunks acknowledged while marked left the queue still counted)
        self._gnb_retransmits = sum(1 for c in self._sent_queue if c._retransmit)

    while self._outbound_queue and self._flight_size < cwnd:
        chunk = self._outbound_queue.popleft()
        self._sent_queue.append(chunk)
        self._flight_size_increase(chunk)
        chunk._sent_count += 1
        chunk._sent_time = time.time()
        await self._send_chunk(chunk)
        if not self._t3_handle:
            self._t3_start()


def _install_sack_coalescing(link: Link, sctp: Any, every: int) -> None:
    """Delayed SACK: one SACK per ``every`` packets carrying DATA, at once when a gap or a
    duplicate shows, and at the latest ``_SACK_DELAY`` after the first unacknowledged packet.
    aiortc acknowledges every packet; RFC 9260 section 6.2 asks for a SACK at least every second
    packet within 200 ms, which is what ``every=2`` does (with a much shorter delay). The sender
    then decrypts and processes half the SACKs, the receiver encrypts and sends half: -15..25% CPU
    per byte on both ends in our measurements. Only what this side sends changes; any peer copes."""
    if getattr(sctp, "_gnb_sack_every", None) is not None:
        sctp._gnb_sack_every = every
        return
    original = sctp._send_sack
    sctp._gnb_sack_every = every
    pending = 0

    def flush() -> None:
        nonlocal pending
        link._sack_timer = None
        if sctp._sack_needed and not link._closed:
            pending = 0
            link._spawn(original(), "link-sack")

    async def send_sack() -> None:
        nonlocal pending
        pending += 1
        if pending < sctp._gnb_sack_every and not sctp._sack_misordered and not sctp._sack_duplicates:
            if link._sack_timer is None:
                link._sack_timer = asyncio.get_running_loop().call_later(_SACK_DELAY, flush)
            return
        pending = 0
        if link._sack_timer is not None:
            link._sack_timer.cancel()
            link._sack_timer = None
        await original()

    sctp._send_sack = send_sack
