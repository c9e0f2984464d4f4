"""Commitments: binding, signatures, chunking, size; malformed or forged records get a clear verdict."""

from __future__ import annotations

import msgpack
import pytest
import torch

from gradient_nb.mesh.identity import Identity, sign_record
from gradient_nb.verify.commitments import (
    CHUNK,
    BadCommitment,
    Binding,
    CommitmentBuilder,
    make_commitment,
    open_commitment,
    record_size,
    topk_rows,
)
from gradient_nb.verify.policy import SamplingPolicy
from gradient_nb.verify.verifier import Tolerance, verify_commitments

H = 64


@pytest.fixture
def ident() -> Identity:
    return Identity.generate()


def _binding(ident: Identity, request: str = "r1") -> Binding:
    return Binding("ab" * 32, 10, 20, f"{ident.peer_id}/{request}")


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def test_roundtrip_and_chunking(ident):
    b = _binding(ident)
    builder = CommitmentBuilder(ident, b)
    rows = _rows(80)
    recs = builder.push(0, rows[:10])  # a prefill
    for p in range(10, 80):  # decode steps
        recs += builder.push(p, rows[p:p + 1])
    assert len(recs) == 80 // CHUNK
    recs += builder.flush()
    opened = [open_commitment(r, b, signer=ident.peer_id) for r in recs]
    assert [p for c in opened for p in c.positions] == list(range(80))
    idx, val = topk_rows(rows)
    assert torch.equal(torch.cat([c.indices for c in opened]), idx)
    assert torch.allclose(torch.cat([c.values for c in opened]), val, rtol=1e-3)
    v = verify_commitments(rows, recs, b, peer=ident.peer_id, tol=Tolerance(), expected_positions=range(80))
    assert v.status == "pass", v.reason
    assert v.commitment_bytes == sum(record_size(r) for r in recs)
    assert v.commitment_bytes / 80 < 60  # ~32 bytes of top-8 per token plus the signed header per chunk


def test_replay_mid_session_starts_a_new_chunk(ident):
    builder = CommitmentBuilder(ident, _binding(ident))
    rows = _rows(12)
    builder.push(0, rows[:8])
    recs = builder.push(4, rows[4:12])  # the caller replays from position 4
    recs += builder.flush()
    b = _binding(ident)
    assert [(c.pos, c.n) for c in (open_commitment(r, b) for r in recs)] == [(0, 8), (4, 8)]
    v = verify_commitments(rows, recs, b, peer=ident.peer_id)
    assert v.status == "rejected" and "overlap" in v.reason


def test_wrong_request_range_model_or_signer_is_rejected(ident):
    b = _binding(ident)
    rec = make_commitment(ident, b, 0, 0, *topk_rows(_rows(4)))
    for other in (_binding(ident, "r2"), Binding("cd" * 32, 10, 20, b.request), Binding(b.model_hash, 0, 10, b.request)):
        with pytest.raises(BadCommitment, match="bound to another"):
            open_commitment(rec, other)
    with pytest.raises(BadCommitment, match="signature"):
        open_commitment(rec, b, signer=Identity.generate().peer_id)


def test_tampered_record_is_rejected(ident):
    b = _binding(ident)
    rec = make_commitment(ident, b, 0, 0, *topk_rows(_rows(4)))
    forged = {**rec, "payload": {**rec["payload"], "v": bytes(len(rec["payload"]["v"]))}}
    with pytest.raises(BadCommitment, match="bad signature"):
        open_commitment(forged, b)


@pytest.mark.parametrize("junk", [
    None, 42, "x", [], {"payload": 1}, {"payload": {}, "key": b"k", "sig": b"s"},
    {"payload": {"t": "verillm/commit/v1"}, "key": bytes(32), "sig": bytes(64)},
])
def test_malformed_records_get_a_rejected_verdict(ident, junk):
    b = _binding(ident)
    v = verify_commitments(_rows(4), [junk], b, peer=ident.peer_id)
    assert v.status == "rejected" and v.reason


@pytest.mark.parametrize("payload_patch", [
    {"n": 5}, {"k": 0}, {"it": "u8"}, {"i": "not bytes"}, {"p": -1}, {"n": 10 ** 9}, {"v": b"\x00\x7c" * 32},
])
def test_validly_signed_but_malformed_payload_is_rejected(ident, payload_patch):
    """A shard signing garbage is caught by the checks, not by a crash."""
    b = _binding(ident)
    good = make_commitment(ident, b, 0, 0, *topk_rows(_rows(4)))
    bad = sign_record(ident, {**good["payload"], **payload_patch})
    v = verify_commitments(_rows(4), [bad], b, peer=ident.peer_id)
    assert v.status == "rejected", v.reason


def test_out_of_range_positions_and_indices_fail(ident):
    b = _binding(ident)
    idx, val = topk_rows(_rows(4))
    far = make_commitment(ident, b, 100, 0, idx, val)
    assert verify_commitments(_rows(4), [far], b, peer=ident.peer_id).status == "fail"
    wide = make_commitment(ident, b, 0, 0, idx + 1000, val)
    assert verify_commitments(_rows(4), [wide], b, peer=ident.peer_id).status == "fail"


def test_missing_positions_are_incomplete(ident):
    b = _binding(ident)
    rec = make_commitment(ident, b, 0, 0, *topk_rows(_rows(4)))
    v = verify_commitments(_rows(8), [rec], b, peer=ident.peer_id, expected_positions=range(8))
    assert v.status == "incomplete"


def test_record_is_plain_msgpack(ident):
    rec = make_commitment(ident, _binding(ident), 0, 0, *topk_rows(_rows(32)))
    back = msgpack.unpackb(msgpack.packb(rec, use_bin_type=True), raw=False)
    assert open_commitment(back, _binding(ident)).n == 32


def test_sampling_policy_rate():
    assert SamplingPolicy(0.0).choose(1000) == set()
    assert SamplingPolicy(1.0).choose(5) == set(range(5))
    n = sum(len(SamplingPolicy(0.25).choose(100)) for _ in range(40))
    assert 700 < n < 1300  # 1000 expected; binomial sd ~27
    with pytest.raises(ValueError):
        SamplingPolicy(1.5)
