"""ICE server configuration for mesh links, and the diagnosis of links that could not connect.

The mesh only ever contacts the STUN/TURN servers it was given: aiortc falls back to Google's
public STUN server when ``iceServers`` is ``None``, so an explicit (possibly empty) list is always
passed.

aiortc uses one STUN and one TURN URL of the list. A TURN server usually offers UDP, TCP and TLS,
and which of them gets out depends on the network the peer is in (UDP is blocked on many corporate
and hotel networks). So :class:`IceConfig` holds one ``turn`` URL plus ``turn_fallbacks``, and
:meth:`IceConfig.resolved` picks the first of them that answers a STUN request from here, in
order: the user lists them once and never chooses by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer

_BINDING_SUCCESS = b"\x01\x01"


@dataclass(frozen=True)
class IceConfig:
    """Where a peer may look for its public address (STUN) and a relay (TURN).

    ``stun``: e.g. ``"stun:203.0.113.5:3478"``; ``turn``: e.g. ``"turn:203.0.113.5:3478?transport=udp"``
    or ``"turns:host:5349?transport=tcp"``, with ``turn_username``/``turn_password``.
    ``turn_fallbacks``: further TURN URLs of the same server (same credentials), tried in order
    by :meth:`resolved` when ``turn`` is unreachable from this network.
    """

    stun: str | None = None
    turn: str | None = None
    turn_username: str | None = None
    turn_password: str | None = None
    relay_only: bool = False
    turn_fallbacks: tuple[str, ...] = ()

    def to_rtc(self) -> RTCConfiguration:
        install_aioice_fixes()
        servers: list[RTCIceServer] = []
        if self.stun:
            servers.append(RTCIceServer(urls=self.stun))
        if self.turn:
            servers.append(
                RTCIceServer(urls=self.turn, username=self.turn_username, credential=self.turn_password)
            )
        if self.relay_only:
            from aiortc import RTCIceTransportPolicy

            return RTCConfiguration(iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy.RELAY)
        return RTCConfiguration(iceServers=servers)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in self.__dict__.items() if v not in (None, False, ())}

    @classmethod
    def from_dict(cls, d: dict | None) -> IceConfig:
        d = d or {}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ICE settings: {sorted(unknown)}")
        if "turn_fallbacks" in d:
            d = {**d, "turn_fallbacks": tuple(d["turn_fallbacks"])}
        return cls(**d)

    async def resolved(self, timeout: float = 1.5) -> IceConfig:
        """This configuration checked against the network it runs in: ``turn`` becomes the first of
        ``turn``, ``*turn_fallbacks`` that answers a STUN request from here (UDP with a few
        retransmissions, TCP and TLS with a connection), with no fallbacks left; ``stun`` is dropped
        when it does not answer (UDP blocked), which spares aioice's 5 s gathering timeout. When no
        TURN URL answers, the first is kept (the link fails and :func:`explain_failure` says why).
        Costs one round trip per server when UDP works."""
        stun_ok = asyncio.ensure_future(_answers(self.stun, timeout)) if self.stun else None
        try:
            turn = self.turn
            if self.turn and self.turn_fallbacks:
                for url in (self.turn, *self.turn_fallbacks):
                    if await _answers(url, timeout):
                        turn = url
                        break
            stun = self.stun if stun_ok is None or await stun_ok else None
        finally:
            if stun_ok is not None:
                stun_ok.cancel()
        return replace(self, stun=stun, turn=turn, turn_fallbacks=())


def _target(url: str) -> tuple[str, str, int]:
    """(``"udp"``, ``"tcp"`` or ``"tls"``, host, port) of a STUN/TURN URL, as aiortc parses it."""
    from aiortc.rtcicetransport import parse_stun_turn_uri

    parsed = parse_stun_turn_uri(url)
    if parsed["scheme"] == "stun":
        return "udp", parsed["host"], parsed["port"]
    return ("tls" if parsed["scheme"] in ("turns", "stuns") else parsed["transport"]), parsed["host"], parsed["port"]


async def _answers(url: str, timeout: float) -> bool:
    """Whether the server behind ``url`` answers a STUN Binding request over its transport."""
    from aioice import stun

    kind, host, port = _target(url)
    request = bytes(stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST))
    loop = asyncio.get_running_loop()
    if kind == "udp":
        answered: asyncio.Future[None] = loop.create_future()

        class _Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if data[:2] == _BINDING_SUCCESS and data[8:20] == request[8:20] and not answered.done():
                    answered.set_result(None)

            def error_received(self, exc: Exception) -> None:
                pass  # ICMP unreachable: keep waiting for the other tries, then report False

        try:
            transport, _ = await loop.create_datagram_endpoint(_Proto, remote_addr=(host, port))
        except OSError:
            return False
        try:
            # Retransmit: one lost datagram must not push a UDP-capable peer onto TCP.
            for wait in (0.2, 0.4, max(0.1, timeout - 0.6)):
                transport.sendto(request)
                try:
                    await asyncio.wait_for(asyncio.shield(answered), wait)
                    return True
                except TimeoutError:
                    continue
            return False
        finally:
            transport.close()
    try:
        ctx = ssl.create_default_context() if kind == "tls" else None
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), timeout)
    except (OSError, TimeoutError, ssl.SSLError):
        return False
    try:
        writer.write(request)
        header = await asyncio.wait_for(reader.readexactly(20), timeout)
        return header[:2] == _BINDING_SUCCESS
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


# -- what a link ended up using, and why one failed -------------------------------------------


def _host(c: Any) -> str:
    return getattr(c, "host", None) or getattr(c, "ip", "")


def selected_pair(pc: Any) -> dict[str, Any] | None:
    """The candidate pair an ``RTCPeerConnection`` selected: ``local_type``/``remote_type``
    (host, srflx, prflx, relay), the addresses, and ``link_type``: ``"relay"`` when either end is a
    TURN relay, else ``"direct"``. ``None`` before a pair is selected."""
    transport = pc.sctp.transport.transport if pc.sctp else None
    conn = getattr(transport, "_connection", None)
    pair = getattr(conn, "_nominated", {}).get(1) if conn is not None else None
    if pair is None:
        return None
    local, remote = pair.local_candidate, pair.remote_candidate
    # A remote relay can show up as peer-reflexive when its check arrives before its candidate
    # is paired; the address tells.
    remote_relays = {(c.host, c.port) for c in conn.remote_candidates if c.type == "relay"}
    remote_is_relay = remote.type == "relay" or (remote.host, remote.port) in remote_relays
    return {"local_type": local.type, "remote_type": "relay" if remote_is_relay else remote.type,
            "local_address": f"{local.host}:{local.port}", "remote_address": f"{remote.host}:{remote.port}",
            "link_type": "relay" if local.type == "relay" or remote_is_relay else "direct"}


def same_network(local_candidates: Iterable[Any], remote_candidates: Iterable[Any]) -> bool:
    """Whether two peers' host candidates share an address (one machine) or a private IPv4 /24 (one LAN):
    then a failed link is not the NATs' doing."""
    def hosts(cands: Iterable[Any]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        out = set()
        for c in cands:
            if c.type == "host":
                with contextlib.suppress(ValueError):
                    out.add(ipaddress.ip_address(_host(c).split("%", 1)[0]))
        return out

    loc, rem = list(local_candidates), list(remote_candidates)
    public_loc = {_host(c) for c in loc if c.type == "srflx"}
    public_rem = {_host(c) for c in rem if c.type == "srflx"}
    if public_loc and public_rem and not public_loc & public_rem:
        return False  # behind different NATs: private ranges are reused everywhere (192.168.1.x)
    mine, theirs = hosts(loc), hosts(rem)
    if mine & theirs:
        return True
    nets = {ipaddress.ip_network(f"{a}/24", strict=False) for a in mine if a.version == 4 and a.is_private}
    return any(a in net for a in theirs if a.version == 4 for net in nets)


def explain_failure(local: IceConfig, local_candidates: Iterable[Any], remote_candidates: Iterable[Any]) -> str:
    """Why a link between these candidates could not connect, and what would fix it.

    Candidates may be aioice ``Candidate`` or aiortc ``RTCIceCandidate`` objects.
    """
    loc, rem = list(local_candidates), list(remote_candidates)

    def types(cands: list[Any]) -> set[str]:
        return {c.type for c in cands}

    def public(cands: list[Any]) -> bool:
        # Not in a private/link-local range; documentation ranges count as public (the NAT lab).
        return any(c.type == "host" and not _non_relayable(_host(c)) for c in cands)

    lt, rt = types(loc), types(rem)
    # This end's own candidates first: a relay candidate on the other side must not hide that
    # this side's TURN server gave none.
    if local.turn and "relay" not in lt:
        return (f"TURN is configured ({local.turn}) but no relay candidate was obtained here: the TURN "
                "server is unreachable from this network or refused the credentials. If UDP is blocked, "
                "add TCP/TLS URLs as turn_fallbacks (turn:HOST:3478?transport=tcp, turns:HOST:5349).")
    if "relay" in lt or "relay" in rt:
        return ("A TURN relay was available but the link still failed: the relay may have dropped "
                "mid-way, or a firewall blocks the relay's ports; check the TURN server's log.")
    if local.stun and "srflx" not in lt and not public(loc):
        return (f"No public address was learned from STUN ({local.stun}): outbound UDP looks blocked here. "
                "Direct links cannot work; a TURN server reachable over TCP or TLS is needed "
                "(IceConfig(turn='turn:HOST:3478?transport=tcp' or 'turns:HOST:5349', ...)).")
    if not rem:
        return "The remote peer sent no candidates; it has no usable network address."
    if same_network(loc, rem):
        return ("Both peers offered addresses on one local network and no candidate pair answered in time: "
                "the machine or the peer processes were probably too busy for ICE's checks, or a local "
                "firewall drops UDP between them.")
    behind_nat = [not public(loc), not public(rem)]
    # A peer-reflexive candidate on the public address of a peer's NAT, but on a port that its
    # STUN-learned candidate did not announce, means that NAT gave a new port per destination.
    srflx_ips = {_host(c) for c in rem if c.type == "srflx"}
    srflx_addrs = {(_host(c), c.port) for c in rem if c.type == "srflx"}
    symmetric_seen = any(c.type == "prflx" and _host(c) in srflx_ips and (_host(c), c.port) not in srflx_addrs
                         for c in rem)
    evidence = (" The remote peer's checks arrived from a port its STUN candidate did not announce: its NAT "
                "maps each destination to a new port (symmetric NAT)." if symmetric_seen else "")
    if all(behind_nat) or (any(behind_nat) and "srflx" in lt | rt):
        return ("No direct path: " + ("both peers are" if all(behind_nat) else "a peer is")
                + " behind NAT and hole punching with the STUN-learned addresses failed, which is what a "
                "symmetric NAT (a new public port for every destination) or a UDP-filtering firewall does."
                + evidence + " A TURN server is needed: set IceConfig(turn='turn:HOST:3478', turn_username=..., "
                "turn_password=...) (with turn_fallbacks for TCP/TLS); only links that need it are relayed.")
    if not local.stun:
        return ("No STUN server is configured, so only local addresses were offered; peers on different "
                "networks need at least STUN, and TURN when a NAT is symmetric.")
    return ("ICE found no working candidate pair although addresses look reachable; a firewall probably "
            "drops UDP between the peers. A TURN server (over TCP/TLS if needed) would relay the link.")


# -- aioice fixes -------------------------------------------------------------------------------
#
# Why links behind a symmetric NAT failed with TURN under the default transport policy (coturn
# answering ChannelBind with 438, then 400), found in the NAT lab with coturn -v and aioice logs:
#
# 1. aioice pairs the local relayed candidate with every remote candidate, including the remote
#    peer's private host address (10.x). Its relayed check makes coturn send to that address. A
#    TURN server with no route to that range (the lab's has only its public segment) fails the
#    sendto() with ENETUNREACH. (Silently dropped sends, and ICMP port unreachable, are harmless:
#    checked in the lab by sending through an allocation.)
# 2. coturn 4.6 then treats the relay socket as broken: the next packet that arrives on it (the
#    remote peer's relayed check, i.e. exactly the traffic that would have connected the link)
#    closes the whole allocation ("closed (2nd stage) ... reason: general", peer usage sp=0).
# 3. aioice is not told; it keeps sending on the dead allocation. coturn sees a new session for
#    the same 5-tuple: 438 Wrong nonce, then 400 for channels without an allocation. The relay is
#    gone on both sides, and direct pairs cannot work through a symmetric NAT: ICE fails.
# With iceTransportPolicy=relay, aioice drops remote host candidates, which is why that "worked".
#
# A relay on a public TURN server can never usefully reach a remote peer's private, link-local or
# loopback address (the peer is reached through its reflexive or relayed candidate instead), and
# hardened servers refuse those peers anyway (403). So relayed candidates are not paired with
# such remote candidates, unless the relayed address is itself private (a TURN server on a LAN).
# The remote peer's candidates are all still used by its own host/reflexive sockets.
#
# A second, smaller fix: aiortc nominates aggressively (every check of the controlling agent carries
# USE-CANDIDATE), so the first pair to answer wins. A relayed pair to a TURN server often answers
# before the direct pair that needs the other side's check first (public host <-> symmetric NAT,
# where the direct path is learned as peer-reflexive), and the link would be relayed for nothing.
# The controlling agent therefore holds its relayed checks back for up to RELAY_GRACE seconds after
# its checks began, while a direct pair is still being tried; links that need the relay connect
# that much later, links that don't stay off the TURN server (ARCHITECTURE principle 2).

_NON_RELAYABLE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8",
    "0.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128"))
_PATCHED_AIOICE = ((0, 13), (0, 13))  # versions whose pairing and check code this was checked against
_FIXES_INSTALLED = False
RELAY_GRACE = 1.0


def _non_relayable(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False  # a hostname (mDNS): aioice already keeps those away from relays
    return any(ip in net for net in _NON_RELAYABLE)


def relay_can_reach(relayed_address: str, remote_address: str) -> bool:
    """Whether a TURN relay at ``relayed_address`` should try to reach ``remote_address``."""
    return _non_relayable(relayed_address) or not _non_relayable(remote_address)


def install_aioice_fixes() -> bool:
    """Install the pairing fix above into aioice (idempotent). Returns whether it is active: only for
    aioice versions it was checked against; a newer aioice runs unpatched (the NAT lab tests tell)."""
    global _FIXES_INSTALLED
    if _FIXES_INSTALLED:
        return True
    import logging

    import aioice
    from aioice import ice as aioice_ice

    version = tuple(int(x) for x in aioice.__version__.split(".")[:2])
    original = getattr(aioice_ice.Connection, "_pair_remote_candidate", None)
    if not (_PATCHED_AIOICE[0] <= version <= _PATCHED_AIOICE[1]) or original is None:
        logging.getLogger(__name__).warning(
            "aioice %s is not a version the relay-pairing fix was checked against; not applied",
            aioice.__version__)
        return False

    def _pair_remote_candidate(self: Any, remote_candidate: Any) -> None:
        host = getattr(remote_candidate, "_network_host", None) or remote_candidate.host
        if not _non_relayable(host):
            return original(self, remote_candidate)
        protocols = self._protocols
        self._protocols = [p for p in protocols
                           if p.local_candidate.type != "relay" or relay_can_reach(p.local_candidate.host, host)]
        try:
            return original(self, remote_candidate)
        finally:
            self._protocols = protocols

    original_check_start = aioice_ice.Connection.check_start
    live = (aioice_ice.CandidatePair.State.FROZEN, aioice_ice.CandidatePair.State.WAITING,
            aioice_ice.CandidatePair.State.IN_PROGRESS)

    async def check_start(self: Any, pair: Any) -> None:
        loop = asyncio.get_running_loop()
        started = self.__dict__.setdefault("_gnb_checks_started", loop.time())
        if self.ice_controlling and "relay" in (pair.local_candidate.type, pair.remote_candidate.type):
            # In progress while held back, or aioice's pacer would keep picking this pair and
            # start no other.
            self.check_state(pair, aioice_ice.CandidatePair.State.IN_PROGRESS)
            # Polled: aioice has no event for pair state changes.
            while loop.time() < started + RELAY_GRACE and not self._check_list_done and any(  # noqa: ASYNC110
                    p.state in live and "relay" not in (p.local_candidate.type, p.remote_candidate.type)
                    for p in self._check_list):
                await asyncio.sleep(0.05)
        return await original_check_start(self, pair)

    aioice_ice.Connection._pair_remote_candidate = _pair_remote_candidate
    aioice_ice.Connection.check_start = check_start
    _FIXES_INSTALLED = True
    return True
