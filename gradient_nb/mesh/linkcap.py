"""How many links a peer keeps open: a cap, and idle eviction. A peer re-links on demand.

Every open link costs both ends memory (an SCTP association or a TLS socket, an RPC endpoint, a
state-sync session) and keepalive pings, so a peer that linked to everyone it ever called would hold
O(n) links in a large mesh. The policy:

- a link is *used* when it is made and whenever a call or stream starts over it, either way;
- a link with calls in flight either way is *busy* and never evicted;
- beyond the ``keep`` most recently used links (the few that give the state and signaling paths
  around the rendezvous), a link idle for ``idle_s`` is closed, and while more than ``max_links`` are
  open the least recently used idle ones are closed at once.

Closing is a clean close, not a failure, so neither side re-links until it has something to send:
``Mesh.call`` links again on demand. The policy only decides; ``mesh/peer.py`` closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

MAX_LINKS = 32
IDLE_S = 120.0


class LinkCap:
    def __init__(self, max_links: int = MAX_LINKS, idle_s: float = IDLE_S) -> None:
        if max_links < 1 or idle_s <= 0:
            raise ValueError("max_links must be >= 1 and idle_s > 0")
        self.max_links, self.idle_s = max_links, idle_s
        self._used: dict[str, float] = {}
        self.evicted = 0

    def touch(self, peer_id: str, at: float | None = None) -> None:
        """The link to ``peer_id`` was made or used just now (or at monotonic time ``at``)."""
        t = time.monotonic() if at is None else at
        self._used[peer_id] = max(t, self._used.get(peer_id, t))

    def forget(self, peer_id: str) -> None:
        self._used.pop(peer_id, None)

    def to_evict(self, linked: Iterable[str], *, busy: Callable[[str], bool], keep: int = 0) -> list[str]:
        """The links to close now, least recently used first."""
        now = time.monotonic()
        linked = list(linked)
        for p in [p for p in self._used if p not in linked]:
            del self._used[p]  # links closed for other reasons
        idle = sorted((p for p in linked if not busy(p)), key=lambda p: self._used.setdefault(p, now))
        recent = set(sorted(linked, key=lambda p: self._used.get(p, now), reverse=True)[:keep])
        out: list[str] = []
        for p in idle:
            if p in recent:
                continue
            over_cap = len(linked) - len(out) > self.max_links
            if over_cap or now - self._used[p] > self.idle_s:
                out.append(p)
        self.evicted += len(out)
        return out
