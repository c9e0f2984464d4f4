"""Weight sync: versioned adapter blobs, hashed and signed by the trainer, fetched in chunks by samplers.

The trainer publishes each policy version as one blob: the adapter's safetensors bytes (never a pickle;
``safetensors.torch.load`` of bytes executes nothing). Its announcement is a record signed with the
trainer's mesh identity::

    {"run": RUN, "version": V, "sha256": HEX, "size": BYTES, "chunks": N, "config": JSON-TEXT}

A sampler verifies the signature (and that the signer is the trainer it is bound to), then fetches the
N chunks with ``echo.chunk`` calls (``{"run", "version", "index"}`` -> a uint8 tensor of at most
``CHUNK_BYTES``), each under the time left to one overall deadline. The assembled blob must have exactly
``size`` bytes and the announced sha256, else it is rejected with ``BlobRejected`` naming what is wrong
(truncated, tampered, wrong signer). A sync that does not finish by its deadline raises ``SyncTimeout``
— never a silent hang (TRL #6797, #7103, #2923 hang forever in NCCL broadcasts without an error).

The trainer keeps the last ``keep`` versions, so a sampler a version or two behind can still fetch one
while a new one is being published; older ones answer ``UnknownVersion``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..mesh.errors import MeshError, SignatureInvalid
from ..mesh.frames import Message
from ..mesh.identity import Identity, sign_record, verify_record
from ..mesh.rpc import CallContext
from ..models.adapter import AdapterError, LoraAdapter, adapter_from_bytes

CHUNK_BYTES = 1 << 20
MAX_BLOB_BYTES = 1 << 30
CHUNK_METHOD = "echo.chunk"


class SyncError(MeshError):
    """A weight sync failed (the sampler must not produce rollouts of a version it does not hold)."""


class SyncTimeout(SyncError, TimeoutError):
    """The sync did not finish by its deadline."""


class BlobRejected(SyncError):
    """The fetched blob is not what the trainer signed: truncated, tampered or badly signed."""


class UnknownVersion(SyncError):
    pass


@dataclass(frozen=True)
class Announcement:
    run: str
    version: int
    sha256: str
    size: int
    chunks: int
    config: str
    trainer: str  # peer id of the signer
    record: dict[str, Any]  # the signed record, as it travels


def announce(identity: Identity, run: str, version: int, config: bytes, blob: bytes) -> Announcement:
    payload = {"run": run, "version": int(version), "sha256": hashlib.sha256(blob).hexdigest(),
               "size": len(blob), "chunks": max(1, -(-len(blob) // CHUNK_BYTES)), "config": config.decode()}
    return check_announcement(sign_record(identity, payload), identity.peer_id)


def check_announcement(record: Any, trainer: str) -> Announcement:
    """The announcement in a signed record, which must be signed by ``trainer`` (raises BlobRejected)."""
    try:
        p = verify_record(record, expect_peer_id=trainer)
    except SignatureInvalid as exc:
        raise BlobRejected(f"the version announcement is not signed by the trainer {trainer[:8]}: {exc}") from None
    run, version, sha, size, chunks, config = (p.get(k) for k in ("run", "version", "sha256", "size", "chunks",
                                                                  "config"))
    if not (isinstance(run, str) and isinstance(version, int) and version >= 0 and isinstance(sha, str)
            and len(sha) == 64 and isinstance(size, int) and 0 < size <= MAX_BLOB_BYTES
            and isinstance(chunks, int) and chunks == max(1, -(-size // CHUNK_BYTES)) and isinstance(config, str)):
        raise BlobRejected("the version announcement is malformed")
    return Announcement(run, version, sha, size, chunks, config, trainer, record)


class Publisher:
    """The trainer's side: signs versions and serves their chunks (``echo.chunk``)."""

    def __init__(self, mesh: Any, run: str, keep: int = 8) -> None:
        self.mesh = mesh
        self.run = run
        self.keep = keep
        self._blobs: OrderedDict[int, bytes] = OrderedDict()
        self.latest: Announcement | None = None
        self.chunks_served = 0
        mesh.offer(CHUNK_METHOD, self._chunk)

    def publish(self, version: int, config: bytes, blob: bytes) -> Announcement:
        a = announce(self.mesh.identity, self.run, version, config, blob)
        self._blobs[version] = blob
        while len(self._blobs) > self.keep:
            self._blobs.popitem(last=False)
        self.latest = a
        return a

    def close(self) -> None:
        self.mesh.withdraw(CHUNK_METHOD)

    async def _chunk(self, msg: Message, ctx: CallContext) -> Message:
        h = msg.header
        version, index = h.get("version"), h.get("index")
        if h.get("run") != self.run or not isinstance(version, int) or version not in self._blobs:
            raise UnknownVersion(f"this trainer does not hold version {version!r} of run {h.get('run')!r}")
        blob = self._blobs[version]
        if not isinstance(index, int) or not 0 <= index * CHUNK_BYTES < len(blob):
            raise ValueError(f"chunk index {index!r} is out of range")
        self.chunks_served += 1
        part = blob[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES]
        return Message({"index": index}, {"chunk": torch.frombuffer(bytearray(part), dtype=torch.uint8)})


def assemble(a: Announcement, parts: list[bytes]) -> LoraAdapter:
    """Check the fetched bytes against the signed announcement and parse the adapter."""
    blob = b"".join(parts)
    if len(blob) != a.size:
        raise BlobRejected(f"adapter version {a.version} is truncated or padded: {len(blob)} bytes, "
                           f"the trainer signed {a.size}")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != a.sha256:
        raise BlobRejected(f"adapter version {a.version} was tampered with: sha256 {digest[:12]}…, "
                           f"the trainer signed {a.sha256[:12]}…")
    try:
        return adapter_from_bytes(a.config, blob)
    except AdapterError as exc:
        raise BlobRejected(f"adapter version {a.version}: {exc}") from None


async def fetch(mesh: Any, a: Announcement, deadline_s: float) -> tuple[LoraAdapter, float, int]:
    """Fetch and check version ``a`` from its trainer; returns (adapter, seconds, bytes).
    Raises SyncTimeout past ``deadline_s``, BlobRejected for bad bytes, SyncError otherwise."""
    t0 = time.monotonic()
    end = t0 + deadline_s
    parts: list[bytes] = []
    try:
        async with asyncio.timeout(deadline_s):
            for i in range(a.chunks):
                left = max(0.05, end - time.monotonic())
                reply = await mesh.call(a.trainer, CHUNK_METHOD,
                                        Message({"run": a.run, "version": a.version, "index": i}), timeout=left)
                chunk = reply.tensors.get("chunk")
                if chunk is None or chunk.dtype != torch.uint8 or chunk.dim() != 1 or \
                        sum(map(len, parts)) + chunk.numel() > a.size:
                    raise BlobRejected(f"chunk {i} of version {a.version} is malformed or too long")
                parts.append(chunk.numpy().tobytes())
    except TimeoutError:
        raise SyncTimeout(f"weight sync of version {a.version} from trainer {a.trainer[:8]} did not finish "
                          f"within {deadline_s:.1f} s ({len(parts)}/{a.chunks} chunks)") from None
    except SyncError:
        raise
    except MeshError as exc:
        raise SyncError(f"weight sync of version {a.version} from trainer {a.trainer[:8]} failed: {exc}") from None
    adapter = await asyncio.to_thread(assemble, a, parts)
    return adapter, time.monotonic() - t0, a.size
