"""A Kademlia DHT over the mesh RPC, for provider records ("peer X offers key K").

Standard Kademlia (Maymounkov & Mazières), with the parts a provider directory needs:

- Node ids are the 160-bit peer ids; a key's id is ``sha256(key)[:20]``. Distance is XOR.
- The routing table keeps one bucket of at most ``k`` contacts per distance bit, least recently seen
  first. A newcomer to a full bucket waits in a replacement cache while the bucket's oldest contact is
  pinged: a live old contact stays (long-lived peers are the reliable ones), a dead one is replaced.
  Contacts are learned from every peer that calls us or answers us.
- Lookups are iterative and parallel: ``alpha`` queries in flight toward the ``k`` closest nodes seen so
  far, until the ``k`` closest have all answered or failed.
- ``provide`` stores a provider record, signed by the provider (:func:`~.identity.sign_record`), at the
  ``k`` nodes closest to the key and republishes it while the DHT runs. A record carries its expiry
  time: nodes refuse bad signatures and expired or too-long-lived records and drop records as they
  expire, so the records of a departed provider (who no longer republishes) disappear on their own.
  Readers verify every record again: storing nodes are not trusted either.

The RPCs are ``dht.ping``, ``dht.find_node``, ``dht.find_providers`` and ``dht.add_provider``, carried as
plain msgpack headers by whatever implements :class:`DhtNetwork` (the mesh's links, or in tests real
:class:`~.rpc.RpcEndpoint` pairs over in-memory transports).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import MeshError, SignatureInvalid
from .identity import Identity, canonical_bytes, is_peer_id, sign_record, verify_record

log = logging.getLogger(__name__)

ID_BITS = 160
MAX_KEY_LEN = 512


class DhtNetwork(Protocol):
    local_id: str

    async def call(self, peer_id: str, method: str, header: dict, timeout: float) -> dict:
        """Call ``method`` on ``peer_id``; raises MeshError (or TimeoutError) on failure."""
        ...

    def serve(self, method: str, handler: Callable[[str, dict], Awaitable[dict]]) -> None:
        """Answer ``method``; ``handler(caller_id, header)`` returns the reply header."""
        ...


def key_id(key: str) -> str:
    """The 160-bit DHT id (40 hex digits) of ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()[:ID_BITS // 4]


def distance(a: str, b: str) -> int:
    return int(a, 16) ^ int(b, 16)


class RoutingTable:
    """Kademlia k-buckets around ``local_id``, with a replacement cache per bucket."""

    def __init__(self, local_id: str, k: int) -> None:
        self.local_id = local_id
        self.k = k
        self._local = int(local_id, 16)
        # Per bucket: peer id -> None, least recently seen first.
        self.buckets: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(ID_BITS)]
        self.replacements: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(ID_BITS)]

    def bucket_index(self, peer_id: str) -> int:
        d = self._local ^ int(peer_id, 16)
        if d == 0:
            raise ValueError("the local id has no bucket")
        return d.bit_length() - 1

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self.buckets[self.bucket_index(peer_id)]

    def peers(self) -> list[str]:
        return [p for b in self.buckets for p in b]

    def touch(self, peer_id: str) -> str | None:
        """Record that ``peer_id`` was seen. Returns the bucket's oldest contact when the bucket is full
        and ``peer_id`` went to the replacement cache: the caller should ping that one."""
        i = self.bucket_index(peer_id)
        bucket = self.buckets[i]
        if peer_id in bucket:
            bucket.move_to_end(peer_id)
            return None
        if len(bucket) < self.k:
            bucket[peer_id] = None
            self.replacements[i].pop(peer_id, None)
            return None
        repl = self.replacements[i]
        repl[peer_id] = None
        repl.move_to_end(peer_id)
        while len(repl) > self.k:
            repl.popitem(last=False)
        return next(iter(bucket))

    def remove(self, peer_id: str) -> None:
        """Drop a contact (it failed or left); the freshest replacement takes its place."""
        i = self.bucket_index(peer_id)
        self.replacements[i].pop(peer_id, None)
        if self.buckets[i].pop(peer_id, 0) is None and self.replacements[i]:
            newcomer, _ = self.replacements[i].popitem(last=True)
            self.buckets[i][newcomer] = None

    def closest(self, target: str, n: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        t = int(target, 16)
        return sorted((p for p in self.peers() if p not in exclude), key=lambda p: int(p, 16) ^ t)[:n]


@dataclass
class DhtStats:
    lookups: int = 0
    rpcs_sent: int = 0
    rpc_failures: int = 0
    records_stored: int = 0
    records_refused: int = 0
    records_rejected_on_read: int = 0
    records_expired: int = 0
    republished: int = 0


@dataclass
class _Provided:
    value: dict[str, Any]
    ttl: float
    next_publish: float  # loop time


class Dht:
    """One node of the DHT. Handlers are registered on ``network`` at construction; ``start()`` runs
    the maintenance (bootstrap lookup, republishing, expiry, refresh) and ``stop()`` ends it."""

    def __init__(self, network: DhtNetwork, identity: Identity, *, k: int = 20, alpha: int = 3,
                 record_ttl: float = 600.0, republish_interval: float | None = None, rpc_timeout: float = 5.0,
                 refresh_interval: float = 300.0, max_ttl: float = 86400.0, max_record_bytes: int = 8192,
                 max_keys: int = 100_000, max_providers_per_key: int = 256,
                 max_keys_per_provider: int = 1024) -> None:
        if network.local_id != identity.peer_id:
            raise ValueError("the network's local id is not the identity's peer id")
        if k < 1 or alpha < 1 or record_ttl <= 0:
            raise ValueError("k and alpha must be >= 1, record_ttl > 0")
        self.network, self.identity = network, identity
        self.local_id = identity.peer_id
        self.k, self.alpha = k, alpha
        self.record_ttl = record_ttl
        self.republish_interval = republish_interval
        self.rpc_timeout = rpc_timeout
        self.refresh_interval = refresh_interval
        self.max_ttl = max_ttl
        self.max_record_bytes = max_record_bytes
        self.max_keys, self.max_providers_per_key = max_keys, max_providers_per_key
        # One peer cannot fill a node's store: it may provide at most this many keys here.
        self.max_keys_per_provider = max_keys_per_provider
        self._per_provider: Counter[str] = Counter()
        self.last_lookup_hops = 0  # query rounds the last lookup needed to reach its answer
        self.stats = DhtStats()
        self.table = RoutingTable(self.local_id, k)
        # key id -> provider id -> (signed record, payload)
        self._store: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {}
        self._provided: dict[str, _Provided] = {}
        self._tasks: set[asyncio.Task] = set()
        self._pinging: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._running = False
        self._stopped = False
        self._needs_bootstrap = True
        network.serve("dht.ping", self._on_ping)
        network.serve("dht.find_node", self._on_find_node)
        network.serve("dht.find_providers", self._on_find_providers)
        network.serve("dht.add_provider", self._on_add_provider)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._running or self._stopped:
            return
        self._running = True
        self._wake = asyncio.Event()
        self._spawn(self._maintain(), "dht-maintain")

    async def stop(self) -> None:
        """Stop republishing and maintenance; this node stops answering DHT calls."""
        self._running = False
        self._stopped = True
        self._provided.clear()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("DHT task %s failed", task.get_name(), exc_info=task.exception())

    # -- routing table ---------------------------------------------------------------------------
    def add_contact(self, peer_id: str) -> None:
        """Learn a peer (bootstrap, a new link, a peer that called or answered us)."""
        if not is_peer_id(peer_id) or peer_id == self.local_id:
            return
        was_empty = len(self.table) == 0
        oldest = self.table.touch(peer_id)
        if was_empty and len(self.table) and self._wake is not None:
            self._needs_bootstrap = True
            self._wake.set()
        if oldest is not None and self._running and oldest not in self._pinging:
            self._pinging.add(oldest)
            self._spawn(self._check_oldest(oldest), f"dht-ping-{oldest[:8]}")

    def remove_contact(self, peer_id: str) -> None:
        if is_peer_id(peer_id) and peer_id != self.local_id:
            self.table.remove(peer_id)

    def routing_table_size(self) -> int:
        return len(self.table)

    async def _check_oldest(self, peer_id: str) -> None:
        try:
            if await self.ping(peer_id):
                self.table.touch(peer_id)  # alive: it stays, newest seen
            # a dead one was removed by ping(), which promotes a replacement
        finally:
            self._pinging.discard(peer_id)

    async def ping(self, peer_id: str) -> bool:
        """Whether ``peer_id`` answers a DHT ping (a failure removes it from the routing table)."""
        reply = await self._rpc(peer_id, "dht.ping", {}, self.rpc_timeout)
        return reply is not None and reply.get("id") == peer_id

    async def _rpc(self, peer_id: str, method: str, header: dict, timeout: float) -> dict | None:
        """A DHT call; None (and the peer dropped from the table) when it fails."""
        self.stats.rpcs_sent += 1
        try:
            reply = await self.network.call(peer_id, method, header, timeout)
            if not isinstance(reply, dict):
                raise MeshError("malformed DHT reply")
        except Exception as exc:  # whatever went wrong, that peer did not answer usefully
            self.stats.rpc_failures += 1
            log.debug("DHT %s to %s failed: %s", method, peer_id[:8], exc)
            self.remove_contact(peer_id)
            return None
        self.add_contact(peer_id)
        return reply

    # -- RPC handlers ----------------------------------------------------------------------------
    def _heard(self, caller_id: str) -> None:
        if self._stopped:
            raise MeshError("this DHT node has stopped")
        self.add_contact(caller_id)

    async def _on_ping(self, caller_id: str, header: dict) -> dict:
        self._heard(caller_id)
        return {"id": self.local_id}

    def _nodes_for(self, target: Any, caller_id: str) -> list[str]:
        if not is_peer_id(target):
            raise ValueError("target must be a 40-hex-digit id")
        return self.table.closest(target, self.k, exclude={caller_id})

    async def _on_find_node(self, caller_id: str, header: dict) -> dict:
        self._heard(caller_id)
        return {"nodes": self._nodes_for(header.get("target"), caller_id)}

    async def _on_find_providers(self, caller_id: str, header: dict) -> dict:
        self._heard(caller_id)
        kid = header.get("key")
        nodes = self._nodes_for(kid, caller_id)
        records = [rec for rec, _ in self._live_records(kid)][:self.max_providers_per_key]
        return {"nodes": nodes, "records": records}

    async def _on_add_provider(self, caller_id: str, header: dict) -> dict:
        self._heard(caller_id)
        try:
            self._accept(header.get("record"))
        except (SignatureInvalid, ValueError) as exc:
            self.stats.records_refused += 1
            log.info("refused a provider record from %s: %s", caller_id[:8], exc)
            return {"stored": False, "reason": str(exc)[:200]}
        return {"stored": True}

    # -- records -----------------------------------------------------------------------------------
    def _check_record(self, record: Any, *, key: str | None = None) -> dict[str, Any]:
        """The payload of a valid, unexpired provider record; raises SignatureInvalid or ValueError."""
        if not isinstance(record, dict):
            raise ValueError("a provider record is a map")
        payload = verify_record(record)
        rkey, provider = payload.get("key"), payload.get("peer_id")
        expires, value = payload.get("expires"), payload.get("value")
        if not isinstance(rkey, str) or not rkey or len(rkey) > MAX_KEY_LEN:
            raise ValueError("bad record key")
        if key is not None and rkey != key:
            raise ValueError("record for another key")
        if not is_peer_id(provider):
            raise ValueError("the record names no provider")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool) or not isinstance(value, dict):
            raise ValueError("the record needs a numeric expiry and a map value")
        now = time.time()
        if expires <= now:
            raise ValueError("the record has expired")
        if expires > now + self.max_ttl:
            raise ValueError(f"the record lives longer than {self.max_ttl:g} s")
        if len(canonical_bytes(payload)) > self.max_record_bytes:
            raise ValueError(f"the record is larger than {self.max_record_bytes} bytes")
        return payload

    def _accept(self, record: Any) -> None:
        payload = self._check_record(record)
        kid = key_id(payload["key"])
        providers = self._store.get(kid)
        if providers is None:
            if len(self._store) >= self.max_keys:
                self._expire()
                if len(self._store) >= self.max_keys:
                    raise ValueError("this node stores no more keys")
            providers = self._store[kid] = {}
        old = providers.get(payload["peer_id"])
        if old is not None and old[1]["expires"] >= payload["expires"]:
            return  # we hold a fresher (or the same) record already
        if old is None and len(providers) >= self.max_providers_per_key:
            raise ValueError("too many providers for this key")
        if old is None and self._per_provider[payload["peer_id"]] >= self.max_keys_per_provider:
            raise ValueError(f"this node stores at most {self.max_keys_per_provider} keys per provider")
        if old is None:
            self._per_provider[payload["peer_id"]] += 1
        providers[payload["peer_id"]] = (record, payload)
        self.stats.records_stored += 1

    def _live_records(self, kid: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        providers = self._store.get(kid) if isinstance(kid, str) else None
        if not providers:
            return []
        now = time.time()
        for pid in [pid for pid, (_, p) in providers.items() if p["expires"] <= now]:
            self._drop(providers, pid)  # drop expired records as soon as anyone asks, not only at the next sweep
        if not providers:
            del self._store[kid]
        return list(providers.values())

    def _expire(self) -> None:
        now = time.time()
        for kid in list(self._store):
            providers = self._store[kid]
            for pid in [pid for pid, (_, p) in providers.items() if p["expires"] <= now]:
                self._drop(providers, pid)
            if not providers:
                del self._store[kid]

    def _drop(self, providers: dict[str, Any], pid: str) -> None:
        del providers[pid]
        self.stats.records_expired += 1
        self._per_provider[pid] -= 1
        if self._per_provider[pid] <= 0:
            del self._per_provider[pid]

    def stored_records(self) -> int:
        """How many unexpired provider records this node holds for others (and itself)."""
        now = time.time()
        return sum(1 for ps in self._store.values() for _, p in ps.values() if p["expires"] > now)

    # -- lookups -----------------------------------------------------------------------------------
    async def _lookup(self, target: str, *, providers_key: str | None = None,
                      timeout: float = 30.0) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Iterative lookup: the ``k`` closest live nodes to ``target`` (self excluded) and, for a providers
        lookup, the verified records found on the way (provider id -> payload)."""
        self.stats.lookups += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        t = int(target, 16)
        seen: set[str] = set(self.table.closest(target, self.k))
        depth = dict.fromkeys(seen, 1)  # query round in which we could first ask each node
        hops = 0
        queried: set[str] = set()
        failed: set[str] = set()
        found: dict[str, dict[str, Any]] = {}
        in_flight: dict[asyncio.Task, str] = {}
        method = "dht.find_providers" if providers_key is not None else "dht.find_node"
        header = {"key": target} if providers_key is not None else {"target": target}

        def by_distance(peers: set[str]) -> list[str]:
            return sorted(peers, key=lambda p: int(p, 16) ^ t)

        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                frontier = by_distance(seen - failed)[:self.k]
                for peer in frontier:
                    if len(in_flight) >= self.alpha:
                        break
                    if peer not in queried:
                        queried.add(peer)
                        task = loop.create_task(self._rpc(peer, method, header, min(self.rpc_timeout, remaining)))
                        in_flight[task] = peer
                if not in_flight:
                    break
                done, _ = await asyncio.wait(in_flight, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    peer = in_flight.pop(task)
                    reply = task.result()
                    if reply is None:
                        failed.add(peer)
                        continue
                    nodes = reply.get("nodes")
                    if isinstance(nodes, list):
                        for n in nodes[:2 * self.k]:
                            if is_peer_id(n) and n != self.local_id:
                                seen.add(n)
                                depth.setdefault(n, depth.get(peer, 1) + 1)
                    if providers_key is not None:
                        before = len(found)
                        self._collect(reply.get("records"), providers_key, found)
                        if len(found) > before and not hops:
                            hops = depth.get(peer, 1)
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
        closest = by_distance(queried - failed - set(p for p in in_flight.values()))[:self.k]
        # Hops: the round that reached the first provider record, or (node lookups) the closest node.
        self.last_lookup_hops = hops or (depth.get(closest[0], 1) if closest else 0)
        return closest, found

    def _collect(self, records: Any, key: str, found: dict[str, dict[str, Any]]) -> None:
        if not isinstance(records, list):
            return
        for rec in records[:self.max_providers_per_key]:
            try:
                payload = self._check_record(rec, key=key)
            except (SignatureInvalid, ValueError, TypeError) as exc:
                self.stats.records_rejected_on_read += 1
                log.info("dropped an invalid provider record for %r: %s", key, exc)
                continue
            old = found.get(payload["peer_id"])
            if old is None or old["expires"] < payload["expires"]:
                found[payload["peer_id"]] = payload

    async def find_node(self, target_id: str) -> list[str]:
        """The ids of the ``k`` live nodes closest to ``target_id`` (this node excluded)."""
        if not is_peer_id(target_id):
            raise ValueError("target_id must be 40 hex digits")
        nodes, _ = await self._lookup(target_id)
        return nodes

    async def bootstrap(self) -> int:
        """Look up our own id, which fills the routing table from the contacts we have; returns its size."""
        self._needs_bootstrap = False
        await self._lookup(self.local_id)
        return len(self.table)

    async def find_providers(self, key: str, *, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Verified, unexpired provider records for ``key``: ``{"key", "provider", "value", "expires"}``.
        Returns what was found when ``timeout`` runs out rather than failing."""
        found: dict[str, dict[str, Any]] = {}
        self._collect([rec for rec, _ in self._live_records(key_id(key))], key, found)
        _, remote = await self._lookup(key_id(key), providers_key=key, timeout=timeout)
        for pid, payload in remote.items():
            if pid not in found or found[pid]["expires"] < payload["expires"]:
                found[pid] = payload
        return [{"key": p["key"], "provider": p["peer_id"], "value": p["value"], "expires": p["expires"]}
                for _, p in sorted(found.items())]

    async def provide(self, key: str, value: dict | None = None, ttl: float | None = None) -> int:
        """Announce that this peer provides ``key``: store a signed record at the ``k`` closest nodes (and
        here). Returns how many nodes stored it. The record is republished until :meth:`stop` or
        :meth:`unprovide`."""
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
            raise ValueError(f"keys are non-empty strings of at most {MAX_KEY_LEN} chars")
        ttl = self.record_ttl if ttl is None else float(ttl)
        if not 0 < ttl <= self.max_ttl:
            raise ValueError(f"ttl must be in (0, {self.max_ttl:g}]")
        value = dict(value or {})
        # Fail here, not at every republish, for a value that cannot be signed or is too large.
        size = len(canonical_bytes({"peer_id": self.local_id, "key": key, "value": value, "expires": time.time()}))
        if size > self.max_record_bytes:
            raise ValueError(f"the record would be {size} bytes, more than {self.max_record_bytes}")
        entry = _Provided(value, ttl, 0.0)
        self._provided[key] = entry
        stored = await self._publish(key, entry)
        if self._wake is not None:
            self._wake.set()  # the republish schedule changed
        return stored

    def unprovide(self, key: str) -> None:
        """Stop republishing ``key``; the stored records expire on their own."""
        self._provided.pop(key, None)
        kid = key_id(key)
        if kid in self._store:
            self._store[kid].pop(self.local_id, None)

    def _republish_every(self, entry: _Provided) -> float:
        return self.republish_interval if self.republish_interval is not None else entry.ttl / 2

    async def _publish(self, key: str, entry: _Provided) -> int:
        loop = asyncio.get_running_loop()
        entry.next_publish = loop.time() + self._republish_every(entry)
        payload = {"peer_id": self.local_id, "key": key, "value": entry.value, "expires": time.time() + entry.ttl}
        record = sign_record(self.identity, payload)
        if len(canonical_bytes(payload)) > self.max_record_bytes:
            raise ValueError(f"the record is larger than {self.max_record_bytes} bytes")
        self._accept(record)
        nodes, _ = await self._lookup(key_id(key), timeout=max(self.rpc_timeout * 3, 10.0))
        replies = await asyncio.gather(*(self._rpc(n, "dht.add_provider", {"record": record}, self.rpc_timeout)
                                         for n in nodes))
        return 1 + sum(1 for r in replies if r is not None and r.get("stored") is True)

    # -- maintenance -------------------------------------------------------------------------------
    async def _maintain(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self.refresh_interval
        while True:
            failed = False
            try:
                next_refresh = await self._maintain_once(next_refresh)
            except Exception:
                # Keep maintaining (and republishing) whatever one round ran into.
                log.exception("DHT maintenance round failed")
                failed = True
            wake_at = min([next_refresh, *(e.next_publish for e in self._provided.values())])
            # Sweep expired records at least every few seconds even with nothing to republish; after a
            # failed round, pause so that a persistent fault does not spin.
            delay = max(1.0 if failed else 0.0, min(wake_at - loop.time(), 5.0))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _maintain_once(self, next_refresh: float) -> float:
        loop = asyncio.get_running_loop()
        if self._needs_bootstrap and len(self.table):
            await self.bootstrap()
        if loop.time() >= next_refresh:
            next_refresh = loop.time() + self.refresh_interval
            if len(self.table):
                # A random target refreshes a bucket we may never look into otherwise.
                await self._lookup(secrets.token_hex(ID_BITS // 8))
                await self._lookup(self.local_id)
        for key, entry in list(self._provided.items()):
            if entry.next_publish <= loop.time() and self._provided.get(key) is entry:
                try:
                    await self._publish(key, entry)
                    self.stats.republished += 1
                except (MeshError, TimeoutError, ValueError) as exc:
                    entry.next_publish = loop.time() + min(self._republish_every(entry), 5.0)
                    log.warning("republishing %r failed: %s", key, exc)
        self._expire()
        return next_refresh
