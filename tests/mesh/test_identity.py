"""Identity keys, peer ids and signed records."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gradient_nb.mesh.errors import SignatureInvalid
from gradient_nb.mesh.identity import (
    Identity,
    canonical_bytes,
    default_identity_path,
    peer_id_of,
    sign_record,
    verify_record,
    verify_signature,
)


def test_peer_id_is_truncated_sha256_of_the_raw_public_key() -> None:
    ident = Identity.generate()
    assert len(ident.public_key) == 32
    assert ident.peer_id == hashlib.sha256(ident.public_key).hexdigest()[:40]
    assert peer_id_of(ident.public_key) == ident.peer_id
    assert Identity.generate().peer_id != ident.peer_id


def test_sign_and_verify_signature() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert verify_signature(ident.public_key, b"hello", sig)
    assert not verify_signature(ident.public_key, b"hellO", sig)
    assert not verify_signature(Identity.generate().public_key, b"hello", sig)
    assert not verify_signature(b"short", b"hello", sig)
    assert not verify_signature(ident.public_key, b"hello", sig[:-1])


def test_load_or_create_persists_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "identity.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert Identity.load_or_create(path).peer_id == first.peer_id
    # No temporary files are left beside the key.
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]


def test_load_raw_key_and_fix_loose_permissions(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    ident = Identity(key)
    path = tmp_path / "raw.key"
    path.write_bytes(ident.private_bytes())
    path.chmod(0o644)
    assert Identity.load_or_create(path).peer_id == ident.peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_garbage_key_file_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(ValueError):
        Identity.load_or_create(path)


def test_default_path_honours_gradient_nb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADIENT_NB_HOME", str(tmp_path))
    assert default_identity_path() == tmp_path / "identity.key"
    ident = Identity.load_or_create()
    assert (tmp_path / "identity.key").exists()
    assert Identity.load_or_create().peer_id == ident.peer_id
    monkeypatch.delenv("GRADIENT_NB_HOME")
    assert default_identity_path() == Path(os.path.expanduser("~")) / ".config" / "gradient-nb" / "identity.key"


def test_record_round_trip_through_msgpack() -> None:
    ident = Identity.generate()
    payload = {"peer_id": ident.peer_id, "b": [1, 2.5, {"z": None, "a": b"\x00"}], "a": True}
    record = sign_record(ident, payload)
    assert set(record) == {"payload", "key", "sig"}
    assert record["key"] == ident.public_key
    wire = msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False)
    assert verify_record(wire) == payload
    assert verify_record(wire, expect_peer_id=ident.peer_id) == payload


def test_canonical_encoding_ignores_key_order() -> None:
    a = {"x": 1, "y": {"b": 2, "a": [1, {"q": 1, "p": 2}]}}
    b = {"y": {"a": [1, {"p": 2, "q": 1}], "b": 2}, "x": 1}
    assert canonical_bytes(a) == canonical_bytes(b)
    ident = Identity.generate()
    record = sign_record(ident, a)
    record["payload"] = b  # same content, another key order (as another msgpack library may produce)
    assert verify_record(record) == b


def test_tampered_and_forged_records_are_refused() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    record = sign_record(alice, {"peer_id": alice.peer_id, "v": 1})
    tampered = dict(record, payload={"peer_id": alice.peer_id, "v": 2})
    with pytest.raises(SignatureInvalid, match="bad signature"):
        verify_record(tampered)
    # Mallory signs a record claiming to be Alice.
    forged = sign_record(mallory, {"peer_id": alice.peer_id, "v": 1})
    with pytest.raises(SignatureInvalid, match="signed by"):
        verify_record(forged)
    # A key swapped in without re-signing.
    with pytest.raises(SignatureInvalid):
        verify_record(dict(record, key=mallory.public_key))
    other = sign_record(mallory, {"v": 1})
    assert verify_record(other) == {"v": 1}
    with pytest.raises(SignatureInvalid, match="expected"):
        verify_record(other, expect_peer_id=alice.peer_id)


@pytest.mark.parametrize("bad", [
    None, [], "x", {}, {"payload": {}, "key": b"k", "sig": b"s"},
    {"payload": [], "key": bytes(32), "sig": bytes(64)},
    {"payload": {}, "key": "not bytes", "sig": bytes(64)},
    {"payload": {1: 2}, "key": bytes(32), "sig": bytes(64)},
    {"payload": {}, "key": bytes(32), "sig": bytes(64)},
])
def test_malformed_records_raise_signature_invalid(bad: object) -> None:
    with pytest.raises(SignatureInvalid):
        verify_record(bad)  # type: ignore[arg-type]


def test_record_signature_is_domain_separated() -> None:
    # A record signature must not double as a signature over the bare payload bytes (another protocol).
    ident = Identity.generate()
    payload = {"v": 1}
    record = sign_record(ident, payload)
    assert not verify_signature(ident.public_key, canonical_bytes(payload), record["sig"])


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(payload=st.dictionaries(st.text(max_size=6), _values, max_size=5))
def test_any_msgpack_payload_signs_and_verifies_after_transport(payload: dict) -> None:
    ident = _FUZZ_IDENTITY
    record = sign_record(ident, payload)
    wire = msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False)
    assert verify_record(wire, expect_peer_id=ident.peer_id) == wire["payload"]


_FUZZ_IDENTITY = Identity.generate()
