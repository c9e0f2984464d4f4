"""Share capabilities: who may open a shared notebook, and with which rights, as a signed record.

A capability is a record signed (``mesh.identity.sign_record``) by the peer that hosts the notebook::

    {"kind": "nbshare/v1", "mesh": str, "owner": peer id, "doc": share id, "name": file name,
     "mode": "rw" | "ro", "grantee": peer id | None, "expires": unix time | None,
     "issued": unix time, "nonce": 16 hex digits}

The host checks, on every ``nbshare.open``: the signature and that the signer is the host itself (so no
peer can mint a capability for someone else's notebook), the mesh, that the share is still offered, the
grantee (the link authenticates the caller's peer id, so a capability bound to a grantee is useless to
anyone else), the expiry and the revocation list (by nonce). A capability without a grantee is a
*bearer* token: whoever holds it may open the document, so it must carry an expiry.

A *share code* is that record, msgpack-encoded, base64url'd and prefixed with ``gnbshare1.``: a string a
user can paste into a chat. It holds everything a joiner needs to find the host (mesh, owner peer id,
share id) and nothing secret beyond the capability itself. Decoding treats the string as hostile: its
length is bounded, msgpack is read with strict limits and no extension types, every field is type-checked
and the signature verified before anything is used.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from ...mesh.errors import SignatureInvalid
from ...mesh.identity import Identity, is_peer_id, sign_record, verify_record

KIND = "nbshare/v1"
CODE_PREFIX = "gnbshare1."
MAX_CODE_CHARS = 4096
MAX_NAME_CHARS = 200
Mode = Literal["rw", "ro"]
MODES = ("rw", "ro")
_DOC_ID = re.compile(r"[0-9a-f]{16,64}")
# Clocks of two machines differ: an expiry is honoured to the second, not to the millisecond.
CLOCK_SKEW_S = 5.0


class ShareError(Exception):
    """A share that cannot be created, decoded or opened; the message says why."""


class CapabilityRefused(ShareError):
    """The host refused the capability (forged, expired, revoked, bound to another peer, wrong mesh)."""


@dataclass(frozen=True)
class Capability:
    """A checked capability's payload."""

    mesh: str
    owner: str
    doc: str
    name: str
    mode: Mode
    grantee: str | None
    expires: float | None
    issued: float
    nonce: str
    record: dict[str, Any]

    @property
    def code(self) -> str:
        """The share code of this capability."""
        packed = msgpack.packb(self.record, use_bin_type=True)
        return CODE_PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")


def issue(owner: Identity, *, mesh: str, doc: str, name: str, mode: Mode = "rw", grantee: str | None = None,
          expires_in: float | None = None) -> Capability:
    """A capability for the share ``doc`` hosted by ``owner``, signed by it.

    Bound to ``grantee`` (a peer id) when given; otherwise a bearer token, which must expire
    (``expires_in`` seconds from now).
    """
    if mode not in MODES:
        raise ValueError(f"mode is 'rw' or 'ro', not {mode!r}")
    if grantee is not None and not is_peer_id(grantee):
        raise ValueError(f"a grantee is a peer id (40 hex digits), not {grantee!r}")
    if grantee is None and expires_in is None:
        raise ValueError("a bearer capability (no grantee) must expire: pass expires_in")
    if expires_in is not None and not 0 < expires_in < 10 * 365 * 86400:
        raise ValueError("expires_in is a positive number of seconds")
    now = time.time()
    payload = {"kind": KIND, "mesh": mesh, "owner": owner.peer_id, "doc": doc, "name": name[:MAX_NAME_CHARS],
               "mode": mode, "grantee": grantee, "expires": None if expires_in is None else now + expires_in,
               "issued": now, "nonce": secrets.token_hex(8)}
    return check(sign_record(owner, payload))


def check(record: Any) -> Capability:
    """The capability in ``record`` if it is well formed and signed by the owner it names (not yet
    whether it is valid *now*, nor for whom: see :func:`admit`). Raises :class:`CapabilityRefused`."""
    try:
        payload = verify_record(record)
    except SignatureInvalid as exc:
        raise CapabilityRefused(f"not a valid signed capability: {exc}") from None
    if payload.get("kind") != KIND:
        raise CapabilityRefused("not a notebook-share capability")
    owner = payload.get("owner")
    if not is_peer_id(owner):
        raise CapabilityRefused("a capability names its owner's peer id")
    try:
        verify_record(record, expect_peer_id=owner)
    except SignatureInvalid:
        raise CapabilityRefused("the capability is not signed by the owner it names (forged)") from None
    mesh, doc, name, mode = payload.get("mesh"), payload.get("doc"), payload.get("name"), payload.get("mode")
    grantee, expires = payload.get("grantee"), payload.get("expires")
    issued, nonce = payload.get("issued"), payload.get("nonce")
    if not isinstance(mesh, str) or not mesh or len(mesh) > 200:
        raise CapabilityRefused("a capability names a mesh")
    if not isinstance(doc, str) or not _DOC_ID.fullmatch(doc):
        raise CapabilityRefused("a capability names a share id (hex)")
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise CapabilityRefused("a capability's file name is a short string")
    if mode not in MODES:
        raise CapabilityRefused("a capability's mode is 'rw' or 'ro'")
    if grantee is not None and not is_peer_id(grantee):
        raise CapabilityRefused("a capability's grantee is a peer id")
    if expires is not None and not isinstance(expires, (int, float)):
        raise CapabilityRefused("a capability's expiry is a time")
    if grantee is None and expires is None:
        raise CapabilityRefused("a bearer capability must expire")
    if not isinstance(issued, (int, float)) or not isinstance(nonce, str) or len(nonce) > 64:
        raise CapabilityRefused("a capability carries its issue time and a nonce")
    return Capability(mesh=mesh, owner=owner, doc=doc, name=name, mode=mode, grantee=grantee,
                      expires=None if expires is None else float(expires), issued=float(issued), nonce=nonce,
                      record=record)


def admit(record: Any, *, host: str, mesh: str, caller: str, now: float | None = None) -> Capability:
    """The capability if ``caller`` may use it now on ``host`` in ``mesh``; :class:`CapabilityRefused`
    with the reason otherwise. (Revocation is the share's to check: it keeps the revoked nonces.)"""
    cap = check(record)
    now = time.time() if now is None else now
    if cap.owner != host:
        raise CapabilityRefused(f"the capability was issued by peer {cap.owner[:8]}, not by this host")
    if cap.mesh != mesh:
        raise CapabilityRefused(f"the capability is for mesh {cap.mesh!r}, not {mesh!r}")
    if cap.grantee is not None and cap.grantee != caller:
        raise CapabilityRefused(f"the capability is bound to peer {cap.grantee[:8]}, not to {caller[:8]}")
    if cap.expires is not None and now > cap.expires + CLOCK_SKEW_S:
        raise CapabilityRefused(f"the capability expired {now - cap.expires:.0f} s ago")
    return cap


def decode_code(code: str) -> Capability:
    """The capability in a share code (well formed and signed; see :func:`check`). Raises ShareError."""
    if not isinstance(code, str):
        raise ShareError("a share code is a string")
    code = code.strip()
    if len(code) > MAX_CODE_CHARS:
        raise ShareError(f"a share code is at most {MAX_CODE_CHARS} characters")
    if not code.startswith(CODE_PREFIX):
        raise ShareError(f"a share code starts with {CODE_PREFIX!r}")
    body = code[len(CODE_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        record = msgpack.unpackb(raw, raw=False, strict_map_key=True,
                                 ext_hook=_no_ext)
    except (binascii.Error, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ShareError(f"the share code is damaged: {exc}") from None
    return check(record)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not accepted")
