"""Peer identity: an Ed25519 key pair, the peer id derived from it, and signed records.

The peer id is the first 160 bits of SHA-256 of the raw public key, in hex. 160 bits because the DHT uses
ids as Kademlia XOR-distance keys; collisions need a second-preimage on truncated SHA-256, so the id binds
the key.

A signed record is ``{"payload": dict, "key": 32 raw public key bytes, "sig": 64 bytes}``. The signature
covers a domain-separation prefix plus a canonical msgpack encoding of the payload (map keys sorted at every
level), so that the same payload always gives the same bytes on every peer and a record signature can never
be replayed as some other kind of signature (the rendezvous hello, signaling envelopes) by the same key.

Kernel identities: each Jupyter kernel is a peer of its own, with a fresh Ed25519 key that lives only in
its memory, under the user's persistent key. The user's key signs a *kernel certificate* (a signed record
whose payload is ``{"kind": "kernel-cert/v1", "user_key", "kernel_key", "label", "issued"}``); the kernel
publishes it in its registry record as ``user_cert``. The chain a reader checks: the registry record is
signed by the kernel key (the mesh state checks that), the certificate names that same key and is signed
by the user key, so the record's peer belongs to the user ``peer_id_of(user_key)``. Two notebooks of one
user are then two peers with two ids and two routes, both shown as the user's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SignatureInvalid

log = logging.getLogger(__name__)

RECORD_CONTEXT = b"gradient-nb/record/v1\x00"
PEER_ID_HEX_LEN = 40


def peer_id_of(public_key: bytes) -> str:
    """The peer id (40 hex digits) of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(bytes(public_key)).hexdigest()[:PEER_ID_HEX_LEN]


def is_peer_id(value: Any) -> bool:
    """Whether ``value`` looks like a peer id (40 lowercase hex digits)."""
    return (isinstance(value, str) and len(value) == PEER_ID_HEX_LEN
            and all(c in "0123456789abcdef" for c in value))


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``; never raises."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), bytes(data))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def default_identity_path() -> Path:
    home = os.environ.get("GRADIENT_NB_HOME")
    if home:
        return Path(home).expanduser() / "identity.key"
    return Path.home() / ".config" / "gradient-nb" / "identity.key"


class Identity:
    """An Ed25519 key pair. Create with :meth:`generate` or :meth:`load_or_create`."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.peer_id: str = peer_id_of(self.public_key)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        """From the raw 32-byte Ed25519 private key (seed)."""
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, not {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(raw)))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())

    def to_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    @classmethod
    def from_pem_or_raw(cls, data: bytes) -> Identity:
        """Parse a key file: unencrypted PKCS#8 PEM, or the raw 32-byte private key."""
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("the identity key file does not hold an Ed25519 key")
            return cls(key)
        return cls.from_private_bytes(data)

    @classmethod
    def load_or_create(cls, path: Path | None = None) -> Identity:
        """The persistent identity stored at ``path`` (default ``$GRADIENT_NB_HOME/identity.key`` or
        ``~/.config/gradient-nb/identity.key``), created with mode 0600 if it does not exist."""
        path = Path(path) if path is not None else default_identity_path()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            identity = cls.generate()
            try:
                identity.save(path, exclusive=True)
            except FileExistsError:
                # Another process (a second kernel starting at the same moment) won the race: use its key.
                return cls.load_or_create(path)
            return identity
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            # Like ssh: a private key readable by others is a mistake; fix it rather than keep leaking it.
            log.warning("identity key %s had mode %o; setting it to 0600", path, mode)
            with contextlib.suppress(OSError):
                path.chmod(0o600)
        return cls.from_pem_or_raw(data)

    def save(self, path: Path, *, exclusive: bool = False) -> None:
        """Write the key as PEM with mode 0600, atomically (never a half-written key file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".identity-", suffix=".tmp")
        try:
            if hasattr(os, "fchmod"):  # mkstemp already creates 0600 files; this is belt and braces
                os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_pem())
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)  # fails with FileExistsError instead of replacing someone's key
                except FileExistsError:
                    raise
                except OSError:  # a filesystem without hard links: check-then-replace is the best left
                    if path.exists():
                        raise FileExistsError(path) from None
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("signed payloads may only have str map keys")
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def canonical_bytes(payload: dict[str, Any]) -> bytes:
    """The canonical msgpack encoding of ``payload`` (sorted keys at every level, lists for tuples)."""
    if not isinstance(payload, dict):
        raise TypeError("a signed payload is a dict")
    return msgpack.packb(_canonical(payload), use_bin_type=True)


def sign_record(identity: Identity, payload: dict[str, Any]) -> dict[str, Any]:
    """``{"payload", "key", "sig"}`` with the signature of ``identity`` over the canonical payload."""
    sig = identity.sign(RECORD_CONTEXT + canonical_bytes(payload))
    return {"payload": payload, "key": identity.public_key, "sig": sig}


def verify_record(record: dict[str, Any], *, expect_peer_id: str | None = None) -> dict[str, Any]:
    """The payload of a valid signed record; raises :class:`SignatureInvalid` otherwise.

    Besides the signature, the signer must be ``expect_peer_id`` when given, and ``payload["peer_id"]``
    when the payload names one: a record about a peer is only valid when that peer signed it.
    """
    if not isinstance(record, dict):
        raise SignatureInvalid("a signed record is a map")
    payload, key, sig = record.get("payload"), record.get("key"), record.get("sig")
    if not isinstance(payload, dict) or not isinstance(key, bytes) or not isinstance(sig, bytes):
        raise SignatureInvalid("a signed record needs payload (map), key (bytes) and sig (bytes)")
    if len(key) != 32 or len(sig) != 64:
        raise SignatureInvalid("bad key or signature length")
    try:
        data = canonical_bytes(payload)
    except (TypeError, ValueError) as exc:
        raise SignatureInvalid(f"payload cannot be encoded canonically: {exc}") from None
    if not verify_signature(key, RECORD_CONTEXT + data, sig):
        raise SignatureInvalid("bad signature")
    signer = peer_id_of(key)
    if expect_peer_id is not None and signer != expect_peer_id:
        raise SignatureInvalid(f"signed by {signer[:8]}, expected {str(expect_peer_id)[:8]}")
    if "peer_id" in payload and payload["peer_id"] != signer:
        raise SignatureInvalid(f"record names peer {str(payload['peer_id'])[:8]} but is signed by {signer[:8]}")
    return payload


KERNEL_CERT_KIND = "kernel-cert/v1"


def issue_kernel_certificate(user: Identity, kernel: Identity, *, label: str = "") -> dict[str, Any]:
    """A record, signed by ``user``, saying that ``kernel``'s key speaks for this user (see the module doc)."""
    return sign_record(user, {"kind": KERNEL_CERT_KIND, "user_key": user.public_key,
                              "kernel_key": kernel.public_key, "label": str(label), "issued": time.time()})


def verify_kernel_certificate(cert: Any, peer_id: str) -> str:
    """The user's peer id if ``cert`` is a valid kernel certificate for the peer ``peer_id``.

    Raises :class:`SignatureInvalid` when it is not: bad signature, signed by another key than the user key
    it names, or naming another kernel key than the one whose id is ``peer_id``.
    """
    payload = verify_record(cert)
    if payload.get("kind") != KERNEL_CERT_KIND:
        raise SignatureInvalid("not a kernel certificate")
    user_key, kernel_key = payload.get("user_key"), payload.get("kernel_key")
    if not isinstance(user_key, bytes) or not isinstance(kernel_key, bytes) or len(kernel_key) != 32:
        raise SignatureInvalid("a kernel certificate needs user_key and kernel_key (32 bytes each)")
    if user_key != cert["key"]:
        raise SignatureInvalid("a kernel certificate must be signed by the user key it names")
    if peer_id_of(kernel_key) != peer_id:
        raise SignatureInvalid(f"the certificate is for peer {peer_id_of(kernel_key)[:8]}, not {str(peer_id)[:8]}")
    if user_key == kernel_key:
        raise SignatureInvalid("a kernel certificate names two different keys")
    return peer_id_of(user_key)


def kernel_identity(user: Identity | None = None, *, label: str = "") -> tuple[Identity, dict[str, Any]]:
    """A fresh key for one kernel and its certificate signed by ``user`` (default: the persistent key)."""
    user = user or Identity.load_or_create()
    kernel = Identity.generate()
    return kernel, issue_kernel_certificate(user, kernel, label=label)


def user_of(peer_id: str, record: Any) -> str | None:
    """The user behind a registry record (its ``user_cert`` checked), or None when it carries no valid one."""
    cert = record.get("user_cert") if isinstance(record, dict) else None
    if cert is None:
        return None
    try:
        return verify_kernel_certificate(cert, peer_id)
    except SignatureInvalid as exc:
        log.info("peer %s carries an invalid kernel certificate: %s", str(peer_id)[:8], exc)
        return None
