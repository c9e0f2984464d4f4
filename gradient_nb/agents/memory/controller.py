"""The memory controller (SEDM's self-scheduling part): utility, retrieval, merging, decay, eviction.

Every admitted entry gets a slot with an **empirical utility**: a Beta posterior over "the task
succeeded when this entry was in the prompt", its prior tilted by the entry's admission gain
(``(wins + 1 + gain) / (uses + 2)``), updated by :meth:`Memory.feedback` each time a retrieved entry's
task ends. Counts decay by ``decay`` at each :meth:`consolidate`, so an entry that stopped helping
loses its standing and an old success does not count forever.

**Retrieval** embeds the query with the offline MiniLM embedder (the beacons' ``embed``), compares it
with each item's key (the task it was distilled from: task against task) and ranks entries by
``similarity × utility``; only entries at least ``min_similarity`` close are offered, and only to
tasks as close to the entry as the tasks its admission replay covered (its ``radius``: evidence that
an item helps on near neighbours says nothing about far ones; less ``radius_slack``), at most ``k``
(default 1): a short prompt of entries that earned their place, where a store that keeps everything
offers its top-k whatever they are.

**Consolidation** (:meth:`consolidate`, also run by :meth:`add` when the store is over budget): decay;
merge near-duplicates (same family, text embeddings at least ``merge_similarity`` close): the entry of lower
utility is folded into the other, which inherits its counts and records it in ``merged``; then evict
by ``utility × recency`` (``decay ** steps since last retrieval``) until at most ``budget`` entries remain.
The evicted ids are returned, so the owner can withdraw what it had published.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .records import Entry


def _default_embed(text: str) -> np.ndarray:
    from ..beacon import embed

    return embed(text)


@dataclass
class Slot:
    entry: Entry
    vector: np.ndarray  # of the item's retrieval key (its origin task, or its text)
    content: np.ndarray  # of its text: what near-duplicates are judged by
    radius: float = 0.0  # the least similarity between its key and the tasks its admission replayed
    uses: float = 0.0
    wins: float = 0.0
    last: int = 0  # the retrieval step it was last offered (or added) at
    retrieved: int = 0
    merged: list[str] = field(default_factory=list)

    @property
    def utility(self) -> float:
        return (self.wins + 1.0 + max(0.0, self.entry.gain)) / (self.uses + 2.0)


class Memory:
    def __init__(self, *, budget: int = 64, k: int = 1, min_similarity: float = 0.5,
                 merge_similarity: float = 0.92, decay: float = 0.95, radius_slack: float = 0.05,
                 embed: Callable[[str], np.ndarray] | None = None) -> None:
        if budget < 1 or k < 1 or not 0 < decay <= 1:
            raise ValueError("budget and k are at least 1, decay in (0, 1]")
        self.budget, self.k = budget, k
        self.min_similarity, self.merge_similarity, self.decay = min_similarity, merge_similarity, decay
        self.radius_slack = radius_slack
        self.embed = embed or _default_embed
        self.slots: dict[str, Slot] = {}
        self.step = 0
        self.evicted: list[str] = []

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self.slots or any(entry_id in s.merged for s in self.slots.values())

    def entries(self) -> list[Entry]:
        return [s.entry for s in self.slots.values()]

    def add(self, entry: Entry) -> list[str]:
        """Keep ``entry`` (a verified one); returns the ids that consolidation evicted to stay in budget."""
        if entry.id in self:
            return []
        key = self.embed(entry.item.key)
        radius = min(float(np.dot(key, self.embed(t["task"]))) for t in entry.replay.tasks)
        self.slots[entry.id] = Slot(entry, key, self.embed(entry.item.text), radius, last=self.step)
        self._merge()
        return self._evict() if len(self.slots) > self.budget else []

    def retrieve(self, query: str, *, k: int | None = None, family: str | None = None) -> list[Entry]:
        """The best ``k`` entries for ``query`` by similarity × utility, only those ``min_similarity`` close."""
        self.step += 1
        if not self.slots:
            return []
        q = self.embed(query)
        ranked = []
        for s in self.slots.values():
            if family is not None and s.entry.item.family != family:
                continue
            sim = float(np.dot(q, s.vector))
            if sim >= max(self.min_similarity, s.radius - self.radius_slack):
                ranked.append((sim * s.utility, s))
        ranked.sort(key=lambda x: -x[0])
        chosen = [s for _, s in ranked[:k or self.k]]
        for s in chosen:
            s.last, s.retrieved = self.step, s.retrieved + 1
        return [s.entry for s in chosen]

    def feedback(self, entry_ids: list[str], success: bool) -> None:
        """The task the entries were retrieved for ended: count it for each."""
        for i in entry_ids:
            s = self.slots.get(i)
            if s is not None:
                s.uses += 1
                s.wins += 1.0 if success else 0.0

    def utility(self, entry_id: str) -> float:
        return self.slots[entry_id].utility

    def consolidate(self) -> list[str]:
        """Decay, merge near-duplicates, evict down to the budget; returns the ids that left."""
        for s in self.slots.values():
            s.uses *= self.decay
            s.wins *= self.decay
        gone = self._merge()
        return gone + self._evict()

    def _merge(self) -> list[str]:
        gone = []
        ids = sorted(self.slots, key=lambda i: -self.slots[i].utility)
        for i, a in enumerate(ids):
            if a not in self.slots:
                continue
            for b in ids[i + 1:]:
                sa, sb = self.slots.get(a), self.slots.get(b)
                if sa is None or sb is None or sa.entry.item.family != sb.entry.item.family:
                    continue
                if float(np.dot(sa.content, sb.content)) >= self.merge_similarity:
                    sa.uses += sb.uses
                    sa.wins += sb.wins
                    sa.retrieved += sb.retrieved
                    sa.last = max(sa.last, sb.last)
                    sa.merged += [b, *sb.merged]
                    del self.slots[b]
                    gone.append(b)
        return gone

    def _evict(self) -> list[str]:
        gone = []
        while len(self.slots) > self.budget:
            worst = min(self.slots, key=lambda i: self.slots[i].utility * self.decay ** (self.step - self.slots[i].last))
            del self.slots[worst]
            gone.append(worst)
        self.evicted += gone
        return gone
