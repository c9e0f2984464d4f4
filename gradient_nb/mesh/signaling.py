"""Signed signaling envelopes: how two peers agree on a WebRTC link through untrusted relays.

An envelope carries an SDP offer or answer (or a refusal) from one peer to another. It is signed with
the sender's Ed25519 key, so neither the rendezvous nor a peer relaying it can alter it, and it names
mesh, sender, receiver, a time stamp and a nonce, so it cannot be replayed elsewhere or later. The
SDP inside carries the sender's DTLS certificate fingerprint, and aiortc refuses a DTLS handshake whose
certificate does not match it: signing the SDP binds the link's encryption to the peer's identity, and a
man in the middle at the rendezvous cannot impersonate a peer. With a join secret, an HMAC over the
signed bytes proves that the sender knows the secret too.

:class:`SignalRelay` routes envelopes: through the rendezvous while it is connected and knows the
receiver, otherwise over up to three linked peers (those whose records say they link to the
receiver first), at most :data:`RELAY_TTL` hops. Relays only forward: they cannot read a secret
out of, nor alter, what they carry.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgpack

from .errors import JoinRefused, MeshError, PeerUnreachable, SignatureInvalid
from .frames import Message
from .identity import Identity, sign_record, verify_record

MAX_AGE_S = 120.0
RELAY_TTL = 3
KINDS = ("offer", "answer", "reject")


def _mac(secret: str, data: bytes) -> bytes:
    return hmac.new(hashlib.sha256(b"gradient-nb/signal|" + secret.encode()).digest(), data,
                    hashlib.sha256).digest()


def seal(identity: Identity, *, mesh: str, to: str, kind: str, body: dict[str, Any],
         secret: str | None) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown signal kind {kind!r}")
    payload = {"mesh": mesh, "from": identity.peer_id, "to": to, "kind": kind, "body": body,
               "ts": time.time(), "nonce": secrets.token_bytes(12)}
    record = sign_record(identity, payload)
    signed = msgpack.packb(record, use_bin_type=True)
    return msgpack.packb({"signed": signed, "mac": _mac(secret, signed) if secret else b""},
                         use_bin_type=True)


class EnvelopeOpener:
    """Checks envelopes addressed to one peer; remembers nonces so that none is accepted twice."""

    def __init__(self, *, mesh: str, me: str, secret: str | None) -> None:
        self.mesh, self.me, self.secret = mesh, me, secret
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def open(self, data: bytes) -> dict[str, Any]:
        try:
            outer = msgpack.unpackb(data, raw=False, max_bin_len=1 << 20)
            signed, mac = outer["signed"], outer["mac"]
            if not isinstance(signed, bytes) or not isinstance(mac, bytes):
                raise TypeError("bad envelope fields")
            record = msgpack.unpackb(signed, raw=False)
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise SignatureInvalid(f"malformed signaling envelope: {exc}") from None
        if not isinstance(record, dict):
            raise SignatureInvalid("malformed signaling envelope")
        sender = record.get("payload", {}).get("from") if isinstance(record.get("payload"), dict) else None
        payload = verify_record(record, expect_peer_id=sender if isinstance(sender, str) else "")
        if self.secret and not hmac.compare_digest(mac, _mac(self.secret, signed)):
            raise JoinRefused(f"peer {str(sender)[:8]} does not know this mesh's join secret")
        if payload.get("mesh") != self.mesh or payload.get("to") != self.me:
            raise SignatureInvalid("signaling envelope is for another mesh or peer")
        if payload.get("kind") not in KINDS or not isinstance(payload.get("body"), dict):
            raise SignatureInvalid("signaling envelope has an unknown kind")
        now = time.time()
        ts, nonce = payload.get("ts"), payload.get("nonce")
        if not isinstance(ts, (int, float)) or abs(now - ts) > MAX_AGE_S or not isinstance(nonce, bytes):
            raise SignatureInvalid("signaling envelope is too old or from the future")
        while self._seen and next(iter(self._seen.values())) < now - 2 * MAX_AGE_S:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise SignatureInvalid("replayed signaling envelope")
        self._seen[nonce] = now
        return payload


class SignalRelay:
    """Delivers sealed envelopes to peers, and serves ``mesh.relay`` for others.

    ``links()``: this peer's links by peer id (each with an ``rpc`` endpoint); ``records()``: the
    registry records by peer id (their ``links`` say who links to whom); ``via_rendezvous(to, env)``:
    sends through the rendezvous and returns None, or says why it could not; ``deliver(env)``: an
    envelope for us."""

    def __init__(self, me: str, *, links: Callable[[], Mapping[str, Any]],
                 records: Callable[[], Mapping[str, dict[str, Any]]],
                 via_rendezvous: Callable[[str, bytes], Awaitable[str | None]],
                 deliver: Callable[[bytes], object]) -> None:
        self.me = me
        self._links, self._records = links, records
        self._via_rendezvous, self._deliver = via_rendezvous, deliver

    async def send(self, to: str, env: bytes) -> None:
        why = await self._via_rendezvous(to, env)
        if why is not None:
            await self.relay(to, env, RELAY_TTL, why)

    def toward(self, to: str) -> list[str]:
        """Linked peers, those that say they have a link to ``to`` first."""
        linked = [p for p in self._links() if p != to]
        direct = [pid for pid, rec in self._records().items()
                  if pid in linked and any(lk.get("peer") == to for lk in rec.get("links", []))]
        return direct + [p for p in linked if p not in direct]

    async def relay(self, to: str, env: bytes, ttl: int, why: str = "") -> None:
        links = self._links()
        if to in links:
            await links[to].rpc.call("mesh.relay", Message({"to": to, "env": env, "ttl": 0}), timeout=10)
            return
        if ttl <= 0:
            raise PeerUnreachable(f"no path to peer {to[:8]} for signaling")
        errors = []
        for relay in self.toward(to)[:3]:
            try:
                await self._links()[relay].rpc.call("mesh.relay", Message({"to": to, "env": env, "ttl": ttl - 1}),
                                                    timeout=10)
                return
            except (MeshError, KeyError, TimeoutError) as exc:
                errors.append(f"{relay[:8]}: {exc}")
        # Say why the rendezvous was not used: "gone" was reported while it ran, for a peer it
        # did not know yet.
        raise PeerUnreachable(f"cannot reach peer {to[:8]} for signaling: {why or 'not through the rendezvous'} "
                              f"and no linked peer could relay ({'; '.join(errors) or 'no links'})")

    async def on_relay(self, msg: Message, ctx: Any) -> Message:
        """The ``mesh.relay`` handler: deliver here, or pass on (the hop count only shrinks)."""
        to, env, ttl = msg.header.get("to"), msg.header.get("env"), msg.header.get("ttl", 0)
        if not isinstance(to, str) or not isinstance(env, bytes) or not isinstance(ttl, int):
            raise ValueError("mesh.relay needs to, env and ttl")
        if to == self.me:
            self._deliver(env)
        else:
            await self.relay(to, env, min(ttl, RELAY_TTL))
        return Message({"ok": True})
