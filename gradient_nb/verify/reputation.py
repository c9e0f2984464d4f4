"""Verdicts in the mesh state, and the reputation of each peer derived from them.

A verifier publishes, per peer it checked, one entry in the namespace ``verify``: its counts of
passes and failures for that peer and its latest verdicts. The state signs each entry with the
verifier's key, so a verdict's author is known and nobody can forge one in another's name. A peer
is *failed* when this peer's own verifier failed it (we trust our own recomputation) or when at
least ``quorum`` distinct other verifiers did: one lying verifier cannot evict an honest peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..mesh.peer import Mesh

NAMESPACE = "verify"
KEEP_LAST = 8
DEFAULT_QUORUM = 2


@dataclass
class Reputation:
    peer: str
    passes: int = 0
    failures: int = 0
    failed_by: set[str] = field(default_factory=set)  # verifiers that failed it
    last: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> float:
        """Laplace-smoothed share of passed verifications (0.5 for a peer never verified)."""
        return (self.passes + 1) / (self.passes + self.failures + 2)

    def failed(self, me: str | None = None, quorum: int = DEFAULT_QUORUM) -> bool:
        return (me is not None and me in self.failed_by) or len(self.failed_by - {me}) >= quorum


def _entry_name(peer: str) -> str:
    return f"peer-{peer}"


def record_verdict(mesh: Mesh, summary: dict[str, Any]) -> None:
    """Add a verdict (``Verdict.summary()``) to this verifier's signed entry for the verified peer."""
    peer = str(summary["peer"])
    name = _entry_name(peer)
    cur = mesh.state.get(NAMESPACE, mesh.id, name) or {}
    ok = summary.get("status") == "pass"
    value = {"peer": peer, "pass": int(cur.get("pass", 0)) + ok, "fail": int(cur.get("fail", 0)) + (not ok),
             "last": [*list(cur.get("last", []))[-(KEEP_LAST - 1):], summary]}
    mesh.state.put(NAMESPACE, name, value)


def reputations(mesh: Mesh) -> dict[str, Reputation]:
    """Every verified peer's reputation, from the verdict entries of live verifiers."""
    out: dict[str, Reputation] = {}
    for e in mesh.state.entries(NAMESPACE):
        v = e.value
        if not isinstance(v, dict) or not isinstance(v.get("peer"), str) or e.name != _entry_name(v["peer"]):
            continue
        try:
            passes, fails = int(v.get("pass", 0)), int(v.get("fail", 0))
        except (TypeError, ValueError):
            continue
        r = out.setdefault(v["peer"], Reputation(v["peer"]))
        r.passes += max(passes, 0)
        r.failures += max(fails, 0)
        if fails > 0:
            r.failed_by.add(e.owner)
        last = v.get("last")
        if isinstance(last, list):
            r.last += [x for x in last if isinstance(x, dict)]
    return out


def failed_peers(mesh: Mesh, quorum: int = DEFAULT_QUORUM) -> set[str]:
    return {p for p, r in reputations(mesh).items() if r.failed(mesh.id, quorum)}
