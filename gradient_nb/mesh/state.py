"""Replicated mesh state: one pycrdt (Yjs) document per mesh, every entry signed by its owner.

Layout of the document: one ``Map`` per namespace. A key is ``"<peer id>"`` or ``"<peer id>/<name>"`` and
its value is a msgpack-encoded signed record (``identity.sign_record``). Only the peer whose id prefixes
a key may write it: a reader verifies the signature and that the signer's id matches the key, and
ignores (and counts) anything else. So the CRDT gives convergence and the signatures give authorship;
the rendezvous room, which merges updates blindly, cannot forge anything.

The peer registry is the namespace ``"peers"``. Liveness is judged by the local clock: a peer is alive
while its heartbeat counter keeps changing, so clock skew between machines does not matter. A record
whose own wall-clock stamp is far in the past is dead at once, so a newcomer does not mistake the
leftovers of long-gone peers in the room for live ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from pycrdt import Doc, Map

from .errors import SignatureInvalid
from .identity import Identity, sign_record, verify_record

log = logging.getLogger(__name__)

REGISTRY = "peers"
# Records stamped this long ago (by their owner's clock) are dead on sight, whatever the local clock saw.
STALE_AFTER_S = 120.0


@dataclass(frozen=True)
class Entry:
    namespace: str
    owner: str
    name: str
    value: Any
    ts: float


class MeshState:
    """The signed, replicated state of one mesh as seen by one peer."""

    def __init__(self, identity: Identity, *, peer_timeout: float = 10.0) -> None:
        self.identity = identity
        self.peer_timeout = peer_timeout
        self.doc = Doc()
        self.forged_entries = 0
        self._seq = 0
        # key -> (raw bytes, verified payload) so that unchanged entries are verified once.
        self._verified: dict[tuple[str, str], tuple[bytes, dict]] = {}
        # peer id -> (heartbeat seq, local monotonic time it changed)
        self._heard: dict[str, tuple[int, float]] = {}
        self._watchers: list[Callable[[set[str]], None]] = []
        self._subscription = None
        self._notify_pending = False
        self._last_refresh = time.monotonic()

    # -- writing -------------------------------------------------------------------------------
    def _map(self, namespace: str) -> Map:
        if not namespace or "/" in namespace:
            raise ValueError(f"bad namespace {namespace!r}")
        return self.doc.get(namespace, type=Map)

    def _write(self, namespace: str, key: str, payload: dict) -> None:
        record = sign_record(self.identity, payload)
        self._map(namespace)[key] = msgpack.packb(record, use_bin_type=True)

    def put(self, namespace: str, name: str, value: Any) -> None:
        """Publish ``value`` (msgpack-able) under this peer's ``name`` in ``namespace``."""
        if not name or "/" in name:
            raise ValueError(f"bad entry name {name!r}")
        key = f"{self.identity.peer_id}/{name}"
        self._write(namespace, key, {"owner": self.identity.peer_id, "name": name, "value": value,
                                     "ts": time.time()})

    def delete(self, namespace: str, name: str) -> None:
        m = self._map(namespace)
        key = f"{self.identity.peer_id}/{name}"
        if key in m:
            del m[key]

    def heartbeat(self, record: dict) -> None:
        """Publish this peer's registry record; each call counts as one heartbeat."""
        self._seq += 1
        payload = dict(record, peer_id=self.identity.peer_id, seq=self._seq, ts=time.time())
        self._write(REGISTRY, self.identity.peer_id, payload)

    def remove_self(self) -> None:
        m = self._map(REGISTRY)
        if self.identity.peer_id in m:
            del m[self.identity.peer_id]

    # -- reading -------------------------------------------------------------------------------
    def _read(self, namespace: str, key: str, raw: Any) -> dict | None:
        raw = bytes(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else None
        cached = self._verified.get((namespace, key))
        if cached is not None and raw is not None and cached[0] == raw:
            return cached[1]
        owner = key.split("/", 1)[0]
        try:
            if raw is None:
                raise SignatureInvalid("entry is not a signed record")
            record = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=len(raw))
            if not isinstance(record, dict):
                raise SignatureInvalid("entry is not a signed record")
            payload = verify_record(record, expect_peer_id=owner)
            if namespace == REGISTRY and payload.get("peer_id") != owner:
                raise SignatureInvalid("registry record for another peer")
            if namespace != REGISTRY and (payload.get("owner") != owner
                                          or f"{owner}/{payload.get('name')}" != key):
                raise SignatureInvalid("entry name does not match its key")
        except (SignatureInvalid, ValueError, TypeError, msgpack.UnpackException) as exc:
            self.forged_entries += 1
            log.warning("ignoring forged or malformed state entry %s/%s: %s", namespace, key, exc)
            self._verified.pop((namespace, key), None)
            return None
        self._verified[(namespace, key)] = (raw, payload)
        return payload

    def entries(self, namespace: str) -> list[Entry]:
        """Every verified entry of ``namespace``, from live peers only."""
        alive = set(self.peers())
        out = []
        for key, raw in list(self._map(namespace).items()):
            payload = self._read(namespace, key, raw)
            if payload is None or payload["owner"] not in alive:
                continue
            out.append(Entry(namespace, payload["owner"], payload["name"], payload["value"],
                             float(payload.get("ts", 0.0))))
        return out

    def get(self, namespace: str, owner: str, name: str) -> Any | None:
        raw = self._map(namespace).get(f"{owner}/{name}")
        if raw is None:
            return None
        payload = self._read(namespace, f"{owner}/{name}", raw)
        return None if payload is None else payload["value"]

    def refresh(self) -> set[str]:
        """Note which peers heartbeat and drop the ones that stopped; returns the ids dropped."""
        now_mono, now_wall = time.monotonic(), time.time()
        # After a pause of our own (a blocking notebook cell, a stopped debugger) the silence we saw is
        # ours, not theirs: start counting afresh rather than dropping every peer at once.
        paused = now_mono - self._last_refresh > self.peer_timeout / 2
        self._last_refresh = now_mono
        registry = self._map(REGISTRY)
        dropped: set[str] = set()
        for key, raw in list(registry.items()):
            if key == self.identity.peer_id:
                continue
            payload = self._read(REGISTRY, key, raw)
            if payload is None:
                continue
            seq = int(payload.get("seq", 0))
            seen = self._heard.get(key)
            if seen is None or seen[0] != seq or paused:
                self._heard[key] = (seq, now_mono)
                seen = self._heard[key]
            stale = now_wall - float(payload.get("ts", 0.0)) > STALE_AFTER_S
            if stale or now_mono - seen[1] > self.peer_timeout:
                dropped.add(key)
        for key in dropped:
            # Anyone may delete an expired registry entry: an owner that is alive after all simply
            # writes it again with its next heartbeat. Deleting keeps the document from growing forever.
            if key in registry:
                del registry[key]
            self._heard.pop(key, None)
        return dropped

    def peers(self) -> dict[str, dict]:
        """Verified registry records of the live peers (this one included), by peer id."""
        now_mono, now_wall = time.monotonic(), time.time()
        trust_silence = now_mono - self._last_refresh <= self.peer_timeout / 2
        out = {}
        for key, raw in list(self._map(REGISTRY).items()):
            payload = self._read(REGISTRY, key, raw)
            if payload is None:
                continue
            if key != self.identity.peer_id:
                seen = self._heard.get(key)
                if now_wall - float(payload.get("ts", 0.0)) > STALE_AFTER_S:
                    continue
                if trust_silence and seen is not None and seen[0] == payload.get("seq") and \
                        now_mono - seen[1] > self.peer_timeout:
                    continue
            out[key] = payload
        return out

    # -- watching ------------------------------------------------------------------------------
    def watch(self, callback: Callable[[set[str]], None]) -> Callable[[], None]:
        """Call ``callback(namespaces)`` after every change to the document; returns an unsubscriber."""
        if self._subscription is None:
            self._subscription = self.doc.observe(self._on_transaction)
        self._watchers.append(callback)

        def unsubscribe() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return unsubscribe

    def _on_transaction(self, event: Any) -> None:
        # The document is locked while its observers run: watchers are called right after, on the
        # loop, once per burst of transactions.
        if self._notify_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._notify_pending = True
        loop.call_soon(self._notify)

    def _notify(self) -> None:
        self._notify_pending = False
        for cb in list(self._watchers):
            try:
                cb(set(self.doc.keys()))
            except Exception:  # a watcher's bug must not break replication
                log.exception("state watcher failed")
