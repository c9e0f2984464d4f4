"""Model synchronization: a peer without the model fetches its layers from the peers that have them.

In-process (real meshes on an embedded rendezvous, real DHT): a peer with no copy of a small model fetches
two of its layers from three providers at once, one of which corrupts every chunk it sends; its chunks are
rejected and the fetch completes from the other two, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.rendezvous import Rendezvous
from gradient_nb.models import load_shard, model_info
from gradient_nb.models import manifest as mf
from gradient_nb.serve.weights_sync import (
    ContentServer,
    SyncProgress,
    WeightFetcher,
    find_model,
    find_providers,
)
from gradient_nb.testing.tinymodel import tiny_char_model


class TamperingServer(ContentServer):
    """A faulty (or dishonest) provider: every chunk it serves has one byte flipped."""

    async def _serve(self, msg, ctx):
        reply = await super()._serve(msg, ctx)
        data = reply.tensors["data"].clone()
        data[len(data) // 2] ^= 0x5A
        reply.tensors["data"] = data
        return reply


async def _wait_providers(mesh, model: str, n: int) -> None:
    for _ in range(60):
        if len(await find_providers(mesh, model, timeout=5.0)) >= n:
            return
    raise AssertionError(f"fewer than {n} providers of {model} in the DHT")


async def test_fetch_from_several_providers_rejects_a_tampered_chunk(tmp_path, monkeypatch) -> None:
    # hidden 384: the MLP matrices are 1.1 MiB, two chunks each; attention matrices one chunk.
    src = tiny_char_model(tmp_path / "src" / "tiny-sync", hidden=384, layers=4, heads=4)
    monkeypatch.setenv("GRADIENT_NB_HOME", str(tmp_path / "volunteer-home"))
    info = model_info(src)
    async with Rendezvous() as rv:
        meshes = [await join(rv.url, name=n, identity=Identity.generate(), probe_seconds=0.05)
                  for n in ("honest-1", "honest-2", "tamperer", "volunteer")]
        h1, h2, bad, vol = meshes
        servers = [ContentServer(h1, src, info).start(), ContentServer(h2, src, info).start(),
                   TamperingServer(bad, src, info).start()]
        try:
            await _wait_providers(vol, "tiny-sync", 3)
            # No local copy of "tiny-sync" here: its manifest, config and tokenizer come from the mesh.
            folder = await find_model(vol, "tiny-sync")
            assert mf.is_synced(folder) and not mf.present_parts(folder, mf.read_synced(folder))
            assert model_info(folder).content_hash == info.content_hash
            seen: list[SyncProgress] = []
            progress = await WeightFetcher(vol, folder, seen.append).fetch_layers(1, 3)
            assert progress is not None and progress.finished and seen[-1] is progress
            assert progress.done_bytes == progress.total_bytes == info.layer_bytes[1] + info.layer_bytes[2]
            # The tamperer's chunks failed their hash: it was dropped, and the others delivered everything.
            assert progress.rejected >= 1 and bad.id in progress.dropped
            assert "hash" in progress.dropped[bad.id]
            assert set(progress.by_peer) == {h1.id, h2.id}, progress.by_peer
            assert sum(progress.by_peer.values()) == progress.total_bytes
            assert mf.present_parts(folder, mf.read_synced(folder)) == {"layer.1", "layer.2"}
            got, want = load_shard(folder, 1, 3), load_shard(src, 1, 3)
            for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
                assert torch.equal(a, b), name
            # Layers outside what was fetched are absent, with a clear error; nothing is fetched twice.
            with pytest.raises(FileNotFoundError, match=r"part-layer\.3"):
                load_shard(folder, 2, 4)
            assert await WeightFetcher(vol, folder).fetch_layers(1, 3) is None
        finally:
            for s in servers:
                await s.stop()
            for m in meshes:
                await m.leave()
