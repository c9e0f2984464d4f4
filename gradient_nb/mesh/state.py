"""Replicated mesh state: signed records that only their owner can write, replace or delete.

**Model.** The state is a set of records keyed by ``(owner, namespace, name)``. A record is the payload
``{"owner", "ns", "name", "seq", "ts", "value"}`` (or ``"del": True`` for a deletion) signed with the
owner's Ed25519 key (:func:`~.identity.sign_record`). Every replica (each peer, and the rendezvous)
checks every record before it keeps it, so a record has exactly one possible writer:

- *Authorship*: the signature verifies and the signer is the record's owner. Anything else (a record
  signed by someone else, a malformed one, one that is not even msgpack) is rejected and counted.
- *Order*: an owner numbers its writes with one strictly increasing ``seq`` (microseconds of its wall
  clock, or the last seq + 1 when that is larger, so it keeps increasing across restarts of a
  persistent identity). A replica keeps, per key, the record with the highest seq; an older record (a
  replay) and a different record with the seq it already holds (equivocation) are rejected and
  counted. A deletion is a signed tombstone with a higher seq: only the owner can delete, and a replay
  of the value it deleted cannot bring it back.
- *Expiry is each reader's own decision*: a peer is live while its registry record keeps changing, as
  seen by the local clock (clock skew between machines does not matter). Entries of peers that are not
  live are hidden from :meth:`Replica.entries`; a replica forgets an owner silent for
  :data:`STALE_AFTER_S`, remembering its highest seq so that re-sent copies stay out. No peer deletes
  anything of another's.
- *Bounds*: a record's size, an owner's record count and bytes, and the number of owners are capped;
  what exceeds them is rejected and counted, so an oversized or flooding writer only fills its own quota.

**Why not one Yjs document.** Before, every peer shared one pycrdt (Yjs) document and the rendezvous
room merged updates blindly. Yjs operations carry no signature: any peer could delete any key (the
registry even invited it for "expired" entries), and re-sending an older signed value made it the
latest write. A Yjs update forwarded by a relay is computed by the relay, so it cannot carry the
owner's signature either. So replicas exchange the owners' signed records themselves.

**Replication** runs over any byte channel (a link's ``state`` channel, the rendezvous websocket), with
msgpack messages of three kinds:

- ``digest`` ``{"d": [[owner, max seq, hash of its (ns, name, seq) set], ...]}``, at the start and every
  ``sync_interval`` seconds (anti-entropy: what a lost message missed is repaired by the next one);
- ``want`` ``{"o": [owner, ...]}``: owners whose records differ from ours; answered with
- ``rec`` ``{"r": [signed record bytes, ...]}`` then ``sent`` {}. A replica that accepts a new record forwards it to its
  other channels at once (flooding; it ends because nothing is accepted twice).

One digest exchange brings two replicas into agreement. The rendezvous runs a :class:`Replica` with no
identity: it writes nothing, verifies everything it relays and serves a newcomer's first sync, and it
can forge no more than a peer can.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from .errors import SignatureInvalid
from .identity import Identity, is_peer_id, sign_record, verify_record

log = logging.getLogger(__name__)

REGISTRY = "peers"
# Records stamped this long ago (by their owner's clock) are dead on sight, and an owner silent this long
# (by the local clock) is forgotten.
STALE_AFTER_S = 120.0
MAX_NAMESPACE_LEN = 64
MAX_NAME_LEN = 200
MAX_RECORD_BYTES = 64 << 10
MAX_RECORDS_PER_OWNER = 1024
MAX_BYTES_PER_OWNER = 1 << 20
MAX_OWNERS = 20_000
MAX_MESSAGE_BYTES = 2 << 20  # a sync message; the rendezvous websocket carries at most 4 MiB
SYNC_INTERVAL = 5.0


class Channel(Protocol):
    """A bidirectional message channel (the shape of a pycrdt ``Channel``)."""

    @property
    def path(self) -> str: ...

    async def send(self, message: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    def __aiter__(self) -> Any: ...


@dataclass(frozen=True)
class Entry:
    namespace: str
    owner: str
    name: str
    value: Any
    ts: float


@dataclass
class _Record:
    seq: int
    payload: dict[str, Any]
    raw: bytes


@dataclass
class _Owner:
    records: dict[tuple[str, str], _Record] = field(default_factory=dict)
    max_seq: int = 0
    digest: int = 0  # XOR of the 64-bit hashes of (ns, name, seq) of every record held
    nbytes: int = 0
    last_new: float = 0.0  # local monotonic time a new record of this owner was accepted


def _key_hash(ns: str, name: str, seq: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{ns}\0{name}\0{seq}".encode(), digest_size=8).digest(), "big")


class Rejected(ValueError):
    """A record this replica does not keep; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Replica:
    """A verifying store of signed records, synced with other replicas over channels.

    ``rejected`` counts refused records by reason: ``forged`` (bad or foreign signature, malformed),
    ``replay`` (older than what is held), ``equivocation`` (another record with a seq already held),
    ``oversized`` (record too large), ``quota`` (owner or replica full), ``junk`` (undecodable messages).
    """

    def __init__(self, *, peer_timeout: float = 10.0, max_record_bytes: int = MAX_RECORD_BYTES,
                 max_records_per_owner: int = MAX_RECORDS_PER_OWNER, max_bytes_per_owner: int = MAX_BYTES_PER_OWNER,
                 max_owners: int = MAX_OWNERS, sync_interval: float = SYNC_INTERVAL) -> None:
        self.peer_timeout = peer_timeout
        self.max_record_bytes, self.max_owners = max_record_bytes, max_owners
        self.max_records_per_owner, self.max_bytes_per_owner = max_records_per_owner, max_bytes_per_owner
        self.sync_interval = sync_interval
        self.rejected: Counter[str] = Counter()
        self.accepted = 0
        self._owners: dict[str, _Owner] = {}
        self._forgotten: dict[str, int] = {}  # owner -> highest seq it had when we forgot it
        self._heard: dict[str, tuple[int, float]] = {}  # owner -> (registry seq, local time it changed)
        self._gone: set[str] = set()  # owners refresh() reported silent (until they write their registry again)
        self._sessions: set[_Session] = set()
        self._watchers: list[Callable[[set[str]], None]] = []
        self._changed: set[str] = set()
        self._notify_pending = False
        self._last_refresh = time.monotonic()

    @property
    def self_id(self) -> str | None:
        return None

    @property
    def forged_entries(self) -> int:
        """Records refused for any reason (forged, replayed, oversized, over quota) and junk messages."""
        return sum(self.rejected.values())

    # -- accepting records ---------------------------------------------------------------------------
    def _check(self, raw: Any) -> tuple[_Record, dict[str, Any], str, str, str]:
        if not isinstance(raw, bytes):
            raise Rejected("forged", "a record is msgpack bytes")
        if len(raw) > self.max_record_bytes:
            raise Rejected("oversized", f"record of {len(raw)} bytes exceeds {self.max_record_bytes}")
        try:
            record = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException) as exc:
            raise Rejected("forged", f"not msgpack: {exc}") from None
        payload = record.get("payload") if isinstance(record, dict) else None
        if not isinstance(payload, dict):
            raise Rejected("forged", "not a signed record")
        owner, ns, name, seq = payload.get("owner"), payload.get("ns"), payload.get("name"), payload.get("seq")
        if not (is_peer_id(owner) and isinstance(ns, str) and 0 < len(ns) <= MAX_NAMESPACE_LEN and "/" not in ns
                and isinstance(name, str) and len(name) <= MAX_NAME_LEN and "/" not in name
                and isinstance(seq, int) and not isinstance(seq, bool) and seq > 0
                and isinstance(payload.get("ts"), (int, float))):
            raise Rejected("forged", "the record lacks a valid owner, namespace, name, seq or ts")
        return _Record(seq, payload, raw), record, owner, ns, name

    def _accept(self, raw: Any) -> bool:
        """Keep ``raw`` when it is a valid record newer than what we hold; True when it was new.
        Raises :class:`Rejected`; an exact duplicate of a held record returns False silently."""
        rec, record, owner, ns, name = self._check(raw)
        o = self._owners.get(owner)
        held = o.records.get((ns, name)) if o is not None else None
        if held is not None:
            if held.seq == rec.seq:
                if held.raw == rec.raw:
                    return False
                raise Rejected("equivocation", f"another record with seq {rec.seq} for {ns}/{name}")
            if held.seq > rec.seq:
                raise Rejected("replay", f"seq {rec.seq} is older than the {held.seq} held for {ns}/{name}")
        if rec.seq <= self._forgotten.get(owner, 0):
            raise Rejected("replay", f"seq {rec.seq} of a forgotten owner")
        try:
            verify_record(record, expect_peer_id=owner)
        except SignatureInvalid as exc:
            raise Rejected("forged", str(exc)) from None
        if o is None:
            if len(self._owners) >= self.max_owners:
                self._forget_silent(force=True)
                if len(self._owners) >= self.max_owners:
                    raise Rejected("quota", "this replica holds the records of as many owners as it may")
            o = self._owners[owner] = _Owner()
        added = len(rec.raw) - (len(held.raw) if held is not None else 0)
        if held is None and len(o.records) >= self.max_records_per_owner:
            raise Rejected("quota", f"owner {owner[:8]} has {len(o.records)} records already")
        if o.nbytes + added > self.max_bytes_per_owner:
            raise Rejected("quota", f"owner {owner[:8]} would hold more than {self.max_bytes_per_owner} bytes")
        if held is not None:
            o.digest ^= _key_hash(ns, name, held.seq)
        o.records[(ns, name)] = rec
        o.digest ^= _key_hash(ns, name, rec.seq)
        o.nbytes += added
        o.max_seq = max(o.max_seq, rec.seq)
        o.last_new = time.monotonic()
        self.accepted += 1
        if ns == REGISTRY:
            self._heard[owner] = (rec.seq, o.last_new)
            self._gone.discard(owner)
        self._changed.add(ns)
        self._schedule_notify()
        return True

    def receive(self, records: list[Any], source: _Session | None = None) -> int:
        """Take records from ``source`` (None: local or from a test); forward the new ones to every
        other channel. Returns how many were new."""
        new = []
        for raw in records:
            try:
                if self._accept(raw):
                    new.append(raw)
            except Rejected as exc:
                self.rejected[exc.reason] += 1
                log.info("rejected a state record%s: %s", f" from {source.path}" if source else "", exc)
        self._forward(new, source)
        return len(new)

    def _forward(self, records: list[bytes], source: _Session | None) -> None:
        if records:
            for s in list(self._sessions):
                if s is not source:
                    s.push(records)

    def export(self) -> list[bytes]:
        """Every record held, as the signed bytes its owner made (for a sync or a snapshot)."""
        return [r.raw for o in self._owners.values() for r in o.records.values()]

    def digest(self) -> list[list[Any]]:
        return [[owner, o.max_seq, o.digest] for owner, o in self._owners.items()]

    def records_of(self, owners: list[str]) -> list[bytes]:
        return [r.raw for owner in owners if (o := self._owners.get(owner)) for r in o.records.values()]

    def size_bytes(self) -> int:
        """Bytes of signed records held (what this replica stores for the mesh)."""
        return sum(o.nbytes for o in self._owners.values())

    # -- reading -------------------------------------------------------------------------------
    def _live_payload(self, owner: str, ns: str, name: str) -> dict[str, Any] | None:
        o = self._owners.get(owner)
        rec = o.records.get((ns, name)) if o is not None else None
        if rec is None or rec.payload.get("del"):
            return None
        return rec.payload

    def get(self, namespace: str, owner: str, name: str) -> Any | None:
        """The value ``owner`` published under ``name`` (None when absent or deleted)."""
        payload = self._live_payload(owner, namespace, name)
        return None if payload is None else payload.get("value")

    def entries(self, namespace: str) -> list[Entry]:
        """Every entry of ``namespace``, from live peers only."""
        alive = set(self.peers())
        out = []
        for owner in alive:
            o = self._owners.get(owner)
            for (ns, name), rec in (o.records.items() if o is not None else ()):
                if ns == namespace and ns != REGISTRY and not rec.payload.get("del"):
                    out.append(Entry(ns, owner, name, rec.payload.get("value"), float(rec.payload["ts"])))
        return out

    def peers(self) -> dict[str, dict]:
        """Registry records of the live peers (this one included), by peer id."""
        now_mono, now_wall = time.monotonic(), time.time()
        # After a pause of our own (a blocking notebook cell, a stopped debugger) the silence we saw is
        # ours, not theirs.
        trust_silence = now_mono - self._last_refresh <= self.peer_timeout / 2
        out = {}
        for owner in list(self._owners):
            payload = self._live_payload(owner, REGISTRY, "")
            if payload is None or not isinstance(payload.get("value"), dict):
                continue
            if owner != self.self_id:
                if now_wall - float(payload["ts"]) > STALE_AFTER_S:
                    continue
                seen = self._heard.get(owner)
                if trust_silence and seen is not None and now_mono - seen[1] > self.peer_timeout:
                    continue
            out[owner] = dict(payload["value"], peer_id=owner, seq=payload["seq"], ts=payload["ts"])
        return out

    def refresh(self) -> set[str]:
        """Note which peers went silent since the last call (returned) and forget long-silent owners."""
        now_mono = time.monotonic()
        paused = now_mono - self._last_refresh > self.peer_timeout / 2
        self._last_refresh = now_mono
        if paused:
            # Our own pause: count their silence afresh from now.
            self._heard = {k: (v[0], now_mono) for k, v in self._heard.items()}
        dropped = {owner for owner, (_, at) in self._heard.items()
                   if owner != self.self_id and owner not in self._gone and now_mono - at > self.peer_timeout}
        self._gone |= dropped
        self._forget_silent()
        return dropped

    def _forget_silent(self, force: bool = False) -> None:
        now = time.monotonic()
        limit = self.peer_timeout if force else STALE_AFTER_S
        for owner, o in list(self._owners.items()):
            if owner != self.self_id and now - o.last_new > limit:
                self._forgotten[owner] = o.max_seq
                del self._owners[owner]
                self._heard.pop(owner, None)
                self._gone.discard(owner)
        while len(self._forgotten) > self.max_owners:
            self._forgotten.pop(next(iter(self._forgotten)))

    # -- syncing -------------------------------------------------------------------------------
    def sync(self, channel: Channel) -> _Session:
        """A session that keeps this replica and the one at the far end of ``channel`` in agreement;
        ``await session.start()`` runs it until the channel ends (like a pycrdt ``Provider``)."""
        return _Session(self, channel)

    # -- watching ------------------------------------------------------------------------------
    def watch(self, callback: Callable[[set[str]], None]) -> Callable[[], None]:
        """Call ``callback(namespaces that changed)`` after changes; returns an unsubscriber."""
        self._watchers.append(callback)

        def unsubscribe() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return unsubscribe

    def _schedule_notify(self) -> None:
        if self._notify_pending or not self._watchers:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._notify_pending = True
        loop.call_soon(self._notify)

    def _notify(self) -> None:
        self._notify_pending = False
        changed, self._changed = self._changed, set()
        for cb in list(self._watchers):
            try:
                cb(changed)
            except Exception:  # a watcher's bug must not break replication
                log.exception("state watcher failed")


class MeshState(Replica):
    """The replicated state of one mesh as one peer sees it, and this peer's own (signed) writes."""

    def __init__(self, identity: Identity, *, peer_timeout: float = 10.0, **limits: Any) -> None:
        super().__init__(peer_timeout=peer_timeout, **limits)
        self.identity = identity
        self._seq = 0

    @property
    def self_id(self) -> str:
        return self.identity.peer_id

    def _write(self, namespace: str, name: str, fields: dict[str, Any]) -> None:
        if not namespace or "/" in namespace or len(namespace) > MAX_NAMESPACE_LEN:
            raise ValueError(f"bad namespace {namespace!r}")
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        payload = {"owner": self.self_id, "ns": namespace, "name": name, "seq": self._seq, "ts": time.time(),
                   **fields}
        raw = msgpack.packb(sign_record(self.identity, payload), use_bin_type=True)
        try:
            self._accept(raw)
        except Rejected as exc:  # our own write over a bound: the caller learns, nobody else sees it
            raise ValueError(f"cannot publish {namespace}/{name}: {exc}") from None
        self._forward([raw], None)

    def put(self, namespace: str, name: str, value: Any) -> None:
        """Publish ``value`` (msgpack-able) under this peer's ``name`` in ``namespace``."""
        if not name or "/" in name or len(name) > MAX_NAME_LEN:
            raise ValueError(f"bad entry name {name!r}")
        self._write(namespace, name, {"value": value})

    def delete(self, namespace: str, name: str) -> None:
        """Withdraw this peer's entry ``name`` (a signed tombstone)."""
        if self._live_payload(self.self_id, namespace, name) is not None:
            self._write(namespace, name, {"del": True})

    def heartbeat(self, record: dict) -> None:
        """Publish this peer's registry record; each call counts as one heartbeat."""
        self._write(REGISTRY, "", {"value": dict(record)})

    def remove_self(self) -> None:
        """Leave the registry (a signed tombstone: others stop listing this peer at once)."""
        if self._live_payload(self.self_id, REGISTRY, "") is not None:
            self._write(REGISTRY, "", {"del": True})


class _Session:
    """Replication with the replica at the far end of one channel (see the module docstring)."""

    def __init__(self, replica: Replica, channel: Channel) -> None:
        self.replica, self.channel = replica, channel
        self.synced = asyncio.Event()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1024)

    @property
    def path(self) -> str:
        return self.channel.path

    def _queue(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a slow far end misses pushes; digests repair them
            self._outbox.put_nowait(message)

    def push(self, records: list[bytes]) -> None:
        batch: list[bytes] = []
        size = 0
        for raw in records:
            if batch and size + len(raw) > MAX_MESSAGE_BYTES // 2:
                self._queue({"t": "rec", "r": batch})
                batch, size = [], 0
            batch.append(raw)
            size += len(raw)
        if batch:
            self._queue({"t": "rec", "r": batch})

    async def _writer(self) -> None:
        while True:
            message = await self._outbox.get()
            await self.channel.send(msgpack.packb(message, use_bin_type=True))

    async def _digests(self) -> None:
        while True:
            self._queue({"t": "digest", "d": self.replica.digest()})
            await asyncio.sleep(self.replica.sync_interval)

    async def start(self) -> None:
        """Run until the channel ends."""
        self.replica._sessions.add(self)
        tasks = [asyncio.ensure_future(self._writer()), asyncio.ensure_future(self._digests())]
        try:
            async for message in self.channel:
                self._on_message(message)
        finally:
            self.replica._sessions.discard(self)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _on_message(self, data: bytes) -> None:
        try:
            if len(data) > MAX_MESSAGE_BYTES:
                raise ValueError(f"a sync message of {len(data)} bytes")
            m = msgpack.unpackb(data, raw=False, strict_map_key=True)
            if not isinstance(m, dict):
                raise ValueError("not a map")
            kind = m.get("t")
            if kind == "rec" and isinstance(m.get("r"), list):
                self.replica.receive(m["r"], self)
            elif kind == "want" and isinstance(m.get("o"), list):
                self.push(self.replica.records_of([o for o in m["o"] if isinstance(o, str)]))
                self._queue({"t": "sent"})
            elif kind == "sent":
                self.synced.set()  # what we asked for after their first digest has arrived
            elif kind == "digest" and isinstance(m.get("d"), list):
                self._on_digest(m["d"])
            else:
                raise ValueError(f"unexpected message {kind!r:.20}")
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            self.replica.rejected["junk"] += 1
            log.info("junk on state channel %s: %s", self.path, exc)

    def _on_digest(self, digest: list[Any]) -> None:
        mine = self.replica._owners
        want = []
        for row in digest:
            if not (isinstance(row, list) and len(row) == 3 and is_peer_id(row[0])):
                raise ValueError("a digest row is [owner, seq, hash]")
            owner, seq, h = row
            o = mine.get(owner)
            if (o is None or (o.max_seq, o.digest) != (seq, h)) and \
                    isinstance(seq, int) and seq > self.replica._forgotten.get(owner, 0):
                want.append(owner)
        for i in range(0, len(want), 1000):
            self._queue({"t": "want", "o": want[i:i + 1000]})
        if not want:
            self.synced.set()
