"""Signaling envelopes: a relay (the rendezvous or a peer) can neither alter, forge nor replay them."""

from __future__ import annotations

import msgpack
import pytest

from gradient_nb.mesh.errors import JoinRefused, SignatureInvalid
from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.mesh.signaling import EnvelopeOpener, seal

SDP = "v=0\r\na=fingerprint:sha-256 AA:BB:CC\r\n"


def _pair(secret: str | None = None) -> tuple[Identity, Identity, EnvelopeOpener]:
    alice, bob = Identity.generate(), Identity.generate()
    return alice, bob, EnvelopeOpener(mesh="m", me=bob.peer_id, secret=secret)


def test_envelope_round_trip_carries_the_signed_sdp() -> None:
    alice, bob, opener = _pair()
    env = seal(alice, mesh="m", to=bob.peer_id, kind="offer", body={"link": "1", "sdp": SDP}, secret=None)
    payload = opener.open(env)
    assert payload["from"] == alice.peer_id and payload["body"]["sdp"] == SDP


def test_a_man_in_the_middle_cannot_swap_the_fingerprint() -> None:
    alice, bob, opener = _pair()
    env = msgpack.unpackb(seal(alice, mesh="m", to=bob.peer_id, kind="offer",
                               body={"link": "1", "sdp": SDP}, secret=None))
    record = msgpack.unpackb(env["signed"])
    record["payload"]["body"]["sdp"] = SDP.replace("AA:BB:CC", "EE:EE:EE")  # the attacker's certificate
    env["signed"] = msgpack.packb(record)
    with pytest.raises(SignatureInvalid):
        opener.open(msgpack.packb(env))


def test_mallory_cannot_speak_for_alice() -> None:
    alice, bob, opener = _pair()
    mallory = Identity.generate()
    payload = {"mesh": "m", "from": alice.peer_id, "to": bob.peer_id, "kind": "offer",
               "body": {"link": "1", "sdp": SDP}, "ts": 1e12, "nonce": b"x" * 12}
    forged = msgpack.packb({"signed": msgpack.packb(sign_record(mallory, payload)), "mac": b""})
    with pytest.raises(SignatureInvalid):
        opener.open(forged)


def test_replays_other_meshes_and_other_receivers_are_refused() -> None:
    alice, bob, opener = _pair()
    env = seal(alice, mesh="m", to=bob.peer_id, kind="answer", body={"link": "1", "sdp": SDP}, secret=None)
    opener.open(env)
    with pytest.raises(SignatureInvalid, match="replayed"):
        opener.open(env)
    with pytest.raises(SignatureInvalid, match="another mesh or peer"):
        opener.open(seal(alice, mesh="other", to=bob.peer_id, kind="offer", body={}, secret=None))
    with pytest.raises(SignatureInvalid, match="another mesh or peer"):
        opener.open(seal(alice, mesh="m", to=alice.peer_id, kind="offer", body={}, secret=None))


def test_join_secret_is_required_on_every_envelope() -> None:
    alice, bob, opener = _pair(secret="s3cret")
    opener.open(seal(alice, mesh="m", to=bob.peer_id, kind="offer", body={}, secret="s3cret"))
    with pytest.raises(JoinRefused, match="join secret"):
        opener.open(seal(alice, mesh="m", to=bob.peer_id, kind="offer", body={}, secret="guess"))


@pytest.mark.parametrize("junk", [b"", b"\x00", msgpack.packb([1, 2]), msgpack.packb({"signed": 1, "mac": b""}),
                                  msgpack.packb({"signed": b"\xc1", "mac": b""})])
def test_malformed_envelopes_are_refused_cleanly(junk: bytes) -> None:
    _, _, opener = _pair()
    with pytest.raises(SignatureInvalid):
        opener.open(junk)


async def test_signal_relay_routes_over_linked_peers_without_the_rendezvous() -> None:
    """a -- b -- c: with no rendezvous, a's envelope for c goes through b (who says it links to c)."""
    from types import SimpleNamespace

    from gradient_nb.mesh.errors import PeerUnreachable
    from gradient_nb.mesh.rpc import RpcEndpoint, Services
    from gradient_nb.mesh.signaling import SignalRelay
    from gradient_nb.mesh.transport import memory_pair

    got: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}
    links: dict[str, dict] = {"a": {}, "b": {}, "c": {}}
    relays = {}

    async def no_rendezvous(to: str, env: bytes) -> str:
        return "the rendezvous is not connected"

    def records() -> dict:
        return {n: {"links": [{"peer": p} for p in links[n]]} for n in links}

    for name in links:
        relays[name] = SignalRelay(name, links=lambda n=name: links[n], records=records,
                                   via_rendezvous=no_rendezvous, deliver=got[name].append)
    endpoints = []
    for x, y in (("a", "b"), ("b", "c")):
        tx, ty = memory_pair()
        for me, other, t in ((x, y, tx), (y, x, ty)):
            services = Services()
            services.unary("mesh.relay", relays[me].on_relay)
            rpc = RpcEndpoint(t, services, remote_id=other)
            await rpc.start()
            endpoints.append(rpc)
            links[me][other] = SimpleNamespace(rpc=rpc)
    try:
        assert relays["a"].toward("c") == ["b"]
        await relays["a"].send("c", b"envelope")
        assert got["c"] == [b"envelope"] and not got["b"]
        with pytest.raises(PeerUnreachable, match="the rendezvous is not connected"):
            await relays["a"].send("nobody", b"x")
    finally:
        for rpc in endpoints:
            await rpc.close()
