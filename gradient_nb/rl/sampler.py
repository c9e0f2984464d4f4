"""A serving peer as an RL sampler: it serves the policy's current adapter version, merged into its layers.

``attach_sampler(serving_peer)`` (the CLI does it for every ``gradient-nb peer --serve``, so volunteers
are samplers with no other flag) adds:

- ``echo.sync`` — a trainer sends a signed version announcement (``weights.py``) and a deadline; the
  peer fetches the chunks from that trainer, checks size, sha256 and signature, and merges the adapter
  into the layers it holds (only those layers' matrices; on the model thread, between batched steps).
  A sync that fails — deadline, tampered or truncated blob — raises to the trainer AND leaves this
  peer without a version: it stops producing rollouts rather than produce stale ones silently.
- a tag on every ``shard.forward`` reply, ``"echo": [run, version]``, which the trainer's
  ``VersionGuard`` checks on every stage of every step, so a rollout never mixes versions.
- a lease: the peer is bound to the trainer that synced it; when that trainer has not synced it for
  the lease (it crashed, or the run ended), the peer restores its base weights and drops the tag, so
  the end of a run (or a dead trainer) can never leave samplers serving a stale policy or waiting on
  anyone. Another trainer's sync is refused while the lease runs (``SamplerBusy``). The trainer may ask
  for a shorter lease with each sync (``lease_s``, its ``sampler_lease_s``); this peer's ``lease_s`` is
  the most it grants.

A fixed adapter (``gradient-nb serve --adapter PATH``, ``%%parallax serve`` with ``adapter: PATH``) is
served the same way, with the tag ``[adapter-name, 0]`` and no lease; the peer's ``echo`` record names it
by ``adapter_id`` (a hash of its files), so an entry that serves that adapter routes only through peers
serving the same one (``AdapterGuard``), never half through the base weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..mesh.frames import Message
from ..mesh.rpc import CallContext
from ..mesh.tasks import cancel_and_wait
from ..models.adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterMerge, LoraAdapter, load_adapter
from ..models.loader import ShardModel
from .weights import SyncError, check_announcement, fetch

log = logging.getLogger(__name__)

SYNC_METHOD = "echo.sync"
DEFAULT_LEASE_S = 60.0
MAX_SYNC_DEADLINE_S = 600.0


class SamplerBusy(RuntimeError):
    """This peer samples for another trainer's run."""


class SamplerService:
    """The sampler side of Echo on one serving peer (a ``ShardObserver`` plus ``echo.sync``)."""

    def __init__(self, server: Any, *, lease_s: float = DEFAULT_LEASE_S, adapter: LoraAdapter | None = None,
                 adapter_name: str = "adapter", adapter_id: str | None = None) -> None:
        self.server = server
        self.mesh = server.mesh
        self.lease_s = lease_s
        self.fixed = adapter
        self.fixed_id = adapter_id if adapter is not None else None
        self.adapter: LoraAdapter | None = adapter
        self.fixed_tag: list[Any] | None = [adapter_name, 0] if adapter is not None else None
        self.tag: list[Any] | None = self.fixed_tag
        self.trainer: str | None = None
        self.lease_now = lease_s  # the lease of the current binding (what the trainer asked, at most lease_s)
        self.last_sync = 0.0
        self.syncs = 0
        self.failures: list[str] = []
        self.state = "fixed adapter" if adapter is not None else "idle"
        self._merge: AdapterMerge | None = None
        self._watch: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # -- ShardObserver ---------------------------------------------------------------------------
    def on_load(self, shard: ShardModel) -> ShardModel:
        self._merge = AdapterMerge(shard.layers, shard.start)
        self._merge.apply(self.adapter)
        return shard

    def on_forward(self, key: str, entry: int, end: int, pos: int, tokens: int, output: torch.Tensor,
                   is_last: bool) -> dict[str, Any]:
        return {"echo": list(self.tag)} if self.tag is not None else {}

    def on_drop(self, key: str) -> dict[str, Any]:
        return {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, *, sync: bool = True) -> SamplerService:
        """Watch the server's shard; ``sync=False``: serve the fixed adapter only, no trainer can sync it."""
        self.server.observers.append(self)
        if sync:
            self.mesh.offer(SYNC_METHOD, self._sync)
        if self.fixed is not None:
            self._publish()
        return self

    async def stop(self) -> None:
        await cancel_and_wait(self._watch)
        self._watch = None
        with contextlib.suppress(Exception):
            self.mesh.withdraw(SYNC_METHOD)

    async def _apply(self, adapter: LoraAdapter | None) -> None:
        rt = self.server.runtime
        self.adapter = adapter
        if self._merge is None:
            return  # no layers yet: on_load merges it
        if rt is not None:
            await rt.run(self._merge.apply, adapter)  # between batched steps, on the model thread
        else:
            self._merge.apply(adapter)

    async def _unbind(self, why: str) -> None:
        self.tag = None  # first: no forward reply may carry the version any more
        self.trainer = None
        self.state = why
        self._publish()
        await self._apply(self.fixed)
        if self.fixed is not None:
            self.tag, self.state = self.fixed_tag, f"fixed adapter ({why})"
            self._publish()

    def _publish(self) -> None:
        fixed = self.fixed_id if self.tag is not None and self.tag == self.fixed_tag else None
        self.mesh.publish(echo={"state": self.state, "tag": self.tag, "trainer": self.trainer, "adapter_id": fixed})

    async def _sync(self, msg: Message, ctx: CallContext) -> Message:
        deadline = msg.header.get("deadline_s")
        if not isinstance(deadline, int | float) or not 0 < deadline <= MAX_SYNC_DEADLINE_S:
            raise ValueError(f"deadline_s must be in (0, {MAX_SYNC_DEADLINE_S}]")
        lease = msg.header.get("lease_s", self.lease_s)
        if not isinstance(lease, int | float) or isinstance(lease, bool) or not lease > 0:
            raise ValueError("lease_s must be a number of seconds > 0")
        lease = min(float(lease), self.lease_s)
        if self.trainer is not None and self.trainer != ctx.peer_id and \
                time.monotonic() - self.last_sync < self.lease_now:
            raise SamplerBusy(f"this peer samples for trainer {self.trainer[:8]} until its lease ends")
        a = check_announcement(msg.header.get("announcement"), ctx.peer_id)
        async with self._lock:
            if self.trainer == ctx.peer_id and self.tag == [a.run, a.version]:
                self.last_sync, self.lease_now = time.monotonic(), lease  # renews the lease
                return Message({"version": a.version, "fetched": False, "sync_ms": 0.0, "bytes": 0})
            self.tag = None  # from here until the new version is merged, no rollout is tagged at all
            try:
                adapter, seconds, nbytes = await fetch(self.mesh, a, float(deadline))
                await self._apply(adapter)
            except (SyncError, Exception) as exc:
                self.failures.append(str(exc))
                await self._unbind(f"stopped: {exc}")
                log.error("weight sync failed, this peer produces no rollouts: %s", exc)
                raise
            self.trainer, self.tag, self.last_sync = ctx.peer_id, [a.run, a.version], time.monotonic()
            self.lease_now = lease
            self.syncs += 1
            self.state = f"sampling {a.run} v{a.version}"
            self._publish()
            if self._watch is None or self._watch.done():
                self._watch = asyncio.ensure_future(self._lease())
            return Message({"version": a.version, "fetched": True, "sync_ms": 1000 * seconds, "bytes": nbytes})

    async def _lease(self) -> None:
        while self.trainer is not None:
            left = self.lease_now - (time.monotonic() - self.last_sync)
            if left <= 0:
                log.warning("no sync from trainer %s for %.1f s: back to the base weights", self.trainer[:8],
                            self.lease_now)
                await self._unbind(f"stopped: no sync from the trainer for {self.lease_now:.1f} s")
                return
            await asyncio.sleep(min(left, 1.0))


def adapter_id(path: str | Path) -> str:
    """What names an adapter folder on the mesh: the sha256 of its config and weights files (16 hex digits)."""
    p = Path(path).expanduser()
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update((p / name).read_bytes())
    return h.hexdigest()[:16]


def attach_sampler(server: Any, *, adapter: str | Path | None = None, lease_s: float = DEFAULT_LEASE_S,
                   sync: bool = True) -> SamplerService:
    """Make a ``ServingPeer`` (before ``start()``) an RL sampler; ``adapter`` serves a fixed LoRA adapter;
    ``sync=False`` serves only that adapter (no trainer can sync the peer)."""
    fixed = load_adapter(adapter) if adapter is not None else None
    name = Path(adapter).name if adapter is not None else "adapter"
    aid = adapter_id(adapter) if adapter is not None else None
    return SamplerService(server, lease_s=lease_s, adapter=fixed, adapter_name=name, adapter_id=aid).start(sync=sync)


class AdapterGuard:
    """A ``RequestObserver`` on an entry that serves the fixed adapter ``adapter_id``: routing avoids every
    serving peer whose ``echo`` record does not say it serves that adapter now (a peer of the base model,
    another adapter, or one a trainer's run holds), so no request mixes the adapter's layers with others.
    With ``adapter_id=None`` (an entry of the base model) it avoids the peers that serve a fixed adapter.
    (Peers a trainer's run holds serve its current policy to a base entry, as the README says.)"""

    name = "adapter"

    def __init__(self, mesh: Any, adapter_id: str | None) -> None:
        self.mesh = mesh
        self.adapter_id = adapter_id

    def avoided_peers(self) -> set[str]:
        out = set()
        for pid, rec in self.mesh.state.peers().items():  # this peer's own record included
            echo = rec.get("echo") if isinstance(rec, dict) else None
            served = echo.get("adapter_id") if isinstance(echo, dict) else None
            if served != self.adapter_id and (self.adapter_id is not None or served is not None):
                out.add(pid)
        return out

    def begin(self, stages: Any) -> None:
        return None

    def on_call(self, *args: Any) -> None:
        return None

    def on_drop(self, *args: Any) -> None:
        return None

    def finish(self, *args: Any) -> None:
        return None

    async def aclose(self) -> None:
        return None
