"""Direct links: TCP + TLS 1.3 between peers that can reach each other's advertised address.

When a peer's address is reachable (same host, same LAN, a public address), a link needs neither
ICE nor DTLS/SCTP in Python: one TLS 1.3 connection carries the same channels (``rpc``, ``state``)
and the same whole messages as a WebRTC link (:mod:`gradient_nb.mesh.link`), so RPC and state sync
do not know which one they run on. WebRTC stays for every pair that cannot reach each other (NATs):
a dial that does not connect and authenticate within :data:`DIAL_TIMEOUT` falls back to it.

The handshake (binding TLS to the mesh identities, as libp2p's TLS handshake does):

1. Each peer makes a fresh ECDSA P-256 TLS key and a self-signed X.509 certificate carrying one
   extension (:data:`EXTENSION_OID`): the peer's 32-byte Ed25519 identity key, then its 64-byte
   signature over ``CERT_CONTEXT + SubjectPublicKeyInfo(TLS key)``. The certificate proves "the
   holder of this identity key vouches for this TLS key"; the TLS handshake proves possession of
   the TLS key.
2. The dialer connects with TLS 1.3 only (``CERT_NONE``: Python's ``ssl`` has no custom verify
   callback) and, right after the handshake and before sending anything, checks the server's
   certificate (``getpeercert(binary_form=True)``): the extension's signature must verify and the
   identity key must hash to the peer id it dialed. A man in the middle (a rewritten address, a
   rogue listener, someone who replays the real peer's certificate without its TLS key) fails
   here or in the TLS handshake itself.
3. A TLS server cannot ask Python for a client certificate it does not already trust, so the
   dialer proves its identity inside the encrypted channel instead: the listener sends a fresh
   32-byte nonce; the dialer answers with its identity key and an Ed25519 signature over
   ``AUTH_CONTEXT + mesh name + nonce + SHA-256(the listener's certificate)``. The nonce makes it
   fresh, the certificate hash binds it to this TLS session's server (a rogue listener cannot
   forward it to the real peer: it names the rogue's certificate). With a join secret, the
   signature is followed by an HMAC under the secret, and the listener's acceptance carries one
   too, so both ends prove they know it. The listener then accepts (``ok``) or refuses (glare:
   both sides dialed at once and the lower peer id's dial wins).

After the handshake, a stream of frames ``channel (u8) | length (u32) | payload``: whole messages
on channels 0 (``rpc``) and 1 (``state``), small msgpack maps on 2 (control: ping/pong), and on 3
a credit (``channel u8 | bytes u64``). Like the WebRTC link, a credit window bounds what a sender
may have outstanding per channel, so the reader never stops reading (control frames always get
through and a slow application cannot stall pings) and memory stays bounded: a peer that overruns
the window is cut off; a message over ``max_message_size`` is skipped and counted.

Invariants: nothing from a peer is trusted before step 2 (dialer) or step 3 (listener) passed;
every wait has a timeout; each link owns its reader and ping tasks and cancels them on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import statistics
import struct
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import MeshError, SignatureInvalid
from .identity import Identity, peer_id_of, verify_signature
from .transport import LinkClosed, LinkDied

log = logging.getLogger(__name__)

# A private OID (``2.25.<UUID>``, ITU-T X.667: no registration needed) for the identity extension.
EXTENSION_OID = x509.ObjectIdentifier("2.25.197546302856617387553389734870158426931")
CERT_CONTEXT = b"gradient-nb/tls-cert/v1\x00"
AUTH_CONTEXT = b"gradient-nb/tls-auth/v1\x00"
ACCEPT_CONTEXT = b"gradient-nb/tls-accept/v1\x00"

KIND = "direct-tcp"
CHANNELS = {"rpc": 0, "state": 1}
_CONTROL, _CREDIT = 2, 3
_HEAD = struct.Struct("!BI")
_CREDIT_BODY = struct.Struct("!BQ")
_MAX_CONTROL = 4096

DIAL_TIMEOUT = 2.0  # connect + TLS + identity check; past it, WebRTC is tried instead
HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING_HANDSHAKES = 64
DEFAULT_MAX_MESSAGE_SIZE = 64 << 20
DEFAULT_CREDIT_WINDOW = 8 << 20
PING_INTERVAL = 1.0
# A broken path (a NAT that forgot the mapping, a host gone) is found by the kernel: TCP keepalive
# probes every second once idle, and TCP_USER_TIMEOUT for unacknowledged data; either way the
# connection errors out within ~5 s. The kernel acknowledges for a peer whose event loop is busy
# (a notebook cell computing), so that is no false alarm. The pings' own limit is for a peer that
# is connected but answers nothing for this long (3 pings in a row unanswered, too).
TCP_DEAD_AFTER = 5.0
DEAD_AFTER = 20.0


class DirectLinkFailed(MeshError, ConnectionError):
    """A direct link could not be made or authenticated; ``reason`` says why."""


class DialRefused(DirectLinkFailed):
    """The listener authenticated us but refused the link (``glare``: its own dial to us wins)."""


# --------------------------------------------------------------------------------------------
# certificates bound to identities


def make_certificate(identity: Identity) -> tuple[bytes, bytes]:
    """A fresh TLS key and a self-signed certificate vouched for by ``identity`` (both PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    ext = identity.public_key + identity.sign(CERT_CONTEXT + spki)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.UnrecognizedExtension(EXTENSION_OID, ext), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_peer(der: bytes | None) -> tuple[str, bytes]:
    """The (peer id, identity key) a DER certificate is bound to; SignatureInvalid if it is not."""
    if not der:
        raise SignatureInvalid("the peer presented no TLS certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        ext = cert.extensions.get_extension_for_oid(EXTENSION_OID).value.value  # type: ignore[attr-defined]
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, x509.ExtensionNotFound, AttributeError) as exc:
        raise SignatureInvalid(f"TLS certificate carries no mesh identity: {exc}") from None
    if len(ext) != 96:
        raise SignatureInvalid("malformed mesh identity extension")
    key, sig = bytes(ext[:32]), bytes(ext[32:])
    if not verify_signature(key, CERT_CONTEXT + spki, sig):
        raise SignatureInvalid("the TLS key is not signed by the identity key in the certificate")
    return peer_id_of(key), key


def _contexts(identity: Identity) -> tuple[ssl.SSLContext, ssl.SSLContext, bytes]:
    cert_pem, key_pem = make_certificate(identity)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # verified by hand: certificate_peer()
    # load_cert_chain only reads files: write them private, load, delete at once.
    with tempfile.TemporaryDirectory(prefix="gnb-tls-") as tmp:
        cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_file, cert_pem), (key_file, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        server.load_cert_chain(cert_file, key_file)
    return server, client, ssl.PEM_cert_to_DER_cert(cert_pem.decode())


def _mac(secret: str | None, data: bytes) -> bytes:
    if not secret:
        return b""
    return hmac.new(hashlib.sha256(b"gradient-nb/direct|" + secret.encode()).digest(), data,
                    hashlib.sha256).digest()


# --------------------------------------------------------------------------------------------
# the link


class _Channel:
    """A :class:`~gradient_nb.mesh.transport.Transport` over one channel of a direct link."""

    def __init__(self, link: DirectLink, label: str, cid: int, max_message_size: int, window: int) -> None:
        self.label, self.max_message_size = label, max_message_size
        self._link, self._cid, self._window = link, cid, window
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._readable = asyncio.Event()
        self._credit_changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._unacked = 0
        self._consumed = 0
        self.refused_messages = 0

    @property
    def closed(self) -> bool:
        return self._link.closed

    def _error(self) -> LinkClosed:
        return self._link.closed_error(f"({self.label})")

    async def send(self, data: bytes) -> None:
        if self._link.closed:
            raise self._error()
        n = len(data)
        if n > self.max_message_size:
            raise ValueError(f"message of {n} bytes exceeds {self.max_message_size}")
        async with self._send_lock:
            while self._unacked >= self._window:
                self._credit_changed.clear()
                await self._link._wait(self._credit_changed, self._error)
            self._unacked += n + 16
            await self._link._write(_HEAD.pack(self._cid, n), data)

    async def recv(self) -> bytes:
        while not self._inbox:
            if self._link.closed:
                raise self._error()
            self._readable.clear()
            await self._readable.wait()
        msg = self._inbox.popleft()
        self._inbox_bytes -= len(msg) + 16
        self._consumed += len(msg) + 16
        if self._consumed >= self._window // 4 and not self._link.closed:
            credit, self._consumed = self._consumed, 0
            self._link._write_soon(_HEAD.pack(_CREDIT, _CREDIT_BODY.size) + _CREDIT_BODY.pack(self._cid, credit))
        return msg

    def _deliver(self, msg: bytes) -> None:
        self._inbox.append(msg)
        self._inbox_bytes += len(msg) + 16
        if self._inbox_bytes > 2 * self._window + self.max_message_size:
            raise DirectLinkFailed(f"peer overran the credit window on {self.label}")
        self._readable.set()

    def _credit(self, n: int) -> None:
        self._unacked = max(0, self._unacked - n)
        self._credit_changed.set()

    def _wake(self) -> None:
        self._readable.set()
        self._credit_changed.set()

    async def close(self) -> None:
        """Closing one transport closes its link: a link's channels live and die together."""
        await self._link.close()


class DirectLink:
    """An authenticated TLS link to ``remote_id``: the same surface as a WebRTC ``Link``."""

    kind = KIND

    def __init__(self, remote_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 initiator: bool, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, credit_window: int = DEFAULT_CREDIT_WINDOW,
                 ping_interval: float = PING_INTERVAL, dead_after: float = DEAD_AFTER) -> None:
        self.remote_id = remote_id
        self.initiator = initiator  # this side dialed
        self.on_close: list[Callable[[], None]] = []
        self.lost_reason: str | None = None  # set when the link died rather than being closed
        self.created = time.monotonic()
        self._reader, self._writer = reader, writer
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._closed_fut: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ping_interval, self._dead_after = ping_interval, dead_after
        self._rtt_samples: deque[float] = deque(maxlen=8)
        self._pings: dict[int, float] = {}
        self._pong_waiters: dict[int, asyncio.Future[float]] = {}
        self._ping_seq = 0
        self._last_heard = time.monotonic()
        self._bye = False  # the other side said it closes the link on purpose
        self.bytes_sent = self.bytes_received = 0
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        self.remote_address = f"{peer[0]}:{peer[1]}" if peer else None
        self.local_address = f"{local[0]}:{local[1]}" if local else None
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, int(TCP_DEAD_AFTER) - 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(TCP_DEAD_AFTER * 1000))
        self.transports: dict[str, _Channel] = {
            label: _Channel(self, label, cid, max_message_size, credit_window) for label, cid in CHANNELS.items()}
        self._by_id = {t._cid: t for t in self.transports.values()}

    def start(self) -> None:
        self._spawn(self._read_loop(), "direct-reader")
        self._spawn(self._ping_loop(), "direct-ping")

    @property
    def closed(self) -> bool:
        return self._closed

    def closed_error(self, where: str = "") -> LinkClosed:
        """LinkDied when the link died under us (its reason said), LinkClosed when it was closed."""
        if self.lost_reason:
            return LinkDied(f"link to {self.remote_id[:8]} lost {where}: {self.lost_reason}")
        return LinkClosed(f"link to {self.remote_id[:8]} closed {where}".rstrip())

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait(self, event: asyncio.Event, error: Callable[[], Exception]) -> None:
        while not event.is_set():
            if self._closed:
                raise error()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 1.0)
        if self._closed:
            raise error()

    async def _write(self, head: bytes, body: bytes = b"") -> None:
        async with self._write_lock:
            if self._closed:
                raise self.closed_error()
            try:
                self._writer.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    self._writer.write(body)
                await self._writer.drain()
            except (ConnectionError, OSError, RuntimeError) as exc:
                self._lost(f"connection broke: {exc}")
                raise self.closed_error() from None
            self.bytes_sent += len(head) + len(body)

    def _write_soon(self, frame: bytes) -> None:
        # Control and credit frames are tiny; the write lock keeps them between whole messages.
        self._spawn(self._quiet_write(frame), "direct-control")

    async def _quiet_write(self, frame: bytes) -> None:
        with contextlib.suppress(LinkClosed):
            await self._write(frame)

    async def _read_loop(self) -> None:
        r = self._reader
        try:
            while True:
                cid, n = _HEAD.unpack(await r.readexactly(_HEAD.size))
                self._last_heard = time.monotonic()
                self.bytes_received += _HEAD.size + n
                channel = self._by_id.get(cid)
                if channel is not None:
                    if n > channel.max_message_size:
                        channel.refused_messages += 1
                        log.warning("direct link %s/%s: refused a %d-byte message", self.remote_id[:8],
                                    channel.label, n)
                        while n:  # skip it; the link stays up
                            n -= len(await r.readexactly(min(n, 1 << 20)))
                        self._write_soon(_HEAD.pack(_CREDIT, _CREDIT_BODY.size) + _CREDIT_BODY.pack(cid, n + 16))
                        continue
                    channel._deliver(await r.readexactly(n))
                elif cid == _CREDIT and n == _CREDIT_BODY.size:
                    which, amount = _CREDIT_BODY.unpack(await r.readexactly(n))
                    if which in self._by_id:
                        self._by_id[which]._credit(amount)
                elif cid == _CONTROL and n <= _MAX_CONTROL:
                    self._on_control(await r.readexactly(n))
                else:
                    raise DirectLinkFailed(f"protocol error (frame type {cid}, {n} bytes)")
        except asyncio.IncompleteReadError:
            if self._bye:
                self._spawn_close()  # an orderly close by the other side
            else:
                self._lost("the connection ended without a goodbye")
        except (ConnectionError, OSError, TimeoutError) as exc:
            self._lost(f"connection broke: {exc}")
        except DirectLinkFailed as exc:
            log.warning("direct link %s: %s; closing", self.remote_id[:8], exc)
            self._lost(str(exc))

    def _on_control(self, raw: bytes) -> None:
        try:
            msg = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException):
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("n"), int):
            return
        if msg.get("t") == "bye":
            self._bye = True
        elif msg.get("t") == "ping":
            self._send_control({"t": "pong", "n": msg["n"]})
        elif msg.get("t") == "pong":
            sent = self._pings.pop(msg["n"], None)
            if sent is not None:
                rtt = (time.perf_counter() - sent) * 1000.0
                self._rtt_samples.append(rtt)
                waiter = self._pong_waiters.pop(msg["n"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(rtt)

    def _send_control(self, msg: dict[str, Any]) -> None:
        body = msgpack.packb(msg)
        self._write_soon(_HEAD.pack(_CONTROL, len(body)) + body)

    def _send_ping(self) -> int:
        self._ping_seq += 1
        now = time.perf_counter()
        self._pings = {n: t for n, t in self._pings.items() if now - t < 60.0}
        self._pings[self._ping_seq] = now
        self._send_control({"t": "ping", "n": self._ping_seq})
        return self._ping_seq

    async def _ping_loop(self) -> None:
        misses = 0
        while not self._closed:
            sent = time.monotonic()
            self._send_ping()
            await asyncio.sleep(self._ping_interval)
            # Dead only when several pings in a row went unanswered: a stall of this side's own
            # event loop sends no pings, so it cannot pass for a dead link.
            misses = misses + 1 if self._last_heard < sent else 0
            if misses >= 3 and time.monotonic() - self._last_heard > self._dead_after:
                self._lost(f"no reply to pings for {time.monotonic() - self._last_heard:.1f} s")
                return

    async def ping(self, timeout: float = 5.0) -> float:
        """Measure the round-trip time now, in ms."""
        if self._closed:
            raise LinkClosed(f"link to {self.remote_id[:8]} closed")
        seq = self._send_ping()
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pong_waiters[seq] = waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise DirectLinkFailed(f"no pong from {self.remote_id[:8]} in {timeout:.1f} s") from None
        finally:
            self._pong_waiters.pop(seq, None)

    def _lost(self, reason: str) -> None:
        if self._closed:
            return
        self.lost_reason = self.lost_reason or reason
        self._spawn_close()

    def _spawn_close(self) -> None:
        if self._closed_fut is None:
            asyncio.get_running_loop().create_task(self.close(), name="direct-close")

    async def close(self) -> None:
        """Close the connection, cancel this link's tasks, then run the ``on_close`` callbacks."""
        if self._closed_fut is not None:
            await asyncio.shield(self._closed_fut)
            return
        self._closed_fut = asyncio.get_running_loop().create_future()
        self._closed = True
        try:
            for t in self.transports.values():
                t._wake()
            for w in self._pong_waiters.values():
                if not w.done():
                    w.set_exception(LinkClosed(f"link to {self.remote_id[:8]} closed"))
            if not self.lost_reason:
                # Say goodbye, so the other side knows this close is on purpose (not a lost link).
                with contextlib.suppress(Exception):
                    body = msgpack.packb({"t": "bye", "n": 0})
                    self._writer.write(_HEAD.pack(_CONTROL, len(body)) + body)
                    await asyncio.wait_for(self._writer.drain(), 0.5)
            me = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not me]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 1.0)
            callbacks, self.on_close = self.on_close, []
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    log.exception("link on_close callback failed")
        finally:
            self._closed_fut.set_result(None)

    @property
    def last_heard_s(self) -> float:
        """Seconds since anything arrived from the other side."""
        return time.monotonic() - self._last_heard

    def rtt_ms(self) -> float | None:
        return robust_rtt(self._rtt_samples)

    def stats(self) -> Any:
        from .link import LinkStats

        # In ICE terms a direct link is host to host: no relay, no server-reflexive address.
        return LinkStats(local_candidate_type="host", remote_candidate_type="host", relayed=False,
                         rtt_ms=self.rtt_ms(), bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
                         local_address=self.local_address, remote_address=self.remote_address,
                         state="closed" if self._closed else "connected", kind=KIND)


def robust_rtt(samples: Iterable[float]) -> float | None:
    """The round-trip figure to publish from recent ping samples: the median of the lower half.

    A ping that queued behind bulk data, or the first one after connecting, measures the queue, not
    the path; routing reads this figure, so it must not jump with traffic. The lowest samples are
    the path; the median of the lower half keeps one lucky sample from setting it alone."""
    xs = sorted(samples)
    if not xs:
        return None
    return statistics.median(xs[: max(1, (len(xs) + 1) // 2)])


# --------------------------------------------------------------------------------------------
# listening and dialing


def advertised_addresses(port: int) -> list[str]:
    """``host:port`` strings other peers may dial: this machine's addresses (loopback only when
    there is nothing else, so a peer elsewhere does not dial its own machine in vain)."""
    from aioice.ice import get_host_addresses

    hosts = [a for a in get_host_addresses(use_ipv4=True, use_ipv6=False)
             if not ipaddress.ip_address(a).is_loopback]
    return [f"{h}:{port}" for h in (hosts or ["127.0.0.1"])]


def _parse(address: str) -> tuple[str, int] | None:
    host, _, port = str(address).rpartition(":")
    try:
        ipaddress.ip_address(host)
        p = int(port)
    except ValueError:
        return None
    return (host, p) if 0 < p < 65536 else None


async def _read_control(reader: asyncio.StreamReader) -> dict[str, Any]:
    cid, n = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    if cid != _CONTROL or n > _MAX_CONTROL:
        raise DirectLinkFailed("handshake: unexpected frame")
    msg = msgpack.unpackb(await reader.readexactly(n), raw=False)
    if not isinstance(msg, dict):
        raise DirectLinkFailed("handshake: malformed message")
    return msg


def _control_frame(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return _HEAD.pack(_CONTROL, len(body)) + body


class DirectEndpoint:
    """This peer's side of direct links: a TLS listener, and dialing out to others.

    ``accept(peer_id)`` decides whether an authenticated incoming link is taken (False: glare);
    ``on_link(link)`` receives every accepted incoming link, started."""

    def __init__(self, identity: Identity, *, mesh: str, secret: str | None,
                 accept: Callable[[str], bool], on_link: Callable[[DirectLink], Awaitable[None]]) -> None:
        self.identity, self.mesh, self.secret = identity, mesh, secret
        self._accept, self._on_link = accept, on_link
        self._server_ctx, self._client_ctx, self._cert_der = _contexts(identity)
        self._server: asyncio.Server | None = None
        self._handshakes = 0
        self.port = 0
        self.rejected = 0  # incoming connections that failed authentication

    async def listen(self, host: str = "0.0.0.0", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, ssl=self._server_ctx,
                                                  ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        self.port = self._server.sockets[0].getsockname()[1]

    def addresses(self) -> list[str]:
        return advertised_addresses(self.port) if self._server is not None else []

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._handshakes >= MAX_PENDING_HANDSHAKES:
            writer.close()
            return
        self._handshakes += 1
        link = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                peer_id, nonce = await self._authenticate_dialer(reader, writer)
                if not self._accept(peer_id):
                    writer.write(_control_frame({"t": "reject", "why": "glare"}))
                    await writer.drain()
                    raise DialRefused("glare")
                writer.write(_control_frame({"t": "ok", "mac": _mac(self.secret, ACCEPT_CONTEXT + nonce)}))
                await writer.drain()
            link = DirectLink(peer_id, reader, writer, initiator=False)
        except DialRefused:
            pass
        except (DirectLinkFailed, SignatureInvalid, ConnectionError, OSError, TimeoutError, ValueError, TypeError,
                KeyError, asyncio.IncompleteReadError, msgpack.UnpackException) as exc:
            self.rejected += 1
            log.info("refused a direct connection from %s: %s", writer.get_extra_info("peername"), exc)
        finally:
            self._handshakes -= 1
        if link is None:
            writer.close()
            return
        link.start()
        await self._on_link(link)

    async def _authenticate_dialer(self, reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> tuple[str, bytes]:
        nonce = secrets.token_bytes(32)
        writer.write(_control_frame({"t": "challenge", "nonce": nonce}))
        await writer.drain()
        msg = await _read_control(reader)
        key, sig, mac = msg.get("key"), msg.get("sig"), msg.get("mac", b"")
        if msg.get("t") != "auth" or not isinstance(key, bytes) or not isinstance(sig, bytes) \
                or not isinstance(mac, bytes):
            raise DirectLinkFailed("handshake: malformed auth")
        own_cert = hashlib.sha256(self._cert_der).digest()
        signed = AUTH_CONTEXT + self.mesh.encode() + b"\x00" + nonce + own_cert
        if not verify_signature(key, signed, sig):
            raise SignatureInvalid("the dialer's identity signature does not verify")
        if self.secret and not hmac.compare_digest(mac, _mac(self.secret, signed + sig)):
            raise SignatureInvalid("the dialer does not know this mesh's join secret")
        return peer_id_of(key), nonce

    async def dial(self, peer_id: str, addresses: Iterable[str], timeout: float = DIAL_TIMEOUT) -> DirectLink:
        """A direct link to ``peer_id`` at the first of ``addresses`` that answers as that peer.
        Raises :class:`DialRefused` on glare, :class:`DirectLinkFailed` with every address's reason."""
        targets = [t for t in (_parse(a) for a in addresses) if t is not None][:8]
        if not targets:
            raise DirectLinkFailed("the peer advertises no direct address")
        tasks = [asyncio.ensure_future(self._dial_one(peer_id, host, port)) for host, port in targets]
        errors: list[str] = []
        winner: DirectLink | None = None
        refused: DialRefused | None = None
        try:
            async with asyncio.timeout(timeout):
                for fut in asyncio.as_completed(tasks):
                    try:
                        winner = await fut
                        break
                    except DialRefused as exc:
                        refused = exc
                        break
                    except (DirectLinkFailed, SignatureInvalid, ConnectionError, OSError, ssl.SSLError,
                            asyncio.IncompleteReadError, ValueError, TypeError, msgpack.UnpackException) as exc:
                        errors.append(str(exc) or type(exc).__name__)
        except TimeoutError:
            errors.append(f"no authenticated answer within {timeout:.1f} s")
        finally:
            for t in tasks:
                t.cancel()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, DirectLink) and r is not winner:
                    await r.close()  # a second address answered too: one link is enough
        if refused is not None:
            raise refused
        if winner is None:
            raise DirectLinkFailed("; ".join(sorted(set(errors))) or "no address answered")
        return winner

    async def _dial_one(self, peer_id: str, host: str, port: int) -> DirectLink:
        reader, writer = await asyncio.open_connection(host, port, ssl=self._client_ctx,
                                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        try:
            ssl_obj = writer.get_extra_info("ssl_object")
            der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
            if ssl_obj is None or ssl_obj.version() != "TLSv1.3":
                raise DirectLinkFailed(f"{host}:{port} did not speak TLS 1.3")
            # Before anything else is read or sent: is this the peer we dialed?
            who, _ = certificate_peer(der)
            if who != peer_id:
                raise SignatureInvalid(f"{host}:{port} answered as peer {who[:8]}, not {peer_id[:8]}")
            challenge = await _read_control(reader)
            nonce = challenge.get("nonce")
            if challenge.get("t") != "challenge" or not isinstance(nonce, bytes) or len(nonce) != 32:
                raise DirectLinkFailed("handshake: malformed challenge")
            signed = AUTH_CONTEXT + self.mesh.encode() + b"\x00" + nonce + hashlib.sha256(der).digest()
            sig = self.identity.sign(signed)
            writer.write(_control_frame({"t": "auth", "key": self.identity.public_key, "sig": sig,
                                         "mac": _mac(self.secret, signed + sig)}))
            await writer.drain()
            reply = await _read_control(reader)
            if reply.get("t") == "reject":
                raise DialRefused(f"peer {peer_id[:8]} refused the direct link ({reply.get('why')})")
            if reply.get("t") != "ok":
                raise DirectLinkFailed("handshake: unexpected reply")
            if self.secret and not hmac.compare_digest(
                    reply.get("mac") if isinstance(reply.get("mac"), bytes) else b"",
                    _mac(self.secret, ACCEPT_CONTEXT + nonce)):
                raise SignatureInvalid(f"peer {peer_id[:8]} does not know this mesh's join secret")
        except BaseException:
            writer.close()
            raise
        link = DirectLink(peer_id, reader, writer, initiator=True)
        link.start()
        return link

