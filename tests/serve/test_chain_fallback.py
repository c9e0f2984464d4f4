"""A chain whose stages cannot link to each other falls back to the star, with one process's tokens.

Issue 18: forwarding sends a step stage to stage; where stage i cannot reach stage i + 1 it answers
``NoLinkToNext`` and the entry serves that chain as a star (it calls each stage itself). Nothing is
simulated: in the NAT lab the two serving peers (``gradient-nb peer --serve``, layers 0:15 and 15:30)
sit behind two symmetric NATs with a STUN server and no TURN, so no path between them exists (as for
two Colab kernels without a relay); the entry is a public host both of them reach. Needs root.

The entry runs inside the lab, so it is this file run as a script (``entry`` mode); it prints one JSON
line per phase, and the test reads each with a timeout and shows every process's log when one fails.
Where the time goes (printed): the fallback itself costs the stage's ``CHAIN_LINK_TIMEOUT`` (10 s: ICE
between the two NATs has not given up by then); an earlier version of this test also waited out each
serving peer's join check (15 s on the unreachable peer, fixed in ``Mesh._check_reachable``: one link is
enough) and computed the reference before starting anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.natlab, pytest.mark.slow]

PROMPT = "What is the capital of France?"
NEW_TOKENS = 8
LAYERS = ("0:15", "15:30")


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def _entry(url: str, stun: str, ids: list[int]) -> None:
    from gradient_nb.mesh.ice import IceConfig
    from gradient_nb.mesh.identity import Identity
    from gradient_nb.mesh.peer import join

    t0 = time.monotonic()
    mesh = await join(url, name="entry", identity=Identity.generate(), ice=IceConfig(stun=stun),
                      heartbeat=0.5, peer_timeout=3.0, probe_seconds=0.05)
    try:
        _say(event="joined", peer_id=mesh.id, s=round(time.monotonic() - t0, 1))
        # Imported once joined: the serving peers start as soon as the entry is in (torch takes seconds).
        from gradient_nb.serve.cluster import wait_ready
        from gradient_nb.serve.pipeline import MeshEngine
        from gradient_nb.serve.sampling import SamplingParams

        engine = await asyncio.to_thread(MeshEngine, mesh)
        await wait_ready(mesh, engine, len(LAYERS), 60)
        chain = engine.current_route()
        _say(event="ready", s=round(time.monotonic() - t0, 1), forwards=engine.forwards(chain))
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
        runs = []
        for _ in range(2):  # the first meets the unlinked chain; the second starts on the star
            tokens = [t async for t in engine.generate(ids, params)]
            trace = engine.traces[-1]
            runs.append({"tokens": tokens, "failovers": trace.failovers, "routes": trace.routes,
                         "s": round(time.monotonic() - t0, 1)})
        records = mesh.state.peers()
        names = {pid: r.get("name") for pid, r in records.items()}
        _say(event="done", runs=runs, step_calls=engine.step_calls, forwards=engine.forwards(chain),
             unlinked=[[list(map(list, k)), why] for k, why in engine.unlinked.items()],
             links={pid[:8]: lk["kind"] for pid, lk in mesh.links().items()},
             stage_links={r["name"]: sorted(names.get(lk.get("peer"), "?") for lk in r.get("links", []))
                          for r in records.values() if r.get("name", "").startswith("s")})
        await engine.aclose()
    finally:
        await mesh.leave()


def _reference(ids: list[int]) -> list[int]:
    """Plain transformers' greedy tokens in this process (which is no peer: it may block)."""
    from gradient_nb.models import load_full_model, load_tokenizer, resolve_model
    from gradient_nb.serve.shard import reference_greedy

    path = resolve_model()
    return reference_greedy(load_full_model(path), load_tokenizer(path), ids, NEW_TOKENS)


def test_unlinkable_stages_fall_back_to_the_star_with_one_process_tokens(tmp_path: Path) -> None:
    from gradient_nb.models import load_tokenizer, resolve_model
    from gradient_nb.testing.meshprobe import read_json_line, start_rendezvous
    from gradient_nb.testing.natlab import NatLab

    ids = list(load_tokenizer(resolve_model()).apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"])

    logs: dict[str, Path] = {}

    def spawn(lab: NatLab, host: str, argv: list[str], **kw: object) -> subprocess.Popen:
        logs[host] = tmp_path / f"{host}.log"
        return lab.spawn(host, [sys.executable, *argv], stderr=logs[host].open("w"), text=True, **kw)

    def read(p: subprocess.Popen, timeout: float, what: str) -> dict:
        try:
            return read_json_line(p, timeout)
        except (TimeoutError, RuntimeError) as exc:
            tails = "\n".join(f"--- {h} ---\n{f.read_text()[-2500:]}" for h, f in logs.items())
            raise AssertionError(f"{what}: {exc}\n{tails}") from None

    t0, phases = time.monotonic(), {}  # seconds since the start, printed: where a slow run spent its time
    with NatLab({"entry": "public", "s1": "symmetric", "s2": "symmetric"}) as lab:
        phases["lab"] = round(time.monotonic() - t0, 1)
        _, url = start_rendezvous(lab)
        phases["rendezvous"] = round(time.monotonic() - t0, 1)
        stun = lab.ice_config("entry", turn=False).stun
        assert stun and not lab.ice_config("s1", turn=False).turn
        # The entry joins first, so each serving peer's join check finds a peer it can link to.
        entry = spawn(lab, "entry", [__file__, "entry", url, stun, json.dumps(ids)],
                      stdout=subprocess.PIPE)
        read(entry, 60, "the entry did not join")
        phases["entry_joined"] = round(time.monotonic() - t0, 1)
        peers = [spawn(lab, f"s{i + 1}", ["-m", "gradient_nb.cli", "peer", "--rendezvous", url, "--name", f"s{i + 1}",
                                          "--ephemeral", "--stun", stun, "--heartbeat", "0.5", "--peer-timeout", "3",
                                          "--threads", "1", "--serve", "default", "--layers", layers],
                       stdout=subprocess.DEVNULL) for i, layers in enumerate(LAYERS)]
        want = _reference(ids)  # while the peers start
        phases["reference"] = round(time.monotonic() - t0, 1)
        ready = read(entry, 90, "the model was not served")
        assert ready["forwards"], ready  # forwarding is what the entry tries first
        done = read(entry, 90, "generation did not finish")
        for p in peers:  # at once: a serving peer asked to stop hands its layers over first (seconds)
            os.killpg(p.pid, signal.SIGKILL)
    phases["done"] = round(time.monotonic() - t0, 1)
    print(json.dumps({"phases": phases, "ready": ready, "done": done}))
    first, second = done["runs"]
    assert first["tokens"] == want and second["tokens"] == want
    # The first step went stage to stage, the first stage could not link to the second: star from then on.
    assert done["step_calls"]["chain"] == 1 and done["step_calls"]["star"] >= 2 * len(want)
    assert first["failovers"] == 1 and second["failovers"] == 0 and not done["forwards"]
    assert len(done["unlinked"]) == 1 and "no link from" in done["unlinked"][0][1], done["unlinked"]
    # Honestly unlinked: neither serving peer ever published a link to the other; both linked to the entry.
    assert done["stage_links"] == {"s1": ["entry"], "s2": ["entry"]}, done["stage_links"]

if __name__ == "__main__" and sys.argv[1:2] == ["entry"]:
    asyncio.run(_entry(sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
