"""Capabilities, share codes and the Yjs helpers of the bridge, without servers (fast)."""

from __future__ import annotations

import base64
import json

import msgpack
import pytest
from jupyter_ydoc import YNotebook
from pycrdt import Awareness, Doc, Encoder

from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.notebook.share.capability import (
    CLOCK_SKEW_S,
    CODE_PREFIX,
    CapabilityRefused,
    ShareError,
    admit,
    decode_code,
    issue,
)
from gradient_nb.notebook.share.yproto import (
    AwarenessRelay,
    Reassembler,
    TaggedDoc,
    chunks,
    state_vector,
)

OWNER, BOB, CAROL = Identity.generate(), Identity.generate(), Identity.generate()
DOC = "ab" * 16


def _code(record: object) -> str:
    return CODE_PREFIX + base64.urlsafe_b64encode(msgpack.packb(record, use_bin_type=True)).decode().rstrip("=")


def test_a_capability_round_trips_through_its_code_and_admits_its_grantee() -> None:
    cap = issue(OWNER, mesh="m", doc=DOC, name="a.ipynb", mode="ro", grantee=BOB.peer_id)
    again = decode_code(cap.code)
    assert (again.owner, again.doc, again.mode, again.grantee, again.expires) == (OWNER.peer_id, DOC, "ro",
                                                                                 BOB.peer_id, None)
    assert admit(again.record, host=OWNER.peer_id, mesh="m", caller=BOB.peer_id).mode == "ro"
    with pytest.raises(CapabilityRefused, match="bound to peer"):
        admit(again.record, host=OWNER.peer_id, mesh="m", caller=CAROL.peer_id)
    with pytest.raises(CapabilityRefused, match="mesh"):
        admit(again.record, host=OWNER.peer_id, mesh="other", caller=BOB.peer_id)
    with pytest.raises(CapabilityRefused, match="not by this host"):
        admit(again.record, host=CAROL.peer_id, mesh="m", caller=BOB.peer_id)


def test_bearer_codes_must_expire_and_do() -> None:
    with pytest.raises(ValueError, match="must expire"):
        issue(OWNER, mesh="m", doc=DOC, name="a", grantee=None)
    cap = issue(OWNER, mesh="m", doc=DOC, name="a", expires_in=60)
    assert admit(cap.record, host=OWNER.peer_id, mesh="m", caller=CAROL.peer_id).grantee is None
    late = cap.expires + CLOCK_SKEW_S + 1  # type: ignore[operator]
    with pytest.raises(CapabilityRefused, match="expired"):
        admit(cap.record, host=OWNER.peer_id, mesh="m", caller=CAROL.peer_id, now=late)
    # A bearer record without an expiry is refused even when properly signed.
    payload = {**cap.record["payload"], "expires": None}
    with pytest.raises(CapabilityRefused, match="must expire"):
        decode_code(_code(sign_record(OWNER, payload)))


def test_forged_altered_and_damaged_codes_are_refused() -> None:
    cap = issue(OWNER, mesh="m", doc=DOC, name="a", grantee=BOB.peer_id)
    # Another key signing the owner's payload; the owner's signature over an altered payload.
    with pytest.raises(CapabilityRefused, match="forged"):
        decode_code(_code(sign_record(CAROL, cap.record["payload"])))
    altered = {**cap.record, "payload": {**cap.record["payload"], "mode": "rw", "grantee": CAROL.peer_id}}
    with pytest.raises(CapabilityRefused, match="signature"):
        decode_code(_code(altered))
    for bad in ["", "x", CODE_PREFIX, CODE_PREFIX + "!!", cap.code[:-10], CODE_PREFIX + "A" * 5000,
                _code([1, 2, 3]), _code({"payload": "x"}), CODE_PREFIX + base64.urlsafe_b64encode(
                    msgpack.packb(msgpack.ExtType(1, b"x"))).decode()]:
        with pytest.raises(ShareError):
            decode_code(bad)


def test_state_vectors_and_updates_are_checked() -> None:
    doc = TaggedDoc()
    YNotebook(doc.doc).append_cell({"cell_type": "code", "source": "x", "metadata": {}, "outputs": [],
                                    "execution_count": None})
    sv = state_vector(doc.state())
    assert sv == {doc.doc.client_id: sv[doc.doc.client_id]} and sv[doc.doc.client_id] > 0
    for bad in [b"\x05", b"\x01\x80", doc.state() + b"\x00"]:
        with pytest.raises(ValueError):
            state_vector(bad)
    with pytest.raises(ValueError):
        doc.apply(b"\x01\x02garbage", "mesh")


def test_origins_tag_updates() -> None:
    a, b = TaggedDoc(), TaggedDoc()
    seen: list[str] = []
    b.listen(lambda update, origin: seen.append(origin))
    YNotebook(a.doc).append_cell({"cell_type": "markdown", "source": "hi", "metadata": {}})
    b.apply(a.diff(), "room")
    b.apply(a.diff(), "mesh")  # known already: no event at all
    assert seen == ["room"]


def test_awareness_entries_cross_once() -> None:
    doc = Doc()
    aw = Awareness(doc)
    aw.set_local_state({"user": {"name": "alice"}})
    update = aw.encode_awareness_update([doc.client_id])
    relay = AwarenessRelay()
    assert relay.news(update) is not None
    assert relay.news(update) is None  # the echo from the other room
    aw.set_local_state({"user": {"name": "alice", "cursor": 3}})
    assert relay.news(aw.encode_awareness_update([doc.client_id])) is not None
    assert relay.users() == [{"user": {"name": "alice", "cursor": 3}}]
    assert AwarenessRelay().news(relay.snapshot()) is not None
    # Alice's client id, replayed from another side with a higher clock, does not get through.
    aw.set_local_state({"user": {"name": "mallory"}})
    assert relay.news(aw.encode_awareness_update([doc.client_id]), "joiner") is None
    assert relay.users() == [{"user": {"name": "alice", "cursor": 3}}]
    enc = Encoder()
    enc.write_var_uint(1)
    enc.write_var_uint(7)
    enc.write_var_uint(1)
    enc.write_var_string("{not json")
    for bad in [enc.to_bytes(), b"\x05", b"x" * (300 << 10)]:
        with pytest.raises(ValueError):
            relay.news(bad)
    big = Encoder()
    big.write_var_uint(1)
    big.write_var_uint(8)
    big.write_var_uint(1)
    big.write_var_string(json.dumps({"x": "y" * (40 << 10)}))
    with pytest.raises(ValueError, match="size"):
        relay.news(big.to_bytes())


def test_chunks_reassemble_within_a_bound() -> None:
    data = bytes(range(256)) * 10
    r = Reassembler(limit=len(data))
    out = [r.add(piece, more) for piece, more in chunks(data, 100)]
    assert out[-1] == data and all(o is None for o in out[:-1])
    assert list(chunks(b"", 100)) == [(b"", False)]
    small = Reassembler(limit=150)
    small.add(b"x" * 100, True)
    with pytest.raises(ValueError, match="over"):
        small.add(b"x" * 100, True)
    with pytest.raises(ValueError):
        small.add("text", False)
