"""Reputation from signed verdict entries in the replicated state: our own verdict counts at once,
others' only with a quorum of distinct verifiers; forged entries are ignored."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.state import MeshState
from gradient_nb.verify.reputation import NAMESPACE, failed_peers, record_verdict, reputations


@dataclass
class _Peer:
    """What reputation.py needs of a Mesh: its id and its (real) replicated state."""

    state: MeshState
    id: str


def _peer() -> _Peer:
    ident = Identity.generate()
    st = MeshState(ident)
    st.heartbeat({"name": ident.peer_id[:6]})
    return _Peer(st, ident.peer_id)


def _sync(dst: _Peer, *srcs: _Peer) -> None:
    for s in srcs:
        dst.state.doc.apply_update(s.state.doc.get_update())


def _verdict(peer: str, status: str) -> dict:
    return {"peer": peer, "start": 0, "end": 10, "request": "r", "status": status}


def test_own_failure_counts_at_once_and_others_need_a_quorum():
    me, v1, v2 = _peer(), _peer(), _peer()
    target, other = "a" * 40, "b" * 40
    record_verdict(v1, _verdict(target, "fail"))
    record_verdict(v1, _verdict(other, "pass"))
    _sync(me, v1)
    assert failed_peers(me) == set()  # one foreign verifier alone cannot evict a peer
    record_verdict(v2, _verdict(target, "rejected"))
    _sync(me, v2)
    assert failed_peers(me) == {target}
    rep = reputations(me)
    assert rep[target].failures == 2 and rep[other].passes == 1 and rep[other].score > 0.5

    record_verdict(me, _verdict(other, "fail"))
    assert other in failed_peers(me)  # our own recomputation is trusted
    assert len(me.state.get(NAMESPACE, me.id, f"peer-{other}")["last"]) == 1


def test_verdicts_keep_a_bounded_history():
    me = _peer()
    for i in range(20):
        record_verdict(me, _verdict("c" * 40, "pass" if i % 2 else "fail"))
    value = me.state.get(NAMESPACE, me.id, f"peer-{'c' * 40}")
    assert value["pass"] == 10 and value["fail"] == 10 and len(value["last"]) == 8


def test_a_verdict_written_in_another_peers_name_is_ignored():
    me, victim_verifier, forger = _peer(), _peer(), _peer()
    target = "d" * 40
    # The forger writes under the other verifier's key, signed with its own key.
    value = {"peer": target, "pass": 0, "fail": 5, "last": []}
    payload = {"owner": victim_verifier.id, "name": f"peer-{target}", "value": value, "ts": 0.0}
    forged = msgpack.packb(sign_record(forger.state.identity, payload), use_bin_type=True)
    forger.state._map(NAMESPACE)[f"{victim_verifier.id}/peer-{target}"] = forged
    _sync(me, victim_verifier, forger)
    assert target not in reputations(me)
    assert me.state.forged_entries >= 1
