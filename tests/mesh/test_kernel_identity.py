"""Kernel certificates: each kernel's own key, vouched for by the user's key; the chain is checked on read."""

from __future__ import annotations

import msgpack
import pytest

from gradient_nb.mesh.errors import SignatureInvalid
from gradient_nb.mesh.identity import (
    Identity,
    issue_kernel_certificate,
    kernel_identity,
    sign_record,
    user_of,
    verify_kernel_certificate,
)


def test_two_kernels_of_one_user_are_two_peers_of_that_user() -> None:
    user = Identity.generate()
    k1, c1 = kernel_identity(user, label="a.ipynb")
    k2, c2 = kernel_identity(user, label="b.ipynb")
    assert len({k1.peer_id, k2.peer_id, user.peer_id}) == 3
    # As the registry stores it: msgpack bytes, read back by another peer.
    c1, c2 = (msgpack.unpackb(msgpack.packb(c, use_bin_type=True), raw=False) for c in (c1, c2))
    assert verify_kernel_certificate(c1, k1.peer_id) == user.peer_id
    assert user_of(k2.peer_id, {"name": "b", "user_cert": c2}) == user.peer_id
    assert user_of(k2.peer_id, {"name": "b"}) is None


def test_a_certificate_vouches_only_for_the_kernel_it_names() -> None:
    user = Identity.generate()
    _, c1 = kernel_identity(user)
    k2, _ = kernel_identity(user)
    with pytest.raises(SignatureInvalid, match="certificate is for peer"):
        verify_kernel_certificate(c1, k2.peer_id)  # a copied certificate does not make k2 the user's
    assert user_of(k2.peer_id, {"user_cert": c1}) is None


def test_forged_and_tampered_certificates_are_refused() -> None:
    user, mallory = Identity.generate(), Identity.generate()
    kernel = Identity.generate()
    # Mallory claims the user's key but signs with her own.
    forged = sign_record(mallory, {"kind": "kernel-cert/v1", "user_key": user.public_key,
                                   "kernel_key": kernel.public_key, "label": "", "issued": 0.0})
    with pytest.raises(SignatureInvalid, match="signed by the user key"):
        verify_kernel_certificate(forged, kernel.peer_id)
    cert = issue_kernel_certificate(user, kernel, label="a")
    tampered = {**cert, "payload": {**cert["payload"], "kernel_key": mallory.public_key}}
    with pytest.raises(SignatureInvalid, match="bad signature"):
        verify_kernel_certificate(tampered, mallory.peer_id)
    other_kind = sign_record(user, {"kind": "something-else", "user_key": user.public_key,
                                    "kernel_key": kernel.public_key})
    with pytest.raises(SignatureInvalid, match="not a kernel certificate"):
        verify_kernel_certificate(other_kind, kernel.peer_id)
    for junk in (None, 3, {"payload": {}}, {"payload": [], "key": b"", "sig": b""}):
        assert user_of(kernel.peer_id, {"user_cert": junk}) is None
