"""Reputation from signed verdict entries in the replicated state: only evidence this peer can check
counts (its own verdicts, a trusted peer's, or verdicts MAC'd with the mesh's join secret); a swarm of
fresh identities changes nothing; forged entries are ignored."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.state import MeshState
from gradient_nb.verify.policy import SamplingPolicy
from gradient_nb.verify.reputation import NAMESPACE, failed_peers, record_verdict, reputations
from gradient_nb.verify.service import VerifyManager


@dataclass(eq=False)
class _Peer:
    """What reputation.py needs of a Mesh: its id, its (real) replicated state, the mesh's join secret."""

    state: MeshState
    id: str
    secret: str | None = None


def _peer(record: dict | None = None, secret: str | None = None) -> _Peer:
    ident = Identity.generate()
    st = MeshState(ident)
    st.heartbeat({"name": ident.peer_id[:6], **(record or {})})
    return _Peer(st, ident.peer_id, secret)


def _sync(dst: _Peer, *srcs: _Peer) -> None:
    for s in srcs:
        if hasattr(dst.state, "receive"):  # replicas exchanging signed records
            dst.state.receive(s.state.export())
        else:  # one shared Yjs document
            dst.state.doc.apply_update(s.state.doc.get_update())


def _verdict(peer: str, status: str) -> dict:
    return {"peer": peer, "start": 0, "end": 10, "request": "r", "status": status}


def test_own_failure_counts_and_others_only_when_trusted():
    me, v1, v2 = _peer(), _peer(), _peer()
    target, other = "a" * 40, "b" * 40
    record_verdict(v1, _verdict(target, "fail"))
    record_verdict(v1, _verdict(other, "pass"))
    record_verdict(v2, _verdict(target, "rejected"))
    _sync(me, v1, v2)
    assert failed_peers(me) == set()  # two strangers agreeing is no evidence
    assert failed_peers(me, trusted=frozenset({v2.id})) == {target}  # a peer our operator trusts is
    rep = reputations(me, everyone=True)  # for display: everything in the state
    assert rep[target].failures == 2 and rep[other].passes == 1 and rep[other].score > 0.5

    record_verdict(me, _verdict(other, "fail"))
    assert other in failed_peers(me)  # our own recomputation is trusted
    assert len(me.state.get(NAMESPACE, me.id, f"peer-{other}")["last"]) == 1


def test_twenty_sybils_failing_an_honest_peer_do_not_change_routing():
    serving = {"serving": {"model": "m", "hash": "ab" * 32, "dtype": "float32", "quantization": None,
                           "layers": [0, 30], "ready": True}}
    me, honest = _peer(), _peer(serving)
    manager = VerifyManager(me, "unused", "ab" * 32, 30, policy=SamplingPolicy(0.0))
    _sync(me, honest)
    before = manager.avoided_peers()
    sybils = [_peer() for _ in range(20)]
    for s in sybils:
        record_verdict(s, _verdict(honest.id, "fail"))
    _sync(me, *sybils)
    assert len(reputations(me, everyone=True)[honest.id].failed_by) == 20  # they are all in the state
    manager._failed_cache = (0.0, set())
    assert honest.id not in manager.avoided_peers() and manager.avoided_peers() == before
    # Twenty more "passing" a peer this entry failed itself do not clear it either.
    record_verdict(me, _verdict(honest.id, "fail"))
    for s in sybils:
        record_verdict(s, _verdict(honest.id, "pass"))
    _sync(me, *sybils)
    manager._failed_cache = (0.0, set())
    assert honest.id in manager.avoided_peers()


def test_verdicts_of_mesh_secret_holders_count_and_a_wrong_mac_does_not():
    me, holder, outsider = _peer(secret="s3cret"), _peer(secret="s3cret"), _peer(secret="guess")
    a, b = "c" * 40, "e" * 40
    record_verdict(holder, _verdict(a, "fail"))
    record_verdict(outsider, _verdict(b, "fail"))
    _sync(me, holder, outsider)
    assert failed_peers(me) == {a}
    # Copying a holder's MAC onto other counts does not work: the MAC covers the whole entry.
    value = dict(holder.state.get(NAMESPACE, holder.id, f"peer-{a}"), fail=0, peer=b)
    outsider.state.put(NAMESPACE, f"peer-{b}", value)
    _sync(me, outsider)
    assert failed_peers(me) == {a}


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
    payload = {"owner": victim_verifier.id, "ns": NAMESPACE, "name": f"peer-{target}", "value": value,
               "seq": 1, "ts": 0.0}
    forged = msgpack.packb(sign_record(forger.state.identity, payload), use_bin_type=True)
    _sync(me, victim_verifier, forger)
    if hasattr(me.state, "receive"):
        me.state.receive([forged])
    else:
        forger.state._map(NAMESPACE)[f"{victim_verifier.id}/peer-{target}"] = forged
        _sync(me, forger)
    assert target not in reputations(me, everyone=True)
    assert me.state.forged_entries >= 1
