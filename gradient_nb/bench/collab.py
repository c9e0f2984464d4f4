"""``gradient-nb bench collab``: keystroke-to-screen latency of a shared notebook, mesh against one server.

Prints one JSON object. A Yjs client types single characters into a cell of a notebook, one edit at a
time (the next once the last was seen), and another Yjs client, in the other user's room, observes each
one; the latency of an edit is the time from its local apply on the typing side to the update's arrival
on the observing side (both sides read ``CLOCK_MONOTONIC``, which all processes of the machine share).

- ``mesh``: two Jupyter servers (jupyter-collaboration, each its own root and port) and two mesh peers
  bridging them (``share_notebook`` / ``open_shared``); the typing client is in server A's room, the
  observing one in server B's.
- ``single_server`` (the baseline, measured in the same run): the same through ONE Jupyter server, both
  clients in the same room: two browsers, one server.

Every server, peer and client is a process of its own (the clients stand in for browsers); both
cases' processes are started together and run throughout, the cases measured one after the other. With root
(the default where the NAT lab can be built, ``--loopback`` to skip it) the processes run in the NAT lab
(``testing/natlab.py``): server A, its peer and the typing client behind one cone NAT, server B, its peer
and the observing client behind another, the rendezvous and coturn on the public segment; the
baseline's server runs on a public host of the lab and its two clients behind the same two NATs, so both
cases cross the same NATs once. ``--delay-ms D`` holds every packet leaving a LAN D ms (one D each way in
both cases). ``--loopback``: all on this host's loopback, real servers and real mesh links.

    gradient-nb bench collab [--edits 200] [--warmup 5] [--delay-ms D] [--loopback]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
EDIT_TIMEOUT_S = 30.0
START_TIMEOUT_S = 120.0
NOTEBOOK = "collab.ipynb"


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


_commands: TextIO = sys.stdin


def _take_stdin() -> None:
    """Keep this process's stdin (the bench's commands) to itself: the Jupyter server it starts gets
    /dev/null, so that nothing but this process can read a line meant for it."""
    global _commands
    _commands = os.fdopen(os.dup(0), "r")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


async def _stdin_line() -> str:
    return await asyncio.to_thread(_commands.readline)


# -- the processes of a run (``--site ROLE``) ---------------------------------------------------------


async def _site_server(args: argparse.Namespace) -> None:
    """``serve``: a Jupyter server with a one-cell notebook; with ``--rendezvous``, its mesh peer shares it
    and prints the code. ``join``: a Jupyter server whose mesh peer opens the code read from stdin. Both
    run until stdin closes."""
    from ..mesh.ice import IceConfig
    from ..mesh.processes import stop_processes
    from ..notebook.share import open_shared, share_notebook
    from ..notebook.share.harness import START_TIMEOUT_S as SERVER_START_S
    from ..notebook.share.harness import TOKEN, join_peer, start_server, wait_ready

    tmp = Path(tempfile.mkdtemp(prefix="gnb-collab-"))
    server = start_server(tmp / "lab", tmp / "runtime", ip=args.ip)
    mesh = handle = None
    try:
        await asyncio.to_thread(wait_ready, server, time.monotonic() + SERVER_START_S)
        if args.rendezvous:
            mesh = await join_peer(args.rendezvous, args.role, mesh=args.mesh,
                                   ice=IceConfig.from_dict(json.loads(args.ice or "{}")))
        if args.role == "serve":
            path = server.write(NOTEBOOK, [""])
            out: dict[str, Any] = {"url": server.url, "path": path}
            if mesh is not None:
                handle = await share_notebook(mesh, path, server_url=server.url, token=TOKEN)
                out["code"] = handle.code
        else:
            code = (await _stdin_line()).strip()
            handle = await open_shared(mesh, code, server_url=server.url, token=TOKEN, ystore_db=server.ystore)
            out = {"url": server.url, "path": handle.path,
                   "links": sorted({f"{v['kind']}:{v['local_type']}->{v['type']}" for v in mesh.links().values()})}
        _emit(out)
        await asyncio.to_thread(_commands.read)  # until the bench is done with us
    finally:
        if handle is not None:
            await handle.close()
        if mesh is not None:
            await mesh.leave()
        stop_processes([server.proc])
        shutil.rmtree(tmp, ignore_errors=True)


async def _site_client(args: argparse.Namespace) -> None:
    """``type``: types each character read from stdin at the end of the first cell and prints when it
    applied it. ``watch``: prints the first cell's text and the time of every update it receives."""
    from ..notebook.share.harness import TOKEN, User
    from ..notebook.share.room import JupyterServer

    async with User(JupyterServer(args.url, TOKEN), args.path, args.role) as user:
        source = user.nb.ycells[0]["source"]
        if args.role == "watch":
            loop = asyncio.get_running_loop()

            def seen(update: bytes, origin: str) -> None:
                # The time is taken as the update is applied; the text is read once the transaction is over.
                t = _now()
                loop.call_soon(lambda: _emit({"t": t, "text": str(source)}))

            user.doc.listen(seen)
        _emit({"ready": True, "text": str(source)})
        while line := await _stdin_line():
            if args.role == "type":
                source.insert(len(source), line.rstrip("\n"))
                _emit({"t": _now()})


# -- the bench -----------------------------------------------------------------------------------------


class _Site:
    """Where the processes of one run start: this host, or the hosts of a NAT lab."""

    def __init__(self, lab: Any, logs: Path) -> None:
        self.lab, self.logs = lab, logs
        self.procs: list[subprocess.Popen] = []
        self.spawned = 0

    def ip(self, host: str) -> str:
        return self.lab.address(host) if self.lab is not None else "127.0.0.1"

    def spawn(self, host: str, role: str, *extra: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "gradient_nb.bench.collab", "--site", role, *extra]
        self.spawned += 1
        log = self.logs / f"{self.spawned}-{role}-{host}.log"
        kw: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
        with open(log, "w") as err:
            if self.lab is not None:
                p = self.lab.spawn(host, argv, stderr=err, **kw)
            else:
                p = subprocess.Popen(argv, stderr=err, start_new_session=True, **kw)
        p.log = log  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        """Close every process's stdin (the servers' sites then close their share, leave the mesh and stop
        their Jupyter server), then stop what is still running."""
        from ..testing.natlab import NatLab

        for p in self.procs:
            if p.stdin is not None and not p.stdin.closed:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + 15
        for p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            NatLab.stop(p)
        self.procs.clear()


def _read(p: subprocess.Popen, timeout: float) -> dict[str, Any]:
    from ..testing.meshprobe import read_json_line

    try:
        return read_json_line(p, timeout)
    except (RuntimeError, TimeoutError) as exc:
        tail = Path(p.log).read_text(errors="replace")[-3000:]  # type: ignore[attr-defined]
        raise RuntimeError(f"{exc}; its log:\n{tail}") from None


def _send(p: subprocess.Popen, line: str) -> None:
    stdin: TextIO = p.stdin  # type: ignore[assignment]
    stdin.write(line + "\n")
    stdin.flush()


def _clients(site: _Site, type_host: str, type_room: dict[str, Any], watch_host: str,
             watch_room: dict[str, Any]) -> tuple[subprocess.Popen, subprocess.Popen]:
    """A typing client in ``type_room`` and an observing one in ``watch_room`` (started, not yet waited for)."""
    return (site.spawn(type_host, "type", "--url", type_room["url"], "--path", type_room["path"]),
            site.spawn(watch_host, "watch", "--url", watch_room["url"], "--path", watch_room["path"]))


def _measure(typer: subprocess.Popen, watcher: subprocess.Popen, edits: int, warmup: int) -> dict[str, Any]:
    """Type ``warmup + edits`` characters one at a time; the latencies (ms) of the last ``edits``, and how
    many of them the watcher saw with exactly the text typed so far."""
    latencies: list[float] = []
    expected = ""
    arrived = 0
    for k in range(warmup + edits):
        ch = ALPHABET[k % len(ALPHABET)]
        _send(typer, ch)
        t0 = _read(typer, EDIT_TIMEOUT_S)["t"]
        expected += ch
        while True:  # updates with less text are older ones (a reconnection's resync): skip them
            seen = _read(watcher, EDIT_TIMEOUT_S)
            if len(seen["text"]) >= len(expected):
                break
        if seen["text"] != expected:
            raise RuntimeError(f"edit {k}: the observer has {seen['text'][-40:]!r}, expected ...{expected[-40:]!r}")
        if k >= warmup:
            latencies.append(1000 * (seen["t"] - t0))
            arrived += 1
    return {"latencies": latencies, "arrived": arrived}


def _stats(latencies: list[float]) -> tuple[float, float]:
    p95 = statistics.quantiles(latencies, n=20, method="inclusive")[18] if len(latencies) > 1 else latencies[0]
    return round(statistics.median(latencies), 2), round(p95, 2)


def _both(site: _Site, hub: str, a: str, b: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start both cases' servers, peers and clients at once (starting is what takes time), then measure
    the single server, then the mesh, while all of them run; stop them all."""
    mesh = f"collab-{secrets.token_hex(4)}"

    def peer_args(host: str) -> list[str]:
        ice = site.lab.ice_config(host).to_dict() if site.lab is not None else {}
        return ["--ip", site.ip(host), "--rendezvous", url, "--mesh", mesh, "--ice", json.dumps(ice)]

    try:
        server = site.spawn(hub, "serve", "--ip", site.ip(hub))
        owner = site.spawn(a, "serve", *peer_args(a))
        joiner = site.spawn(b, "join", *peer_args(b))
        room = _read(server, START_TIMEOUT_S)
        single = _clients(site, a, room, b, room)
        room_a = _read(owner, START_TIMEOUT_S)
        _send(joiner, room_a["code"])
        room_b = _read(joiner, START_TIMEOUT_S)
        bridged = _clients(site, a, room_a, b, room_b)
        for p in (*single, *bridged):
            _read(p, START_TIMEOUT_S)
        return {"single_server": _measure(*single, args.edits, args.warmup),
                "mesh": {**_measure(*bridged, args.edits, args.warmup), "links": room_b["links"]}}
    finally:
        site.stop_all()


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from ..mesh.processes import stop_processes
    from ..notebook.share.harness import start_rendezvous
    from ..testing import meshprobe
    from ..testing.natlab import NatLab

    load_before = _load()
    logs = Path(tempfile.mkdtemp(prefix="gnb-bench-collab-"))
    try:
        if args.loopback:
            proc, url = start_rendezvous()
            try:
                cases = _both(_Site(None, logs), "local", "local", "local", url, args)
            finally:
                stop_processes([proc])
            setup = ("loopback, one host: every Jupyter server (jupyter-collaboration), mesh peer, rendezvous "
                     "and Yjs client a process of its own on 127.0.0.1; mesh: server A + its peer, server B + "
                     "its peer, each server its own root dir and port, the bridges over a real mesh link "
                     f"({', '.join(cases['mesh']['links'])}); single_server: one server, both clients in its room; "
                     "no NAT, no added delay")
        else:
            with NatLab({"a": "cone", "b": "cone", "hub": "public"}, delay_ms=args.delay_ms) as lab:
                proc, url = meshprobe.start_rendezvous(lab)
                try:
                    cases = _both(_Site(lab, logs), "hub", "a", "b", url, args)
                finally:
                    lab.stop(proc)
            setup = ("NAT lab on one host (network namespaces; every server, peer and client a process of its "
                     "own): mesh: Jupyter server A + its mesh peer + the typing client behind cone NAT a, "
                     "server B + its peer + the observing client behind cone NAT b, rendezvous and coturn on "
                     f"the public segment, mesh link {', '.join(cases['mesh']['links'])} (kind:local->remote candidate); single_server: one Jupyter "
                     "server on a public host of the lab, the typing client behind NAT a and the observing "
                     "client behind NAT b (its websocket through each NAT); "
                     f"one-way delay {args.delay_ms:g} ms on every packet leaving a LAN")
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    mesh, base = cases["mesh"], cases["single_server"]
    setup += ("; both cases' processes run throughout, the cases measured one after the other "
              "(single_server first)")
    mesh_p50, mesh_p95 = _stats(mesh["latencies"])
    base_p50, base_p95 = _stats(base["latencies"])
    return {
        "benchmark": "collab", "edits": args.edits, "warmup_edits": args.warmup,
        "mesh_p50_ms": mesh_p50, "mesh_p95_ms": mesh_p95,
        "single_server_p50_ms": base_p50, "single_server_p95_ms": base_p95,
        "ratio_p50": round(mesh_p50 / base_p50, 3),
        "mesh_arrived": mesh["arrived"], "single_server_arrived": base["arrived"],
        "delay_ms": 0.0 if args.loopback else args.delay_ms,
        "setup": f"{setup}; {os.cpu_count()} CPUs, load average (1/5/15 min) {load_before} before and "
                 f"{_load()} after (other jobs share the machine)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradient-nb bench collab", description=__doc__.split("\n")[0])
    p.add_argument("--edits", type=int, default=200, help="measured edits per case (default 200)")
    p.add_argument("--warmup", type=int, default=5, help="edits typed first and not counted")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="NAT lab: one-way delay on every packet leaving a LAN (default 0)")
    p.add_argument("--loopback", action="store_true", default=os.geteuid() != 0,
                   help="everything on this host's loopback, no NAT lab (the default without root)")
    p.add_argument("--site", choices=["serve", "join", "type", "watch"], help=argparse.SUPPRESS)
    for hidden in ("--ip", "--rendezvous", "--mesh", "--ice", "--url", "--path"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.site:
        args.role = args.site
        _take_stdin()
        asyncio.run(_site_server(args) if args.site in ("serve", "join") else _site_client(args))
        return 0
    if args.edits < 1:
        p.error("--edits must be at least 1")
    if args.loopback and args.delay_ms:
        p.error("--delay-ms needs the NAT lab (root, without --loopback)")
    print(json.dumps(_run(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
