"""Verdicts in the mesh state, and the reputation of each peer derived from the evidence we can check.

A verifier publishes, per peer it checked, one entry in the namespace ``verify``: its counts of passes
and failures for that peer, as a shard (its committed outputs) and as a verifier's helper (its
recomputations, judged against a local check or a canary whose answer was known), and its latest
verdicts. The state signs each entry with the verifier's key, so a verdict's author is known and
nobody can forge one in another's name.

Peer ids cost nothing, so a quorum of other peers' verdicts is no evidence: twenty fresh identities
"failing" an honest peer would evict it, and twenty more "passing" a cheater would clear it. The
reputation that routing uses therefore counts only verdicts this peer can check or chooses to trust:

- its own (it recomputed the stage itself, or judged the helper that did);
- those of peers on its operator's trust list (``GRADIENT_NB_TRUSTED``, see ``serve.coordinator``);
- in a mesh with a join secret, verdicts that carry an HMAC under that secret: their author holds
  the secret, so it was let in by whoever runs the mesh (a Sybil would need the secret to join at all).

Everything else is kept in the state (a user may look at it) and ignored by :func:`failed_peers`.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..mesh.peer import Mesh
from ..serve.coordinator import trusted_peers

NAMESPACE = "verify"
KEEP_LAST = 8
ROLES = ("shard", "verifier")


@dataclass
class Reputation:
    peer: str
    passes: int = 0
    failures: int = 0
    verifier_passes: int = 0  # its recomputations for verifiers that matched a check of known answer
    verifier_failures: int = 0
    failed_by: set[str] = field(default_factory=set)  # counted verifiers that failed it
    last: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> float:
        """Laplace-smoothed share of passed verifications (0.5 for a peer never verified)."""
        return (self.passes + 1) / (self.passes + self.failures + 2)

    @property
    def verifier_score(self) -> float:
        """The same for its work as a verifier's helper: who to ask first for a recomputation."""
        return (self.verifier_passes + 1) / (self.verifier_passes + self.verifier_failures + 2)

    def failed(self, me: str | None = None) -> bool:
        """Failed by a verifier whose word counts (``me``, its own, counts like any trusted one)."""
        return bool(self.failed_by)


def _entry_name(peer: str) -> str:
    return f"peer-{peer}"


def _canonical(x: Any) -> Any:
    if isinstance(x, dict):
        return [[str(k), _canonical(v)] for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))]
    if isinstance(x, (list, tuple)):
        return [_canonical(v) for v in x]
    return x


def evidence_mac(secret: str, owner: str, name: str, value: dict[str, Any]) -> bytes:
    """HMAC under the mesh's join secret over a verdict entry (its ``mac`` field left out)."""
    body = {k: v for k, v in value.items() if k != "mac"}
    data = msgpack.packb([owner, name, _canonical(body)], use_bin_type=True)
    key = hashlib.sha256(b"gradient-nb/verdict|" + secret.encode()).digest()
    return hmac.new(key, data, hashlib.sha256).digest()


def record_verdict(mesh: Mesh, summary: dict[str, Any], role: str = "shard") -> None:
    """Add a verdict (``Verdict.summary()``) to this verifier's signed entry for the verified peer.

    ``role``: "shard" (its committed outputs were checked) or "verifier" (its recomputation for a
    verifier was checked against an answer known here)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    peer = str(summary["peer"])
    name = _entry_name(peer)
    cur = mesh.state.get(NAMESPACE, mesh.id, name) or {}
    ok = summary.get("status") == "pass"
    p, f = ("pass", "fail") if role == "shard" else ("vpass", "vfail")
    value = {"peer": peer, "pass": int(cur.get("pass", 0)), "fail": int(cur.get("fail", 0)),
             "vpass": int(cur.get("vpass", 0)), "vfail": int(cur.get("vfail", 0)),
             "last": [*list(cur.get("last", []))[-(KEEP_LAST - 1):], {**summary, "role": role}]}
    value[p] += ok
    value[f] += not ok
    secret = getattr(mesh, "secret", None)
    if secret:
        value["mac"] = evidence_mac(secret, mesh.id, name, value)
    mesh.state.put(NAMESPACE, name, value)


def _counts(mesh: Mesh, owner: str, name: str, value: dict[str, Any], trusted: frozenset[str]) -> bool:
    """Whether this entry is evidence we accept: ours, a trusted peer's, or MAC'd with the mesh secret."""
    if owner == mesh.id or owner in trusted:
        return True
    secret = getattr(mesh, "secret", None)
    mac = value.get("mac")
    return bool(secret) and isinstance(mac, bytes) and hmac.compare_digest(
        mac, evidence_mac(secret, owner, name, value))


def reputations(mesh: Mesh, *, trusted: frozenset[str] | None = None, everyone: bool = False
                ) -> dict[str, Reputation]:
    """Every verified peer's reputation from the evidence we accept (``everyone``: from every live
    verifier's entries, checked or not: for display only, never for routing)."""
    trusted = trusted_peers() if trusted is None else trusted
    out: dict[str, Reputation] = {}
    for e in mesh.state.entries(NAMESPACE):
        v = e.value
        if not isinstance(v, dict) or not isinstance(v.get("peer"), str) or e.name != _entry_name(v["peer"]):
            continue
        if not everyone and not _counts(mesh, e.owner, e.name, v, trusted):
            continue
        try:
            counts = [max(int(v.get(k, 0)), 0) for k in ("pass", "fail", "vpass", "vfail")]
        except (TypeError, ValueError):
            continue
        r = out.setdefault(v["peer"], Reputation(v["peer"]))
        r.passes += counts[0]
        r.failures += counts[1]
        r.verifier_passes += counts[2]
        r.verifier_failures += counts[3]
        if counts[1] or counts[3]:
            r.failed_by.add(e.owner)
        last = v.get("last")
        if isinstance(last, list):
            r.last += [x for x in last[-KEEP_LAST:] if isinstance(x, dict)]
    return out


def failed_peers(mesh: Mesh, *, trusted: frozenset[str] | None = None) -> set[str]:
    """Peers failed (as a shard or as a verifier's helper) by evidence we accept: routing avoids them."""
    return {p for p, r in reputations(mesh, trusted=trusted).items() if r.failed()}
