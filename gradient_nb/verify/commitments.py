"""Compact, signed commitments to the activations a shard outputs (VeriLLM / TOPLOC style).

Per token, a shard keeps the ``k`` largest-magnitude entries of what it outputs: the hidden state
after its last layer, or the logits on the last stage (which only outputs the logits of the last
position of each call, so that is what it commits to). Per chunk of up to ``CHUNK`` tokens, the
indices (uint16: hidden sizes and vocabularies below 65536; uint32 above) and the values (float16,
float32 where a value would overflow float16) go into one record, signed with the shard's Ed25519
key. The record is bound to the model's content hash, the layer range, the request and the
positions through a digest of that binding, so it can neither be replayed for another request nor
moved to other positions, and a verifier that knows the binding recomputes the digest rather than
trusting one.

A commitment is cheap to compute (one top-k per token) and small (``k`` x 4 bytes per token plus
~150 bytes per chunk). It does not let anyone recompute the activations; it only lets a verifier
that recomputes them check that they are what the shard really produced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from ..mesh.errors import SignatureInvalid
from ..mesh.identity import Identity, peer_id_of, sign_record, verify_record

CHUNK = 32
TOPK = 8
KIND = "verillm/commit/v1"
MAX_CHUNK = 1024
MAX_TOPK = 256
MAX_RECORD_BYTES = 1 << 20


class BadCommitment(ValueError):
    """A commitment that is malformed, forged or bound to something else."""


@dataclass(frozen=True)
class Binding:
    """What a commitment is about: the model (content hash), the layers, the request."""

    model_hash: str
    start: int
    end: int
    request: str  # "<entry peer id>/<session>": unique per request chain, chosen by the entry peer

    def digest(self) -> bytes:
        return hashlib.sha256(msgpack.packb(
            [KIND, self.model_hash, int(self.start), int(self.end), self.request], use_bin_type=True)).digest()


@dataclass(frozen=True)
class Commitment:
    """One verified chunk: rows ``pos .. pos + n - 1`` of one shard's output."""

    signer: str
    start: int
    end: int
    pos: int
    chunk: int
    indices: torch.Tensor  # [n, k] int64
    values: torch.Tensor  # [n, k] float32
    nbytes: int  # size of the encoded record

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def positions(self) -> range:
        return range(self.pos, self.pos + self.n)


def topk_rows(x: torch.Tensor, k: int = TOPK) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest-magnitude entries of each row: (indices [n, k] int64, values [n, k] float32)."""
    x = x.detach().float()
    if x.dim() == 1:
        x = x[None]
    k = min(k, x.shape[-1])
    idx = x.abs().topk(k, dim=-1, sorted=True).indices
    return idx, x.gather(-1, idx)


def _encode(indices: torch.Tensor, values: torch.Tensor) -> tuple[bytes, str, bytes, str]:
    idx = indices.numpy()
    idt = "u2" if int(idx.max(initial=0)) < 65536 else "u4"
    val = values.numpy()
    vdt = "f2" if bool(np.isfinite(val.astype(np.float16)).all()) else "f4"
    return (idx.astype("<" + idt).tobytes(), idt, val.astype("<" + vdt).tobytes(), vdt)


def make_commitment(identity: Identity, binding: Binding, pos: int, chunk: int, indices: torch.Tensor,
                    values: torch.Tensor) -> dict[str, Any]:
    """A signed record committing to top-k rows at positions ``pos ..``."""
    ib, idt, vb, vdt = _encode(indices, values)
    n, k = indices.shape
    payload = {"t": KIND, "b": binding.digest(), "s": int(binding.start), "e": int(binding.end),
               "p": int(pos), "c": int(chunk), "n": int(n), "k": int(k), "it": idt, "i": ib, "vt": vdt, "v": vb}
    return sign_record(identity, payload)


def record_size(record: Any) -> int:
    return len(msgpack.packb(record, use_bin_type=True))


def open_commitment(record: Any, binding: Binding, *, signer: str | None = None) -> Commitment:
    """Check a commitment record against the binding the verifier expects; raises BadCommitment.

    Everything is checked before use: the signature (and the signer when given), the binding digest,
    field types and bounds, and that the byte strings hold exactly n x k entries.
    """
    try:
        payload = verify_record(record, expect_peer_id=signer)
    except SignatureInvalid as exc:
        raise BadCommitment(f"bad signature: {exc}") from None
    try:
        if payload.get("t") != KIND:
            raise BadCommitment(f"not a commitment (kind {payload.get('t')!r})")
        if payload.get("b") != binding.digest():
            raise BadCommitment("bound to another model, layer range or request")
        ints = {f: payload.get(f) for f in ("s", "e", "p", "c", "n", "k")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints.values()):
            raise BadCommitment("bad integer fields")
        if (ints["s"], ints["e"]) != (binding.start, binding.end):
            raise BadCommitment("layer range differs from the binding")
        n, k = ints["n"], ints["k"]
        if not 0 < n <= MAX_CHUNK or not 0 < k <= MAX_TOPK:
            raise BadCommitment(f"chunk of {n} tokens x top-{k} is out of bounds")
        idt, vdt = payload.get("it"), payload.get("vt")
        if idt not in ("u2", "u4") or vdt not in ("f2", "f4"):
            raise BadCommitment("unknown index or value encoding")
        ib, vb = payload.get("i"), payload.get("v")
        if not isinstance(ib, bytes) or not isinstance(vb, bytes):
            raise BadCommitment("indices and values must be bytes")
        isz, vsz = int(idt[1]), int(vdt[1])
        if len(ib) != n * k * isz or len(vb) != n * k * vsz:
            raise BadCommitment("indices or values do not hold n x k entries")
        idx = np.frombuffer(ib, dtype="<" + idt).astype(np.int64).reshape(n, k)
        val = np.frombuffer(vb, dtype="<" + vdt).astype(np.float32).reshape(n, k)
        if not np.isfinite(val).all():
            raise BadCommitment("non-finite committed values")
    except BadCommitment:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise BadCommitment(f"malformed commitment: {exc}") from None
    return Commitment(signer=peer_id_of(record["key"]), start=ints["s"], end=ints["e"], pos=ints["p"],
                      chunk=ints["c"], indices=torch.from_numpy(idx.copy()), values=torch.from_numpy(val.copy()),
                      nbytes=record_size(record))


@dataclass
class CommitmentBuilder:
    """Buffers one request's top-k rows on a shard and emits a signed record per full chunk.

    Positions must follow each other; a call that starts elsewhere (a replay) first seals what is
    pending, so every record covers consecutive positions.
    """

    identity: Identity
    binding: Binding
    k: int = TOPK
    chunk: int = CHUNK
    _idx: list[torch.Tensor] = field(default_factory=list)
    _val: list[torch.Tensor] = field(default_factory=list)
    _pos0: int | None = None
    _count: int = 0
    _next_chunk: int = 0
    emitted_bytes: int = 0
    committed_tokens: int = 0

    def push(self, first_position: int, rows: torch.Tensor) -> list[dict[str, Any]]:
        """Add output rows at positions ``first_position ..``; returns the records now complete."""
        out: list[dict[str, Any]] = []
        if self._pos0 is not None and first_position != self._pos0 + self._count:
            out += self.flush()
        idx, val = topk_rows(rows, self.k)
        if self._pos0 is None:
            self._pos0 = first_position
        self._idx.append(idx)
        self._val.append(val)
        self._count += idx.shape[0]
        while self._count >= self.chunk:
            out.append(self._seal(self.chunk))
        return out

    def flush(self) -> list[dict[str, Any]]:
        """Seal the pending rows (the end of the request)."""
        return [self._seal(self._count)] if self._count else []

    def _seal(self, n: int) -> dict[str, Any]:
        idx, val = torch.cat(self._idx), torch.cat(self._val)
        rec = make_commitment(self.identity, self.binding, self._pos0, self._next_chunk, idx[:n], val[:n])
        self._next_chunk += 1
        self._idx, self._val = ([idx[n:]], [val[n:]]) if n < idx.shape[0] else ([], [])
        self._count -= n
        self._pos0 = self._pos0 + n if self._count else None
        self.emitted_bytes += record_size(rec)
        self.committed_tokens += n
        return rec


def open_all(records: Sequence[Any], binding: Binding, signer: str | None = None
             ) -> tuple[list[Commitment], list[str]]:
    """Open every record; returns the good ones and the reasons the others were rejected."""
    good, bad = [], []
    for i, r in enumerate(records):
        try:
            good.append(open_commitment(r, binding, signer=signer))
        except BadCommitment as exc:
            bad.append(f"record {i}: {exc}")
    return good, bad
