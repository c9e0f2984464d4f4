"""Memory shared over the mesh: entries as owner-signed records in the state, announced in the DHT.

- **Publish** (:meth:`SharedMemory.publish`): the admitting peer writes the signed entry into its own
  slot of the mesh state (namespace ``agent-memory``, name = the item's content hash) and announces
  the family's ids in the DHT under ``agent-memory/<family>`` (a provider record signed by it, value
  ``{"ids": [...]}``, newest :data:`MAX_ANNOUNCED` ids). Evicted entries are deleted from its slot (only the
  owner can) and dropped from the announcement.
- **Discover** (:meth:`SharedMemory.discover`): ``find_providers`` for a family gives (provider, ids);
  each record is read from the state under that provider's slot and checked with ``check_entry``
  (signature, signer = the slot's owner, content address, scores). Nothing found is trusted for being
  there: a reader that wants more re-runs the replay (``verify_entry``) before it adds the entry to its
  own :class:`~.controller.Memory`.

Why the DHT and the state both: the state carries the bytes with the owner's signature and replays
them to newcomers; the DHT keeps "who has memory for family F" findable without scanning every
owner's records, which is what keeps per-peer cost bounded as the mesh grows.
"""

from __future__ import annotations

import logging
from typing import Any

from ...mesh.errors import SignatureInvalid
from .records import NAMESPACE, Entry, check_entry

log = logging.getLogger(__name__)

MAX_ANNOUNCED = 100
ANNOUNCE_TTL_S = 600.0


def dht_key(family: str) -> str:
    return f"{NAMESPACE}/{family}"


class SharedMemory:
    """One peer's side of the shared memory over ``mesh`` (anything with ``state``, ``dht`` and ``id``)."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.rejected = 0
        self._mine: dict[str, list[str]] = {}  # family -> ids this peer published, oldest first
        self._family_of: dict[str, str] = {}

    async def publish(self, record: dict[str, Any]) -> Entry:
        """Write an admitted entry (signed by this peer) and announce it; returns the checked entry."""
        entry = check_entry(record, self.mesh.id)
        self.mesh.state.put(NAMESPACE, entry.id, record)
        ids = self._mine.setdefault(entry.item.family, [])
        if entry.id not in ids:
            ids.append(entry.id)
        self._family_of[entry.id] = entry.item.family
        await self._announce(entry.item.family)
        return entry

    async def withdraw(self, entry_ids: list[str]) -> None:
        """Delete evicted entries from this peer's slot and from its announcements."""
        families = set()
        for i in entry_ids:
            fam = self._family_of.pop(i, None)
            if fam is None:
                continue
            self.mesh.state.delete(NAMESPACE, i)
            self._mine[fam].remove(i)
            families.add(fam)
        for fam in families:
            await self._announce(fam)

    async def _announce(self, family: str) -> None:
        ids = self._mine.get(family, [])[-MAX_ANNOUNCED:]
        if ids:
            await self.mesh.dht.provide(dht_key(family), {"ids": ids}, ttl=ANNOUNCE_TTL_S)
        else:
            self.mesh.dht.unprovide(dht_key(family))

    async def discover(self, family: str, *, timeout: float = 10.0) -> list[Entry]:
        """The entries the DHT says exist for ``family``, each read from its owner's slot and checked."""
        out = []
        for found in await self.mesh.dht.find_providers(dht_key(family), timeout=timeout):
            owner, ids = found["provider"], (found.get("value") or {}).get("ids")
            if not isinstance(ids, list):
                continue
            for i in ids[:MAX_ANNOUNCED]:
                if not isinstance(i, str):
                    continue
                rec = self.mesh.state.get(NAMESPACE, owner, i)
                if rec is None:
                    continue  # announced but not (yet, or no longer) in the state this peer sees
                try:
                    out.append(check_entry(rec, owner, name=i))
                except SignatureInvalid as exc:
                    self.rejected += 1
                    log.warning("ignoring memory entry %s of %s: %s", i[:12], owner[:8], exc)
        return out

    def scan(self) -> list[Entry]:
        """Every checked entry in the state this peer sees (no DHT lookup): for listing."""
        out = []
        for e in self.mesh.state.entries(NAMESPACE):
            try:
                out.append(check_entry(e.value, e.owner, name=e.name))
            except SignatureInvalid:
                self.rejected += 1
        return out
