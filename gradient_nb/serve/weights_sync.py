"""Model synchronization (Lattica's content layer): a peer without the model fetches the layers it is
assigned from the peers that have them, as hash-verified chunks found through the DHT.

What travels is described in ``models/manifest.py``: every tensor is a run of 1 MiB chunks named by
their sha256, listed in a manifest whose own sha256 is its id. This module moves those chunks.

- **Providers.** Every serving peer runs a :class:`ContentServer` over its model folder. It answers
  ``models.chunk`` (``{"id": <sha256>}`` -> the chunk's bytes as one uint8 tensor; the manifest id names
  the manifest itself), refusing requests over 4 KiB and callers over 200 chunks a second, and provides
  the DHT key ``model:<name>`` with a record, signed by the provider as every DHT record is, naming the
  manifest id, the model's content hash and the parts it holds. A peer that fetched layers 12..15
  provides exactly those, so every volunteer becomes a source for the next one.
- **Which manifest.** :func:`find_model` looks the name up in the DHT and takes the manifest id that
  the most providers vouch for (or the one pinned by the caller). Peers holding the same weights derive
  the same manifest, so one id gathers every honest provider; the trust is the same as the mesh's
  serving records (each peer states what it serves), made checkable byte by byte.
- **Fetching.** The chunks of the parts still missing are spread over every provider that holds them,
  :data:`IN_FLIGHT` requests in flight per provider, from one shared queue: a fast provider takes more
  and a slow one holds up no more than its own requests. Each chunk is checked against its address
  before it is written; a provider that sends a wrong chunk is dropped at once (counted in
  ``rejected``) and the chunk goes back to the queue for the others; one whose calls fail is dropped
  after :data:`FAILURES_BEFORE_DROP` failures. A part's file appears only when all its chunks passed.
- **Progress.** A :class:`SyncProgress` after every chunk: bytes done of the total, bytes per provider,
  rejected chunks, dropped providers. The serving peer keeps the last one in its status and registry
  record (``weights_sync``), and ``gradient-nb peer`` prints it.

Why not torch.save/pickle of shards (the usual "send the state dict"): unpickling remote bytes executes
them. Why not a whole-file download (HTTP range, BitTorrent pieces across files): a peer assigned 3 of 30
layers needs 3/30 of the bytes, and one bad byte must cost one chunk, not the file.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from ..mesh.errors import MeshError, RemoteError
from ..mesh.frames import Message
from ..mesh.peer import Mesh
from ..mesh.rpc import CallContext, Limit
from ..mesh.tasks import cancel_and_wait
from ..models import DEFAULT_MODEL, ModelInfo, model_info, resolve_model
from ..models import manifest as mf
from ..models.loader import home, weight_files

log = logging.getLogger(__name__)

SERVICE = "models.chunk"
CHUNK_LIMIT = Limit(rate=200.0, burst=400.0, max_bytes=4096)
IN_FLIGHT = 4  # requests in flight per provider
MAX_PROVIDERS = 16
FAILURES_BEFORE_DROP = 3
CALL_TIMEOUT = 60.0  # one chunk (1 MiB): generous for a TURN-relayed link at a few hundred KB/s
PROVIDE_TTL = 600.0
RATE_LIMITED_PAUSE = 0.5
_HEX64 = re.compile(r"[0-9a-f]{64}")


class SyncError(RuntimeError):
    """Weights could not be fetched (no provider, or none left that holds a chunk)."""


def dht_key(model: str) -> str:
    return f"model:{model}"


def synced_folder(model: str, manifest_id: str) -> Path:
    return home() / "synced" / f"{model}-{manifest_id[:16]}"


# ------------------------------------------------------------------------------------------ progress


@dataclass
class SyncProgress:
    model: str
    what: str  # "manifest" or "layers 12..15"
    total_bytes: int
    chunks_total: int
    providers: int
    done_bytes: int = 0
    chunks_done: int = 0
    rejected: int = 0  # chunks whose bytes did not hash to their address
    by_peer: dict[str, int] = field(default_factory=dict)  # verified bytes from each provider
    dropped: dict[str, str] = field(default_factory=dict)  # provider -> why it was dropped
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    finished: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "what": self.what, "total_bytes": self.total_bytes,
                "done_bytes": self.done_bytes, "chunks_total": self.chunks_total, "chunks_done": self.chunks_done,
                "providers": self.providers, "rejected": self.rejected, "by_peer": dict(self.by_peer),
                "dropped": dict(self.dropped), "seconds": round(self.seconds, 3), "finished": self.finished}

    def line(self) -> str:
        mib = 1 << 20
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        rate = self.done_bytes / mib / self.seconds if self.seconds > 0 else 0.0
        text = (f"weights: {self.what} of {self.model}: {self.done_bytes / mib:.1f} of {self.total_bytes / mib:.1f} "
                f"MiB ({pct:.0f}%) from {len(self.by_peer)} of {self.providers} peers, {rate:.1f} MiB/s")
        if self.rejected:
            text += f", {self.rejected} bad chunks rejected"
        if self.dropped:
            text += f", dropped {', '.join(p[:8] for p in self.dropped)}"
        return text + (" - done" if self.finished else "")


def progress_printer(stream: TextIO | None = None, step: float = 10.0) -> Callable[[SyncProgress], None]:
    """A progress callback that prints a line every ``step`` percent and when a fetch ends."""
    last: dict[str, float] = {}

    def show(p: SyncProgress) -> None:
        pct = 100.0 * p.done_bytes / p.total_bytes if p.total_bytes else 100.0
        key = f"{p.model}/{p.what}"
        if p.finished or pct >= last.get(key, -step) + step:
            last[key] = pct
            print(p.line(), file=stream or sys.stderr, flush=True)

    return show


# ----------------------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class Provider:
    peer: str
    manifest: str
    content_hash: str
    parts: frozenset[str]  # "*" stands for every part (a provider with the whole model)

    def holds(self, part: str | None) -> bool:
        return part is None or "*" in self.parts or part in self.parts


def _encode_parts(parts: set[str], manifest: mf.Manifest) -> dict[str, Any]:
    every = set(manifest.parts())
    if parts >= every:
        return {"all": True}
    layers = sorted(int(p[6:]) for p in parts if p.startswith("layer."))
    ranges: list[list[int]] = []
    for i in layers:
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return {"layers": ranges, **{p: True for p in ("embed", "head", "other") if p in parts}}


def _decode_parts(value: dict[str, Any]) -> frozenset[str]:
    if value.get("all") is True:
        return frozenset({"*"})
    out: set[str] = {p for p in ("embed", "head", "other") if value.get(p) is True}
    ranges = value.get("layers")
    if isinstance(ranges, list):
        for r in ranges[:256]:
            if isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in r) and 0 <= r[0] < r[1] <= r[0] + 4096:
                out.update(f"layer.{i}" for i in range(r[0], r[1]))
    return frozenset(out)


async def find_providers(mesh: Mesh, model: str, *, manifest_id: str | None = None,
                         timeout: float = 10.0) -> list[Provider]:
    """The peers whose (verified, signed) DHT records say they provide ``model``, this one excluded."""
    out = []
    for rec in await mesh.dht.find_providers(dht_key(model), timeout=timeout):
        value, peer = rec["value"], rec["provider"]
        mid, chash = value.get("manifest"), value.get("hash")
        if peer == mesh.id or not isinstance(mid, str) or not _HEX64.fullmatch(mid) or \
                not isinstance(chash, str) or not _HEX64.fullmatch(chash):
            continue
        if manifest_id is None or mid == manifest_id:
            out.append(Provider(peer, mid, chash, _decode_parts(value)))
    return out


def choose_manifest(providers: list[Provider]) -> str:
    """The manifest id most providers vouch for (ties: the one whose providers hold the most parts)."""
    votes = collections.Counter(p.manifest for p in providers)
    return max(votes, key=lambda m: (votes[m], sum(len(p.parts) for p in providers if p.manifest == m), m))


# ------------------------------------------------------------------------------------------- serving


class ContentServer:
    """Serves the chunks of the model folder ``folder`` (``models.chunk``) and provides them in the DHT."""

    def __init__(self, mesh: Mesh, folder: Path, info: ModelInfo) -> None:
        self.mesh, self.folder, self.info = mesh, Path(folder), info
        self.manifest: mf.Manifest | None = None
        self.parts: set[str] = set()
        self._where: dict[str, mf.Location] = {}
        self._task: asyncio.Task | None = None
        self.served_chunks = 0
        self.served_bytes = 0

    def start(self) -> ContentServer:
        """Index (hash the folder the first time, in a thread), then offer and provide, in the background."""
        self.mesh.services.limit(SERVICE, CHUNK_LIMIT)
        self._task = asyncio.ensure_future(self._index_and_provide())
        return self

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if SERVICE in self.mesh.services.names():
            self.mesh.withdraw(SERVICE)
        self.mesh.dht.unprovide(dht_key(self.info.name))

    async def refresh(self) -> None:
        """Re-read which parts the folder holds (after a fetch) and provide them, in the background."""
        await cancel_and_wait(self._task)
        self._task = asyncio.ensure_future(self._index_and_provide())

    async def _index_and_provide(self) -> None:
        try:
            self.manifest, self._where, self.parts = await asyncio.to_thread(self._index)
        except (OSError, mf.ManifestError) as exc:
            log.warning("not providing %s's weights: %s", self.info.name, exc)
            return
        self.mesh.offer(SERVICE, self._serve)
        value = {"manifest": self.manifest.id, "hash": self.manifest.content_hash,
                 **_encode_parts(self.parts, self.manifest)}
        try:
            await self.mesh.dht.provide(dht_key(self.info.name), value, ttl=PROVIDE_TTL)
        except (MeshError, TimeoutError, ValueError) as exc:  # the DHT republishes on its own schedule
            log.warning("providing %s in the DHT failed: %s", self.info.name, exc)

    def _index(self) -> tuple[mf.Manifest, dict[str, mf.Location], set[str]]:
        if mf.is_synced(self.folder):
            m = mf.read_synced(self.folder)
            where, parts = mf.locate_chunks(self.folder, m, weight_files(self.folder, missing_ok=True))
            return m, where, parts
        # A source folder: hashed once, the manifest cached beside the weights (which never change in place).
        cache = self.folder / f".manifest-{self.info.content_hash[:16]}.msgpack"
        files = weight_files(self.folder)
        if cache.is_file():
            raw = cache.read_bytes()
            try:
                m = mf.decode(raw, mf.sha256_hex(raw))
                where, parts = mf.locate_chunks(self.folder, m, files)
                if m.content_hash == self.info.content_hash and parts == set(m.parts()):
                    return m, where, parts
            except mf.ManifestError:
                pass
        m, where = mf.build_manifest(self.folder, self.info.name, files, self.info.content_hash,
                                     self.info.num_layers)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".manifest.")
            with os.fdopen(fd, "wb") as f:
                f.write(m.raw)
            os.replace(tmp, cache)
        except OSError:  # a read-only folder: hash again next time
            pass
        return m, where, set(m.parts())

    async def _serve(self, msg: Message, ctx: CallContext) -> Message:
        cid = msg.header.get("id")
        if not isinstance(cid, str) or not _HEX64.fullmatch(cid):
            raise ValueError("models.chunk takes {'id': <64 hex digits>}")
        m = self.manifest
        if m is not None and cid == m.id:
            data = m.raw
        else:
            loc = self._where.get(cid)
            if loc is None:
                raise LookupError(f"this peer holds no chunk {cid[:16]}")
            data = await asyncio.to_thread(_read, *loc)
        self.served_chunks += 1
        self.served_bytes += len(data)
        return Message({"n": len(data)}, {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8)})


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


# ------------------------------------------------------------------------------------------ fetching


class _BadChunk(Exception):
    pass


@dataclass(eq=False)
class _Job:
    address: str
    length: int  # exact length, or the bound when ``exact`` is False (the manifest)
    part: str | None  # None: every provider of the manifest has it (the manifest, the small files)
    sink: Callable[[bytes], None]
    exact: bool = True
    tried: set[str] = field(default_factory=set)  # providers that do not hold it


async def _get_chunk(mesh: Mesh, peer: str, job: _Job) -> bytes:
    reply = await mesh.call(peer, SERVICE, Message({"id": job.address}), timeout=CALL_TIMEOUT)
    t = reply.tensors.get("data")
    if t is None or t.dtype != torch.uint8 or t.dim() != 1 or \
            (t.numel() != job.length if job.exact else t.numel() > job.length):
        raise _BadChunk(f"a reply that is not the {job.length} bytes asked for")
    data = t.numpy().tobytes()
    if mf.sha256_hex(data) != job.address:
        raise _BadChunk(f"chunk {job.address[:16]}'s bytes do not hash to its address")
    return data


async def fetch_chunks(mesh: Mesh, jobs: list[_Job], providers: list[Provider], progress: SyncProgress,
                       on_progress: Callable[[SyncProgress], None] | None = None) -> None:
    """Fetch every job's chunk from ``providers`` (see the module doc); raises SyncError for chunks that no
    provider left could give."""
    pending = collections.deque(jobs)
    changed = asyncio.Event()
    failures: collections.Counter[str] = collections.Counter()
    inflight = 0

    def take(p: Provider) -> _Job | None:
        for i, job in enumerate(pending):
            if p.holds(job.part) and p.peer not in job.tried:
                del pending[i]
                return job
        return None

    def drop(p: Provider, why: str) -> None:
        if p.peer not in progress.dropped:
            progress.dropped[p.peer] = why
            log.warning("weights: dropped provider %s: %s", p.peer[:8], why)

    async def worker(p: Provider) -> None:
        nonlocal inflight
        while p.peer not in progress.dropped:
            job = take(p)
            if job is None:
                if inflight == 0:
                    return
                changed.clear()
                await changed.wait()
                continue
            inflight += 1
            try:
                data = await _get_chunk(mesh, p.peer, job)
            except _BadChunk as exc:
                progress.rejected += 1
                job.tried.add(p.peer)
                pending.appendleft(job)
                drop(p, str(exc))
            except (MeshError, TimeoutError) as exc:
                pending.appendleft(job)
                if isinstance(exc, RemoteError) and exc.code == "RateLimited":
                    await asyncio.sleep(RATE_LIMITED_PAUSE)  # we asked too fast: not the provider's fault
                    continue
                if isinstance(exc, RemoteError) and exc.code == "LookupError":
                    job.tried.add(p.peer)  # it does not hold this one after all
                failures[p.peer] += 1
                if failures[p.peer] >= FAILURES_BEFORE_DROP:
                    drop(p, f"{type(exc).__name__}: {exc}")
            else:
                try:
                    job.sink(data)
                except OSError as exc:  # a full disk, say: no provider can help with that
                    raise SyncError(f"could not write the fetched weights: {exc}") from exc
                progress.done_bytes += len(data)
                progress.chunks_done += 1
                progress.by_peer[p.peer] = progress.by_peer.get(p.peer, 0) + len(data)
                progress.seconds = time.monotonic() - progress.started
                if on_progress is not None:
                    on_progress(progress)
            finally:
                inflight -= 1
                changed.set()

    tasks = [asyncio.ensure_future(worker(p)) for p in providers[:MAX_PROVIDERS] for _ in range(IN_FLIGHT)]
    try:
        await asyncio.gather(*tasks)
    finally:  # one failed, or our caller was cancelled: the others stop too
        for t in tasks:
            await cancel_and_wait(t)
    if pending:
        why = "; ".join(f"{k[:8]}: {v}" for k, v in progress.dropped.items()) or "no provider holds them"
        raise SyncError(f"{len(pending)} chunks of {progress.model} ({progress.what}) could not be fetched ({why})")


async def _providers_for(mesh: Mesh, model: str, manifest_id: str | None, timeout: float) -> list[Provider]:
    """Providers of ``model``, waiting up to ``timeout`` for the first (the DHT fills as links appear)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await find_providers(mesh, model, manifest_id=manifest_id,
                                     timeout=max(1.0, min(10.0, deadline - time.monotonic())))
        if found or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(1.0)


async def find_model(mesh: Mesh, model: str | None = None, *, manifest_id: str | None = None,
                     timeout: float = 60.0) -> Path:
    """A local folder for ``model``: this machine's copy when it has one, else a synced folder whose
    manifest and small files (config, tokenizer) were just fetched from the model's providers on the mesh;
    its layers are fetched when they are needed (:class:`WeightFetcher`)."""
    name = model or DEFAULT_MODEL
    try:
        return await asyncio.to_thread(resolve_model, name)
    except FileNotFoundError as exc:
        local_error = exc
    if not mf.valid_model_name(name) or Path(name).expanduser().exists():
        raise local_error  # a path or file that is not a model: nothing the mesh could give
    providers = await _providers_for(mesh, name, manifest_id, timeout)
    if not providers:
        raise FileNotFoundError(f"{local_error}; and no peer of mesh {mesh.mesh_name!r} provides {name!r} "
                                f"(looked for {timeout:.0f} s)")
    mid = manifest_id or choose_manifest(providers)
    folder = synced_folder(name, mid)
    if mf.is_synced(folder) and mf.read_synced(folder).id == mid:
        return folder
    providers = [p for p in providers if p.manifest == mid]
    progress = SyncProgress(name, "manifest", 0, 1, len(providers))
    got: list[bytes] = []
    await fetch_chunks(mesh, [_Job(mid, mf.MAX_MANIFEST_BYTES, None, got.append, exact=False)], providers, progress)
    m = mf.decode(got[0], mid)
    if m.model != name:
        raise SyncError(f"the manifest {mid[:16]} is for {m.model!r}, not {name!r}")
    files: dict[str, dict[int, bytes]] = {f.name: {} for f in m.files}
    jobs = [_Job(h, min(m.chunk_bytes, f.size - k * m.chunk_bytes), None,
                 lambda data, f=f, k=k: files[f.name].__setitem__(k, data))
            for f in m.files for k, h in enumerate(f.chunks)]
    progress = SyncProgress(name, "config and tokenizer", sum(f.size for f in m.files), len(jobs), len(providers))
    await fetch_chunks(mesh, jobs, [p for p in providers if p.content_hash == m.content_hash], progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for f in m.files:
            (tmp / f.name).write_bytes(b"".join(files[f.name][k] for k in range(len(f.chunks))))
        (tmp / mf.HASH_FILE).write_text(m.content_hash)
        (tmp / mf.SYNCED_MANIFEST).write_bytes(m.raw)
        info = await asyncio.to_thread(model_info, tmp)  # the config must describe what the manifest lists
        if info.num_layers != m.num_layers:
            raise SyncError(f"the manifest says {m.num_layers} layers, its config.json {info.num_layers}")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first
            if not (mf.is_synced(folder) and mf.read_synced(folder).id == mid):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("weights: %s's manifest %s from %d providers; layers are fetched when assigned", name, mid[:16],
             len(providers))
    return folder


class WeightFetcher:
    """Fetches the parts of a synced folder's model that a layer range needs."""

    def __init__(self, mesh: Mesh, folder: Path,
                 on_progress: Callable[[SyncProgress], None] | None = None) -> None:
        self.mesh, self.folder = mesh, Path(folder)
        self.manifest = mf.read_synced(self.folder)
        self.on_progress = on_progress
        self.last: SyncProgress | None = None

    def missing(self, start: int, end: int) -> list[str]:
        have = mf.present_parts(self.folder, self.manifest)
        return [p for p in self.manifest.parts_for_layers(start, end) if p not in have]

    async def fetch_layers(self, start: int, end: int, *, timeout: float = 60.0) -> SyncProgress | None:
        """Make sure the parts of layers ``[start, end)`` are here; None when they already were."""
        parts = self.missing(start, end)
        if not parts:
            return None
        m = self.manifest
        providers = [p for p in await _providers_for(self.mesh, m.model, m.id, timeout)
                     if p.content_hash == m.content_hash]
        by_part = m.parts()
        jobs: list[_Job] = []
        writers: dict[str, mf.PartWriter] = {}
        progress = SyncProgress(m.model, f"layers {start}..{end}", sum(m.part_bytes(p) for p in parts), 0,
                                len(providers))

        def sink(w: mf.PartWriter, tensor: str, k: int) -> Callable[[bytes], None]:
            def put(data: bytes) -> None:
                w.write(tensor, k, data)
                if not w.remaining:
                    w.finish()  # complete and verified: the part file appears
            return put

        try:
            for part in parts:
                w = writers[part] = mf.PartWriter(self.folder, part, by_part[part], m.chunk_bytes)
                for t in by_part[part]:
                    jobs += [_Job(h, min(m.chunk_bytes, t.nbytes - k * m.chunk_bytes), part, sink(w, t.name, k))
                             for k, h in enumerate(t.chunks)]
                if not w.remaining:
                    w.finish()
            progress.chunks_total = len(jobs)
            self.last = progress
            if not providers:
                raise SyncError(f"no peer provides {m.model} (manifest {m.id[:16]})")
            await fetch_chunks(self.mesh, jobs, providers, progress, self.on_progress)
        finally:
            for w in writers.values():
                w.abort()  # a no-op for finished parts
        progress.finished = True
        progress.seconds = time.monotonic() - progress.started
        if self.on_progress is not None:
            self.on_progress(progress)
        return progress
