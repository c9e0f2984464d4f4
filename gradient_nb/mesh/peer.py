"""A mesh peer: joins a named mesh, keeps links to the peers it needs, offers and calls services.

``await join(url)`` returns a :class:`Mesh`. Everything runs as tasks on the caller's event loop, owned
by the ``Mesh`` and cancelled by :meth:`Mesh.leave`, so a notebook kernel keeps executing cells while
the peer works.

How the parts fit:
- The rendezvous websocket carries signaling and the first state sync. Once the peer has links, both
  travel over them too (signals are relayed by linked peers; the state syncs on every link), so the
  mesh keeps working when the rendezvous goes away. The peer reconnects to it in the background.
- A link is one WebRTC peer connection with an ``rpc`` channel (an :class:`RpcEndpoint`) and a
  ``state`` channel (the signed state's sync session). A link is made on first use (``call`` to an unlinked
  peer), and a joining peer links eagerly to a few others so the state has paths without the
  rendezvous.
- When both sides offer at once ("glare"), the offer from the lower peer id wins.
- Where the peer's advertised address answers as that peer, the link is a direct TCP/TLS 1.3 link
  (``direct``: same channels, certificates bound to the identities) instead of WebRTC; when links
  cross, both ends keep the same one. A link that stops answering its pings is closed as lost:
  calls on it fail at once with the retryable ``LinkLost`` and the peer re-links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack

from . import resources
from .dht import Dht
from .direct import DialRefused, DirectEndpoint, DirectLink, DirectLinkFailed
from .errors import JoinRefused, MeshError, PeerUnreachable, RemoteError, SignatureInvalid, UnknownMethod
from .frames import Message
from .ice import IceConfig, explain_failure, same_network
from .identity import Identity
from .link import Link, LinkFailed, answer_link, offer_link
from .linkcap import LinkCap
from .rendezvous import YChannel, hello_signature_payload, secret_mac
from .rpc import CallContext, RpcEndpoint, Services
from .signaling import EnvelopeOpener, SignalRelay, seal
from .state import MeshState
from .tasks import cancel_and_wait
from .transport import LinkClosed, Transport

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
# How long join() tries to link to the mesh before it gives up and explains why (NATs, no TURN).
JOIN_LINK_TIMEOUT = 15.0
# How long a signal waits for the rendezvous to announce a peer it does not list yet: a peer that has
# just been welcomed is told to the others a moment later, and a call to it may come first.
ANNOUNCE_WAIT_S = 3.0
# Services every peer runs for the mesh itself: left out of what the UI shows.
INTERNAL_SERVICES = ("mesh.", "dht.", "diag.")


def _sdp_candidates(sdp: str | None) -> list[Any]:
    from aiortc.sdp import candidate_from_sdp

    out = []
    for line in (sdp or "").splitlines():
        if line.startswith("a=candidate:"):
            with contextlib.suppress(ValueError, IndexError):
                out.append(candidate_from_sdp(line[len("a="):].split(":", 1)[1]))
    return out


class _TransportChannel:
    """A state-sync channel over a link's ``state`` transport."""

    def __init__(self, transport: Transport, path: str) -> None:
        self._t, self._path = transport, path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> _TransportChannel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._t.recv()
        except LinkClosed:
            raise StopAsyncIteration from None

    async def recv(self) -> bytes:
        return await self.__anext__()

    async def send(self, message: bytes) -> None:
        with contextlib.suppress(LinkClosed):
            await self._t.send(message)


@dataclass
class PeerInfo:
    """One live peer as the registry shows it."""

    id: str
    name: str
    devices: list[dict[str, Any]]
    free_memory_bytes: int
    tflops: float
    services: list[str]
    links: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> PeerInfo:
        known = {"peer_id", "name", "devices", "free_memory_bytes", "tflops", "services", "links", "seq", "ts"}
        return cls(id=rec["peer_id"], name=str(rec.get("name", "")), devices=list(rec.get("devices", [])),
                   free_memory_bytes=int(rec.get("free_memory_bytes", 0)), tflops=float(rec.get("tflops", 0)),
                   services=list(rec.get("services", [])), links=list(rec.get("links", [])),
                   extra={k: v for k, v in rec.items() if k not in known})


@dataclass
class _PeerLink:
    link: Link | DirectLink
    rpc: RpcEndpoint
    provider_task: asyncio.Task | None = None


class Mesh:
    """A joined mesh, as seen from this peer. Create it with :func:`join`."""

    def __init__(self, url: str, *, mesh: str, name: str, identity: Identity, secret: str | None,
                 ice: IceConfig, heartbeat: float, peer_timeout: float, eager_links: int,
                 probe_seconds: float, observe: bool = False, check_links: bool = True,
                 direct: bool = True) -> None:
        self.url = url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        self.mesh_name, self.name, self.identity = mesh, name, identity
        self.id = identity.peer_id
        self.secret, self.ice = secret, ice
        self.heartbeat_interval, self.eager_links = heartbeat, eager_links
        self.state = MeshState(identity, peer_timeout=peer_timeout)
        self.services = Services()
        self.resources: dict[str, Any] = {}
        self.extra_record: dict[str, Any] = {}
        self._probe_seconds = probe_seconds
        self.observe = observe
        self.check_links = check_links
        # Direct TCP/TLS links (mesh/direct.py) to peers whose advertised address answers; WebRTC otherwise.
        self.direct = direct and not observe
        self._direct: DirectEndpoint | None = None
        self._dialing: set[str] = set()
        # Peers whose offer we are answering: no offer of ours may cross it (see _offer_to).
        self._answering: dict[str, str] = {}  # peer id -> the link id of its offer
        self.link_errors: dict[str, str] = {}  # peer id -> why the last attempt to link failed
        # peer id -> (our SDP, theirs) of a link attempt not yet connected: a join that gives up on it
        # before ICE itself does (its checks retry for about a minute) still explains from the candidates.
        self._link_sdps: dict[str, tuple[str | None, str | None]] = {}
        self._room_provider: Any = None  # the state's sync session with the rendezvous
        self._links: dict[str, _PeerLink] = {}
        self._connecting: dict[str, asyncio.Future[_PeerLink]] = {}
        self._offers: dict[str, tuple[str, asyncio.Future[dict]]] = {}  # peer -> (link id, answer future)
        self._opener = EnvelopeOpener(mesh=mesh, me=self.id, secret=secret)
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._room_channel: YChannel | None = None
        self._rendezvous_peers: set[str] = set()
        self._announced = asyncio.Event()  # set (then cleared) whenever the rendezvous lists a new peer
        self._closed = False
        self.rejected_signals = 0
        # One row per link and per peer each heartbeat; bounded so a long-lived kernel doesn't grow.
        self._link_history: deque[dict[str, Any]] = deque(maxlen=20000)
        self._peer_history: deque[dict[str, Any]] = deque(maxlen=20000)
        self.dht = Dht(_DhtNetwork(self), identity)
        self.link_cap = LinkCap()  # at most max_links open, idle ones closed (see linkcap)
        self.signals = SignalRelay(self.id, links=lambda: self._links, records=lambda: self.state.peers(),
                                   via_rendezvous=self._signal_via_rendezvous,
                                   deliver=lambda env: self._spawn(self._on_signal(env), "mesh-signal"))
        self.services.unary("mesh.relay", self.signals.on_relay)
        self.services.unary("mesh.ping", self._on_ping)

    # -- lifecycle -----------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._log_crash)
        return task

    @staticmethod
    def _log_crash(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def _start(self) -> None:
        if not self.observe:
            self.resources = await asyncio.to_thread(resources.measure, None, self._probe_seconds)
        if self.ice.stun or self.ice.turn:
            # Pick the TURN URL that answers from this network (UDP may be blocked) once, up front.
            self.ice = await self.ice.resolved()
        self._session = aiohttp.ClientSession()
        try:
            await self._connect_rendezvous()
        except BaseException:
            await self._session.close()
            raise
        if self.observe:
            return
        if self.direct:
            self._direct = DirectEndpoint(self.identity, mesh=self.mesh_name, secret=self.secret,
                                          accept=self._accept_direct, on_link=self._on_direct_link)
            try:
                await self._direct.listen()
            except OSError as exc:
                log.warning("no direct listener (%s); links use WebRTC only", exc)
                self._direct = None
        self._publish()
        await self.dht.start()
        self._spawn(self._heartbeat_loop(), "mesh-heartbeat")
        self._spawn(self._eager_link_loop(), "mesh-eager-links")
        if self.check_links:
            await self._check_reachable()

    async def _check_reachable(self) -> None:
        """Fail the join, with the reason, when no peer of the mesh can be linked to."""
        others = sorted(self._rendezvous_peers)[:3]
        if not others:
            return
        # Their records carry the addresses a direct link dials: wait (briefly) for the first sync.
        with contextlib.suppress(MeshError):
            await self.wait_synced(5.0)
        # One link is enough: the join does not wait out the attempts to peers it cannot reach (they go
        # on in the background, as eager links do).
        results = await self._link_any(others, JOIN_LINK_TIMEOUT)
        if None in results.values():
            return
        # An attempt still running between peers on one network is slow (a busy machine), not doomed:
        # let it use the rest of its connect time before the join gives up.
        slow = [p for p in others if p in self._connecting and p not in self.link_errors and self._near(p)]
        if slow:
            retried = await self._link_any(slow, CONNECT_TIMEOUT)
            if None in retried.values():
                return
            results.update(retried)
        names = {pid: rec.get("name", "") for pid, rec in self.state.peers().items()}
        reasons = "; ".join(f"{names.get(p) or 'peer'} ({p[:8]}): {self._why_unlinked(p, results[p])}"
                            for p in others)
        raise JoinRefused(f"joined the rendezvous but could not link to any peer of mesh {self.mesh_name!r}: "
                          f"{reasons}")

    async def _link_any(self, peers: list[str], timeout: float) -> dict[str, BaseException | None]:
        """Until a link to one of ``peers`` is up or every attempt failed: each peer's outcome (None:
        linked). Only the waits end early; the attempts themselves go on as the mesh's own tasks."""
        waits = {asyncio.ensure_future(self._link_to(p, timeout)): p for p in peers}
        out: dict[str, BaseException | None] = {}
        try:
            pending = set(waits)
            while pending and None not in out.values():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                out.update((waits[t], t.exception()) for t in done)
        finally:
            for t in waits:
                await cancel_and_wait(t)
        return out

    def _near(self, peer_id: str) -> bool:
        """Whether a link attempt to ``peer_id`` is between peers on one network (or has no answer yet, so
        the network is not known to be the obstacle)."""
        local, remote = self._link_sdps.get(peer_id, (None, None))
        return not (local and remote) or same_network(_sdp_candidates(local), _sdp_candidates(remote))

    def _why_unlinked(self, peer_id: str, error: BaseException) -> str:
        if peer_id in self.link_errors:
            return self.link_errors[peer_id]
        local, remote = self._link_sdps.get(peer_id, (None, None))
        if local and remote:  # candidates were exchanged, but no pair connected in time
            return explain_failure(self.ice, _sdp_candidates(local), _sdp_candidates(remote))
        return str(error)

    async def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait until the first state sync with the rendezvous room has completed."""
        if self._room_provider is None:
            raise MeshError("not connected to the rendezvous")
        try:
            await asyncio.wait_for(self._room_provider.synced.wait(), timeout)
        except TimeoutError:
            raise MeshError(f"no state sync from the rendezvous within {timeout:.0f} s") from None

    async def leave(self) -> None:
        """Leave cleanly: withdraw from the registry, close every link and task."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.state.remove_self()
            await asyncio.sleep(0.2)  # let the removal reach the other peers before the links close
        with contextlib.suppress(Exception):
            await self.dht.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pid in list(self._links):
            await self._drop_link(pid)
        if self._direct is not None:
            await self._direct.close()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.leave()

    # -- rendezvous ----------------------------------------------------------------------------
    async def _connect_rendezvous(self) -> None:
        assert self._session is not None
        endpoint = f"{self.url}/mesh/{self.mesh_name}"
        try:
            ws = await self._session.ws_connect(endpoint, timeout=aiohttp.ClientWSTimeout(ws_close=5),
                                                max_msg_size=4 << 20, heartbeat=15)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise JoinRefused(f"cannot reach the rendezvous at {self.url}: {exc}") from None
        try:
            challenge = await self._ws_receive(ws, 10)
            if challenge.get("t") != "challenge" or not isinstance(challenge.get("nonce"), bytes):
                raise JoinRefused(f"{self.url} is not a gradient-nb rendezvous")
            nonce = challenge["nonce"]
            hello = {"t": "hello", "peer_id": self.id, "key": self.identity.public_key, "name": self.name,
                     "sig": self.identity.sign(hello_signature_payload(self.mesh_name, nonce))}
            if self.secret:
                hello["mac"] = secret_mac(self.secret, nonce)
            elif challenge.get("secret_required"):
                raise JoinRefused(f"mesh {self.mesh_name!r} at {self.url} requires a join secret")
            await ws.send_bytes(msgpack.packb(hello))
            reply = await self._ws_receive(ws, 10)
            if reply.get("t") == "error":
                raise JoinRefused(f"the rendezvous refused to join: {reply.get('message')}")
            if reply.get("t") != "welcome":
                raise JoinRefused("unexpected reply from the rendezvous")
        except BaseException:
            await ws.close()
            raise
        self._ws = ws
        self._rendezvous_peers = {p for p in reply.get("peers", []) if isinstance(p, str)}
        for pid in self._rendezvous_peers:
            self.dht.add_contact(pid)
        self._room_channel = YChannel(ws, f"rendezvous/{self.mesh_name}")
        provider = self._room_provider = self.state.sync(self._room_channel)
        provider_task = self._spawn(provider.start(), "mesh-rendezvous-sync")
        self._spawn(self._rendezvous_reader(ws, provider_task), "mesh-rendezvous-reader")

    @staticmethod
    async def _ws_receive(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> dict[str, Any]:
        msg = await ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise JoinRefused(f"the rendezvous closed the connection ({msg.type.name})")
        data = msgpack.unpackb(msg.data, raw=False)
        if not isinstance(data, dict):
            raise JoinRefused("malformed message from the rendezvous")
        return data

    async def _rendezvous_reader(self, ws: aiohttp.ClientWebSocketResponse, provider_task: asyncio.Task) -> None:
        channel = self._room_channel
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    m = msgpack.unpackb(msg.data, raw=False)
                except (ValueError, msgpack.UnpackException):
                    continue
                if not isinstance(m, dict):
                    continue
                kind = m.get("t")
                if kind == "y" and isinstance(m.get("data"), bytes) and channel is not None:
                    await channel.inbox.put(m["data"])
                elif kind == "signal" and isinstance(m.get("env"), bytes):
                    self._spawn(self._on_signal(m["env"]), "mesh-signal")
                elif kind == "joined" and isinstance(m.get("peer"), str):
                    self._rendezvous_peers.add(m["peer"])
                    self.dht.add_contact(m["peer"])
                    self._announced.set()
                    self._announced.clear()
                elif kind == "left" and isinstance(m.get("peer"), str):
                    self._rendezvous_peers.discard(m["peer"])
                elif kind == "signal-error":
                    fut = self._offers.get(str(m.get("to")))
                    if fut is not None and not fut[1].done():
                        fut[1].set_exception(PeerUnreachable(str(m.get("message"))))
        finally:
            if channel is not None:
                channel.close()
            provider_task.cancel()
            if self._ws is ws:
                self._ws = None
            if not self._closed:
                log.info("lost the rendezvous at %s; the mesh goes on over its links", self.url)
                self._spawn(self._reconnect_rendezvous(), "mesh-rendezvous-reconnect")

    async def _reconnect_rendezvous(self) -> None:
        delay = 1.0
        while not self._closed and self._ws is None:
            await asyncio.sleep(delay)
            try:
                await self._connect_rendezvous()
                log.info("reconnected to the rendezvous at %s", self.url)
                return
            except JoinRefused:
                delay = min(delay * 2, 30.0)

    @property
    def rendezvous_connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    # -- signaling (routing of sealed envelopes: signaling.SignalRelay) ---------------------------
    async def _send_signal(self, to: str, kind: str, body: dict[str, Any]) -> None:
        env = seal(self.identity, mesh=self.mesh_name, to=to, kind=kind, body=body, secret=self.secret)
        await self.signals.send(to, env)

    async def _signal_via_rendezvous(self, to: str, env: bytes) -> str | None:
        """Send through the rendezvous (None), or say why not."""
        if self._ws is None or self._ws.closed:
            return "the rendezvous is not connected"
        if to not in self._rendezvous_peers and to not in self.state.peers():
            # Not heard of at all: it may have just been welcomed, and "joined" is on its way (the
            # rendezvous tells it before any of the newcomer's state, so a known record means the
            # peer is really away from the rendezvous, and relays are the way).
            await self._await_announced(to, ANNOUNCE_WAIT_S)
        if to not in self._rendezvous_peers:
            return "the rendezvous does not list that peer"
        if self._ws is None or self._ws.closed:
            return "the rendezvous is not connected"
        try:
            await self._ws.send_bytes(msgpack.packb({"t": "signal", "to": to, "env": env}))
        except (ConnectionError, RuntimeError) as exc:
            return f"sending through the rendezvous failed ({exc})"
        return None

    async def _await_announced(self, peer_id: str, timeout: float) -> None:
        """Wait (at most ``timeout``) until the rendezvous lists ``peer_id``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while peer_id not in self._rendezvous_peers and self.rendezvous_connected:
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._announced.wait(), left)

    async def _on_ping(self, msg: Message, ctx: CallContext) -> Message:
        return Message({"t": time.time()}, dict(msg.tensors))

    async def _on_signal(self, env: bytes) -> None:
        try:
            sig = self._opener.open(env)
        except (SignatureInvalid, JoinRefused) as exc:
            self.rejected_signals += 1
            log.warning("rejected a signaling message: %s", exc)
            return
        sender, kind, body = sig["from"], sig["kind"], sig["body"]
        if kind == "offer":
            await self._on_offer(sender, body)
        elif kind in ("answer", "reject"):
            pending = self._offers.get(sender)
            if pending is not None and pending[0] == body.get("link") and not pending[1].done():
                pending[1].set_result(dict(body, kind=kind))

    async def _on_offer(self, sender: str, body: dict[str, Any]) -> None:
        link_id, sdp = body.get("link"), body.get("sdp")
        if not isinstance(link_id, str) or not isinstance(sdp, str):
            return
        if sender in self._dialing:
            # Our direct dial is under way: if it fails we offer WebRTC ourselves.
            await self._send_signal(sender, "reject", {"link": link_id, "reason": "dialing"})
            return
        if sender in self._offers and self.id < sender:
            # Glare: both sides offered; the lower id's offer wins and the other side answers it.
            await self._send_signal(sender, "reject", {"link": link_id, "reason": "glare"})
            return
        old = self._links.get(sender)
        if old is not None and isinstance(old.link, DirectLink) and not old.link.closed:
            # Its WebRTC offer crossed our direct dial: the direct link wins (a peer that really lost
            # its end of a TCP link makes the link close here too, and may offer again then).
            await self._send_signal(sender, "reject", {"link": link_id, "reason": "linked"})
            return
        if isinstance(body.get("direct"), list) and await self._try_direct(sender, body["direct"]):
            await self._send_signal(sender, "reject", {"link": link_id, "reason": "direct"})
            return
        pending = self._offers.pop(sender, None)
        if pending is not None and not pending[1].done():
            pending[1].set_result({"kind": "reject", "reason": "glare"})
        link = None
        old = self._links.get(sender)
        if old is not None:
            # The other side offered again, so it lost its end of our link (e.g. it restarted).
            await self._drop_link(sender)
        self._answering[sender] = link_id
        try:
            try:
                link, answer = await answer_link(sender, self.ice, sdp)
                self._link_sdps[sender] = (answer, sdp)
                await self._send_signal(sender, "answer", {"link": link_id, "sdp": answer})
                await link.wait_connected(CONNECT_TIMEOUT)
            except (LinkFailed, MeshError, TimeoutError) as exc:
                log.warning("link from %s failed: %s", sender[:8], exc)
                local, remote = self._link_sdps.get(sender, (None, None))
                why = explain_failure(self.ice, _sdp_candidates(local), _sdp_candidates(remote)) if remote else str(exc)
                self.link_errors[sender] = why
                # Whoever waits for this link (we lost a glare, so our own offer was withdrawn) must learn now.
                fut = self._connecting.pop(sender, None)
                if fut is not None and not fut.done():
                    fut.set_exception(PeerUnreachable(f"cannot link to peer {sender[:8]}: {why}"))
                if link is not None:
                    with contextlib.suppress(Exception):
                        await link.close()
                return
            await self._register_link(sender, link)
        finally:
            if self._answering.get(sender) == link_id:
                del self._answering[sender]

    # -- links ---------------------------------------------------------------------------------
    def _keeps_old(self, peer_id: str, new: Link | DirectLink, old: Link | DirectLink) -> bool:
        """When two links to one peer cross (both sides dialed or offered at once), both ends keep
        the same one: a direct link over WebRTC, and of two direct links the one the lower id dialed.
        A second WebRTC link replaces the first (the other side offers again when it lost its end)."""
        if isinstance(old, DirectLink) != isinstance(new, DirectLink):
            return isinstance(old, DirectLink)
        if isinstance(old, DirectLink) and isinstance(new, DirectLink):
            lower_dialed = self.id < peer_id
            return old.initiator == lower_dialed and new.initiator != lower_dialed
        return False

    async def _register_link(self, peer_id: str, link: Link | DirectLink) -> _PeerLink:
        current = self._links.get(peer_id)
        if current is not None and current.link is not link and not current.link.closed \
                and self._keeps_old(peer_id, link, current.link):
            await link.close()
            return current
        rpc = RpcEndpoint(link.transports["rpc"], self.services, remote_id=peer_id)
        await rpc.start()
        pl = _PeerLink(link, rpc)
        provider = self.state.sync(_TransportChannel(link.transports["state"], f"link/{peer_id}"))
        pl.provider_task = self._spawn(provider.start(), f"mesh-sync-{peer_id[:8]}")
        old = self._links.get(peer_id)
        self._links[peer_id] = pl
        self.link_cap.touch(peer_id)
        if old is not None and old.link is not link:
            # A newer link replaces it (the other side lost its end, or a crossing link won).
            self._spawn(self._close_peer_link(old), f"mesh-replaced-{peer_id[:8]}")
        self._link_sdps.pop(peer_id, None)
        link.on_close.append(lambda: self._on_link_closed(peer_id, link))
        fut = self._connecting.pop(peer_id, None)
        if fut is not None and not fut.done():
            fut.set_result(pl)
        self.dht.add_contact(peer_id)
        log.info("linked to %s (%s)", peer_id[:8], link.stats().kind)
        return pl

    def _on_link_closed(self, peer_id: str, link: Link | DirectLink) -> None:
        pl = self._links.get(peer_id)
        if pl is not None and pl.link is link and not self._closed:
            self._spawn(self._drop_link(peer_id, link), f"mesh-unlink-{peer_id[:8]}")
            if link.lost_reason and peer_id in self.state.peers():
                # The link died under a live peer (a NAT forgot its mapping): re-link at once, so the
                # retry of whatever failed with LinkLost finds a new link.
                log.warning("link to %s lost (%s); re-linking", peer_id[:8], link.lost_reason)
                self.link_errors.pop(peer_id, None)
                self._spawn(self._relink(peer_id), f"mesh-relink-{peer_id[:8]}")

    async def _relink(self, peer_id: str, within: float = 60.0) -> None:
        """Link again to a peer whose link died, retrying (signaling may need a moment: the
        rendezvous connection can have died with the same NAT) while the peer is alive."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + within, 0.5
        while not self._closed and peer_id in self.state.peers() and loop.time() < deadline:
            if self._live(peer_id):
                return
            try:
                await self._link_to(peer_id, CONNECT_TIMEOUT)
                return
            except (MeshError, TimeoutError) as exc:
                log.info("re-link to %s failed (%s); retrying", peer_id[:8], exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)

    async def _close_peer_link(self, pl: _PeerLink) -> None:
        if pl.provider_task is not None:
            pl.provider_task.cancel()
        await pl.rpc.close()
        await pl.link.close()

    async def _drop_link(self, peer_id: str, link: Link | DirectLink | None = None) -> None:
        """Close the link to ``peer_id`` (only if it is still ``link``, when that is given)."""
        pl = self._links.get(peer_id)
        if pl is None or (link is not None and pl.link is not link):
            return
        del self._links[peer_id]
        await self._close_peer_link(pl)

    # -- direct links ----------------------------------------------------------------------------
    def _accept_direct(self, peer_id: str) -> bool:
        # Glare: both sides dial each other at once; the lower id's dial wins on both ends.
        if peer_id in self._dialing and self.id < peer_id:
            return False
        # A live direct link exists (theirs crossed ours): keep it, unless it has gone quiet (the
        # other side may have lost it before we noticed, and dials again).
        pl = self._links.get(peer_id)
        return not (pl is not None and isinstance(pl.link, DirectLink) and not pl.link.closed
                    and pl.link.last_heard_s < 2.0)

    async def _on_direct_link(self, link: DirectLink) -> None:
        if self._closed:
            await link.close()
            return
        await self._register_link(link.remote_id, link)

    async def _try_direct(self, peer_id: str, addresses: Any = None) -> bool:
        """Link to ``peer_id`` over TCP/TLS when it advertises an address that answers as that peer
        (in its registry record, or ``addresses`` from its signed offer). False: no direct path
        (WebRTC next). On glare, waits for the other side's dial to land."""
        if addresses is None:
            addresses = (self.state.peers().get(peer_id) or {}).get("direct")
        if self._direct is None or not isinstance(addresses, list) or not addresses:
            return False
        self._dialing.add(peer_id)
        try:
            link = await self._direct.dial(peer_id, [a for a in addresses if isinstance(a, str)])
        except DialRefused:
            fut = self._connecting.get(peer_id)
            if fut is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(fut), 5.0)
            return self._live(peer_id)
        except DirectLinkFailed as exc:
            log.debug("no direct link to %s: %s", peer_id[:8], exc)
            return False
        finally:
            self._dialing.discard(peer_id)
        await self._register_link(peer_id, link)
        return True

    def _live(self, peer_id: str) -> bool:
        pl = self._links.get(peer_id)
        return pl is not None and not pl.link.closed

    def _linked_or_linking(self, peer_id: str) -> bool:
        """A link to ``peer_id`` is up, or its offer to us is being answered: an offer of ours now
        would cross it, and its arrival would make the other side drop the link it has just made
        (it takes a second offer to mean that we lost our end). Whoever waits in ``_connecting`` is
        told by the answered link's registration, or its failure."""
        return self._live(peer_id) or peer_id in self._answering

    async def _offer_to(self, peer_id: str) -> None:
        if peer_id not in self.state.peers() and self._room_provider is not None:
            # Its record carries the addresses a direct link dials, and comes with the first state sync (a
            # call or the DHT may link to a peer the rendezvous just introduced, before that sync).
            with contextlib.suppress(MeshError):
                await self.wait_synced(2.0)
        if await self._try_direct(peer_id) or self._linked_or_linking(peer_id):
            return
        link_id = secrets.token_hex(8)
        answer_fut: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._offers[peer_id] = (link_id, answer_fut)
        pending = None
        sdp = answer_sdp = None
        try:
            pending, sdp = await offer_link(peer_id, self.ice)
            if self._linked_or_linking(peer_id):
                return  # the other side's direct dial or offer came while we gathered candidates
            offer: dict[str, Any] = {"link": link_id, "sdp": sdp}
            if self._direct is not None:
                # The other side may reach us directly even where we could not reach it (or did not
                # know its address yet): it then dials us and refuses this offer.
                offer["direct"] = self._direct.addresses()
            await self._send_signal(peer_id, "offer", offer)
            reply = await asyncio.wait_for(answer_fut, CONNECT_TIMEOUT)
            if reply["kind"] == "reject":
                await pending.close()
                return  # glare: the other side's offer makes the link and resolves _connecting
            answer_sdp = reply["sdp"]
            self._link_sdps[peer_id] = (sdp, answer_sdp)
            link = await pending.complete(answer_sdp)
            pending = None
            try:
                await link.wait_connected(CONNECT_TIMEOUT)
            except BaseException:
                await link.close()
                raise
            await self._register_link(peer_id, link)
        except (LinkFailed, MeshError, TimeoutError) as exc:
            if answer_sdp is None:
                why = f"no answer to the link offer ({str(exc) or type(exc).__name__})"
            else:
                why = explain_failure(self.ice, _sdp_candidates(sdp), _sdp_candidates(answer_sdp))
            self.link_errors[peer_id] = why
            log.warning("cannot link to %s: %s", peer_id[:8], why)
            fut = self._connecting.pop(peer_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc if isinstance(exc, MeshError) and answer_sdp is None else
                                  PeerUnreachable(f"cannot link to peer {peer_id[:8]}: {why}"))
        finally:
            if self._offers.get(peer_id, (None,))[0] == link_id:
                del self._offers[peer_id]
            if pending is not None:
                with contextlib.suppress(Exception):
                    await pending.close()

    async def connect(self, peer_id: str, timeout: float = CONNECT_TIMEOUT) -> None:
        """Make sure a link to ``peer_id`` exists (made on demand by :meth:`call` too)."""
        await self._link_to(peer_id, timeout)

    async def _link_to(self, peer_id: str, timeout: float) -> _PeerLink:
        if peer_id == self.id:
            raise ValueError("a peer cannot link to itself")
        pl = self._links.get(peer_id)
        if pl is not None and not pl.link.closed:
            return pl
        fut = self._connecting.get(peer_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            # Eager links may fail with nobody waiting; that is logged where it happens, not here.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._connecting[peer_id] = fut
            self._spawn(self._offer_to(peer_id), f"mesh-offer-{peer_id[:8]}")
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise PeerUnreachable(f"no link to peer {peer_id[:8]} after {timeout:.0f} s") from None

    # -- services and calls --------------------------------------------------------------------
    def offer(self, method: str, handler: Callable[..., Any], *, streaming: bool = False) -> None:
        """Serve ``method`` to the mesh. ``handler(message, ctx)`` returns a Message (or, with
        ``streaming=True``, is an async generator of Messages). The service is listed in the registry."""
        if streaming:
            self.services.streaming(method, handler)
        else:
            self.services.unary(method, handler)
        self._publish()

    def withdraw(self, method: str) -> None:
        self.services.remove(method)
        self._publish()

    async def call(self, peer_id: str, method: str, message: Message | None = None, *,
                   timeout: float = 30.0) -> Message:
        """Call ``method`` on ``peer_id``; remote failures arrive as typed ``MeshError``s."""
        if peer_id == self.id:
            # A peer can be a stage of its own request (a notebook kernel that serves layers and prompts
            # the model): run the handler here, failing the way a remote call would.
            return await self._call_self(method, message or Message(), timeout)
        pl = await self._link_to(peer_id, min(timeout, CONNECT_TIMEOUT))
        self.link_cap.touch(peer_id)
        return await pl.rpc.call(method, message, timeout=timeout)

    async def _call_self(self, method: str, message: Message, timeout: float) -> Message:
        found = self.services.lookup(method)
        if found is None or found[0] != "unary":
            raise UnknownMethod(message=f"this peer offers no unary method {method!r}")
        ctx = CallContext(self.id, method, asyncio.get_running_loop().time() + timeout)
        try:
            async with asyncio.timeout(timeout):
                result = await found[1](message, ctx)
        except (MeshError, TimeoutError):
            raise
        except Exception as exc:
            raise RemoteError(type(exc).__name__, str(exc)) from exc
        return Message() if result is None else result

    async def stream(self, peer_id: str, method: str, message: Message | None = None, *,
                     timeout: float = 30.0) -> AsyncIterator[Message]:
        """Stream the replies of a streaming ``method`` on ``peer_id``. Breaking out of the loop
        cancels the call on the far side."""
        pl = await self._link_to(peer_id, min(timeout, CONNECT_TIMEOUT))
        self.link_cap.touch(peer_id)
        agen = pl.rpc.stream(method, message, timeout=timeout)
        try:
            async for item in agen:
                yield item
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- registry ------------------------------------------------------------------------------
    def peers(self) -> list[PeerInfo]:
        """The live peers of the mesh, this one included, by name."""
        return sorted((PeerInfo.from_record(r) for r in self.state.peers().values()),
                      key=lambda p: (p.name, p.id))

    def providers(self, service: str) -> list[PeerInfo]:
        """Live peers that offer ``service``."""
        return [p for p in self.peers() if service in p.services]

    def links(self) -> dict[str, dict[str, Any]]:
        """This peer's links by remote peer id: ``kind`` (direct-tcp, webrtc-direct, webrtc-relay),
        candidate types, relay or not, RTT (robust to queued pings), bytes moved."""
        out = {}
        for pid, pl in self._links.items():
            s = pl.link.stats()
            out[pid] = {"peer": pid, "kind": s.kind, "type": s.remote_candidate_type,
                        "local_type": s.local_candidate_type,
                        "relayed": bool(s.relayed), "rtt_ms": s.rtt_ms, "bytes_sent": s.bytes_sent,
                        "bytes_received": s.bytes_received}
        return out

    def publish(self, **fields: Any) -> None:
        """Add fields to this peer's registry record (e.g. the layers it serves)."""
        self.extra_record.update(fields)
        self._publish()

    def _publish(self) -> None:
        if self._closed or self.observe:
            return
        rec = dict(self.extra_record)
        rec.update(name=self.name, services=self.services.names(), links=list(self.links().values()),
                   **self.resources)
        if self._direct is not None:
            rec["direct"] = self._direct.addresses()
        self.state.heartbeat(rec)

    def _record_metrics(self) -> None:
        now = time.time()
        for pid, lk in self.links().items():
            self._link_history.append({"time": now, "peer": pid, "type": lk["type"], "relayed": lk["relayed"],
                                       "rtt_ms": lk["rtt_ms"], "bytes_sent": lk["bytes_sent"],
                                       "bytes_received": lk["bytes_received"]})
        for p in self.peers():
            stats = p.extra.get("serving_stats") or {}
            layers = p.extra.get("layers") or [None, None]
            self._peer_history.append({"time": now, "peer": p.id, "name": p.name, "tflops": p.tflops,
                                       "free_memory_bytes": p.free_memory_bytes, "links": len(p.links),
                                       "layer_start": layers[0], "layer_end": layers[1],
                                       "served_tokens": stats.get("served_tokens", 0),
                                       "queue": stats.get("queue", 0),
                                       "latency_ms": stats.get("latency_ms")})

    def metrics(self, kind: str = "peers") -> Any:
        """Metrics history as a polars DataFrame: ``"peers"`` (one row per peer per heartbeat: compute,
        memory, layers, tokens served, queue, latency) or ``"links"`` (this peer's links: type, RTT, bytes)."""
        import polars as pl

        if kind not in ("peers", "links"):
            raise ValueError("kind is 'peers' or 'links'")
        rows = list(self._peer_history if kind == "peers" else self._link_history)
        return pl.DataFrame(rows, infer_schema_length=None)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self._publish()
            self._record_metrics()
            for gone in self.state.refresh():
                log.info("peer %s stopped heartbeating; dropped from the registry", gone[:8])
                self.dht.remove_contact(gone)
                if gone in self._links:
                    await self._drop_link(gone)

    async def _eager_link_loop(self) -> None:
        """Keep a few links so that state and signaling have paths that avoid the rendezvous."""
        await asyncio.sleep(0.5)
        while True:
            # Only peers whose record is here: it carries the addresses a direct link dials, and a peer known
            # only from the rendezvous would get a WebRTC offer where a direct link was possible.
            candidates = set(self.state.peers()) - set(self._links) - set(self._answering) - {self.id}
            want = self.eager_links - len(self._links)
            # Only the lower id of a pair starts an eager link, so two joiners don't both offer.
            chosen = [p for p in candidates if p > self.id]
            random.shuffle(chosen)
            for pid in chosen[:max(want, 0)]:
                if pid not in self._connecting:
                    self._spawn(self._quiet_link(pid), f"mesh-eager-{pid[:8]}")
            for pid, pl in list(self._links.items()):
                self.link_cap.touch(pid, pl.rpc.last_call)  # calls they made to us count as use too
            for pid in self.link_cap.to_evict(list(self._links), keep=self.eager_links,
                                              busy=lambda p: p in self._links and self._links[p].rpc.busy):
                log.info("closing the idle link to %s (link cap)", pid[:8])
                await self._drop_link(pid)
            await asyncio.sleep(2.0)

    async def _quiet_link(self, peer_id: str) -> None:
        with contextlib.suppress(MeshError, TimeoutError):
            await self._link_to(peer_id, CONNECT_TIMEOUT)

    def snapshot(self) -> dict[str, Any]:
        """The mesh as plain data, for widgets and the JupyterLab panel."""
        peers = []
        links = {}
        for p in self.peers():
            peers.append({"id": p.id, "name": p.name, "devices": p.devices, "free_memory_bytes":
                          p.free_memory_bytes, "tflops": p.tflops,
                          "services": [s for s in p.services if not s.startswith(INTERNAL_SERVICES)],
                          "layers": p.extra.get("layers"), "self": p.id == self.id})
            for lk in p.links:
                a, b = sorted((p.id, str(lk.get("peer"))))
                links.setdefault((a, b), {"a": a, "b": b, "kind": lk.get("kind"), "type": lk.get("type"),
                                          "relayed": lk.get("relayed"),
                                          "rtt_ms": lk.get("rtt_ms"), "bytes_sent": lk.get("bytes_sent", 0),
                                          "bytes_received": lk.get("bytes_received", 0)})
        return {"joined": not self._closed, "mesh": self.mesh_name, "self": self.id, "rendezvous": self.url,
                "rendezvous_connected": self.rendezvous_connected, "peers": peers, "links": list(links.values())}


class _DhtNetwork:
    """The DHT's view of the mesh: calls by peer id over (on-demand) links."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self.local_id = mesh.id

    async def call(self, peer_id: str, method: str, header: dict, timeout: float) -> dict:
        reply = await self._mesh.call(peer_id, method, Message(header), timeout=timeout)
        return reply.header

    def serve(self, method: str, handler: Callable[[str, dict], Awaitable[dict]]) -> None:
        async def unary(msg: Message, ctx: CallContext) -> Message:
            return Message(await handler(ctx.peer_id, msg.header))

        self._mesh.services.unary(method, unary)


async def join(url: str, *, mesh: str = "default", name: str | None = None, secret: str | None = None,
               identity: Identity | None = None, ice: IceConfig | None = None, heartbeat: float = 2.0,
               peer_timeout: float = 10.0, eager_links: int = 4, probe_seconds: float = 0.25,
               observe: bool = False, check_links: bool = True, direct: bool = True) -> Mesh:
    """Join the mesh ``mesh`` introduced by the rendezvous at ``url`` (``ws://host:port``).

    ``identity`` defaults to the user's persistent key; pass ``Identity.generate()`` for a throwaway one.
    ``ice`` names the STUN/TURN servers links may use; none by default (same host or LAN only).
    ``observe=True`` only reads the state: nothing is published and no links are made.
    With ``check_links`` (the default) the join links to a few peers right away and fails with the
    reason (e.g. a symmetric NAT with no TURN server) when none can be reached.
    With ``direct`` (the default) the peer listens for TCP/TLS links on all its addresses and dials
    a peer's advertised address first (``mesh/direct.py``), falling back to WebRTC.
    Raises :class:`JoinRefused` with the reason when the rendezvous is unreachable or refuses.
    """
    identity = identity or Identity.load_or_create()
    m = Mesh(url, mesh=mesh, name=name or f"peer-{identity.peer_id[:6]}", identity=identity, secret=secret,
             ice=ice or IceConfig(), heartbeat=heartbeat, peer_timeout=peer_timeout, eager_links=eager_links,
             probe_seconds=probe_seconds, observe=observe, check_links=check_links, direct=direct)
    try:
        await m._start()
    except BaseException:
        await m.leave()
        raise
    return m
