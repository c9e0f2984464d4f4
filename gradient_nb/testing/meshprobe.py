"""A mesh probe: one more peer that joins a mesh and checks it end to end, made for the NAT lab.

A test process cannot join a mesh from inside a lab host's network namespace, so it runs this
module there (``lab.spawn(host, [python, "-m", "gradient_nb.testing.meshprobe", ...])``)::

    python -m gradient_nb.testing.meshprobe --rendezvous ws://198.51.100.1:PORT --mesh m \\
        --ice '{"stun": "stun:...", "turn": "turn:...", ...}' --peer ID [--peer ID2 ...] \\
        [--runs 3] [--bulk 8000000] [--pause]

Each run joins through the real :func:`gradient_nb.mesh.peer.join` (ICE resolution, the join-time
link check) with a fresh identity, links to every ``--peer`` (``gradient-nb peer`` processes, which
offer the ``diag.*`` services) and, for each of them: calls ``diag.echo`` with a tensor, streams
``diag.count``, times small calls (round trip) and one ``diag.sink`` call of ``--bulk`` bytes
(throughput), puts a state entry and waits until that peer's ``diag.view`` shows it, and reads the
link type twice: as this peer's :meth:`Mesh.links` reports it and as the other peer published it in
its registry record. Then it leaves, and the next run joins again.

It prints one JSON line per run (``"phase": "mesh"``). With ``--pause`` it stays in the mesh after
the last one, waits for a line on stdin (the test kills the rendezvous meanwhile), checks that the
rendezvous is gone, drops its links to all but the first peer so that new links need signaling
relayed by a peer, and checks calls, streams and state again (``"phase": "no-rendezvous"``).
Exit status 0 when every check passed.

From a test or a benchmark (outside the namespaces): :func:`start_rendezvous` (on the lab's public
server), :func:`start_peer` (a ``gradient-nb peer`` in a lab host), :func:`spawn_probe` (this module
in a lab host) and :func:`read_json_line` (a report, with a timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import inspect
import json
import logging
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch

from ..mesh.errors import MeshError
from ..mesh.frames import Message
from ..mesh.ice import IceConfig
from ..mesh.identity import Identity
from ..mesh.peer import Mesh, join
from .natlab import SERVER, NatLab

NAMESPACE = "meshprobe"
STREAM_ITEMS = 200
RTT_CALLS = 10


async def _eventually(check: Callable[[], Any | Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(0.2)


def _published_link(mesh: Mesh, peer_id: str) -> dict[str, Any] | None:
    """The link to this peer as ``peer_id`` published it in its registry record."""
    rec = mesh.state.peers().get(peer_id) or {}
    return next((dict(lk) for lk in rec.get("links", []) if lk.get("peer") == mesh.id), None)


def _link_type(mine: dict[str, Any], theirs: dict[str, Any] | None) -> str:
    """``"relay"`` when either end says its link is relayed, else ``"direct"``: each side knows for
    sure only whether its own candidate is a relay (a remote relay can look peer-reflexive)."""
    return "relay" if mine.get("relayed") or (theirs or {}).get("relayed") else "direct"


async def _check_peer(mesh: Mesh, peer_id: str, *, run: int, bulk: int, timeout: float) -> dict[str, Any]:
    """Calls, a stream, round trip, bulk throughput and state convergence with one linked peer."""
    out: dict[str, Any] = {"echo": False, "stream": False, "state": False}
    x = torch.randn(64, 256)
    reply = await mesh.call(peer_id, "diag.echo", Message({"run": run, "from": mesh.id}, {"x": x}), timeout=timeout)
    out["echo"] = reply.header == {"run": run, "from": mesh.id} and torch.equal(reply.tensors["x"], x)

    items = [m.header["i"] async for m in mesh.stream(peer_id, "diag.count", Message({"n": STREAM_ITEMS}),
                                                       timeout=timeout)]
    out["stream"] = items == list(range(STREAM_ITEMS))

    rtts = []
    for i in range(RTT_CALLS):
        start = time.perf_counter()
        await mesh.call(peer_id, "diag.echo", Message({"i": i}), timeout=timeout)
        rtts.append(time.perf_counter() - start)
    out["rtt_ms"] = round(statistics.median(rtts) * 1e3, 3)

    if bulk:
        payload = torch.randint(0, 256, (bulk,), dtype=torch.uint8)
        start = time.perf_counter()
        got = await mesh.call(peer_id, "diag.sink", Message({}, {"b": payload}), timeout=max(timeout, 120.0))
        elapsed = time.perf_counter() - start
        out["bulk_bytes"] = int(got.header.get("bytes", 0))
        out["bulk_MBps"] = round(bulk / elapsed / 1e6, 3) if out["bulk_bytes"] == bulk else None

    key, value = f"r{run}-{peer_id[:8]}", {"run": run, "nonce": secrets.token_hex(4)}
    mesh.state.put(NAMESPACE, key, value)
    want = [mesh.id, key, value]

    async def arrived() -> bool:
        view = (await mesh.call(peer_id, "diag.view", Message({"namespace": NAMESPACE}), timeout=timeout)).header
        return want in view["entries"]

    out["state"] = bool(await _eventually(arrived, timeout, f"the state entry on {peer_id[:8]}"))
    return out


async def _link_report(mesh: Mesh, peer_id: str, timeout: float) -> dict[str, Any]:
    mine = mesh.links().get(peer_id)
    if mine is None:
        raise MeshError(f"no link to {peer_id[:8]}")
    # The other side publishes its links with its next heartbeat.
    theirs = await _eventually(lambda: _published_link(mesh, peer_id), timeout, f"{peer_id[:8]} to publish its link")
    return {"link": mine, "remote_link": theirs, "link_type": _link_type(mine, theirs)}


async def _probe_peers(mesh: Mesh, peers: Sequence[str], *, run: int, bulk: int, timeout: float,
                       connected_at: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Check every peer; peers are checked one after another so that throughput is per link."""
    reports: dict[str, dict[str, Any]] = {}
    for pid in peers:
        rep: dict[str, Any] = {"ok": False}
        if connected_at and pid in connected_at:
            rep["connect_s"] = round(connected_at[pid], 3)
        try:
            rep.update(await _check_peer(mesh, pid, run=run, bulk=bulk, timeout=timeout))
            rep.update(await _link_report(mesh, pid, timeout))
            rep["name"] = str((mesh.state.peers().get(pid) or {}).get("name", ""))
            rep["ok"] = rep["echo"] and rep["stream"] and rep["state"]
        except (MeshError, TimeoutError, OSError) as exc:
            rep["error"] = f"{type(exc).__name__}: {exc}"
            rep["link_error"] = mesh.link_errors.get(pid)
        reports[pid] = rep
    return reports


async def _mesh_view(mesh: Mesh, peer_id: str, timeout: float) -> dict[str, Any]:
    return (await mesh.call(peer_id, "diag.view", Message({"namespace": ""}), timeout=timeout)).header


async def _run_once(args: argparse.Namespace, ice: IceConfig, run: int) -> tuple[Mesh | None, dict[str, Any]]:
    report: dict[str, Any] = {"phase": "mesh", "run": run, "ok": False}
    t0 = time.monotonic()
    try:
        mesh = await join(args.rendezvous, mesh=args.mesh, name=args.name, identity=Identity.generate(), ice=ice,
                          heartbeat=args.heartbeat, peer_timeout=args.peer_timeout, probe_seconds=0.05,
                          eager_links=args.eager_links)
    except MeshError as exc:
        report.update(error=f"{type(exc).__name__}: {exc}", join_s=round(time.monotonic() - t0, 3))
        return None, report
    report.update(self=mesh.id, join_s=round(time.monotonic() - t0, 3), ice=mesh.ice.to_dict())
    try:
        connected_at: dict[str, float] = {}

        async def connect(pid: str) -> None:
            try:
                await mesh.connect(pid, args.timeout)
                connected_at[pid] = time.monotonic() - t0
            except (MeshError, TimeoutError) as exc:
                report.setdefault("connect_errors", {})[pid] = str(exc)

        await asyncio.gather(*(connect(p) for p in args.peer))
        report["peers"] = await _probe_peers(mesh, args.peer, run=run, bulk=args.bulk, timeout=args.timeout,
                                             connected_at=connected_at)
        report["registry"] = sorted(p.id for p in mesh.peers())
        # What every peer sees of the mesh: its registry and its links (a full mesh has a path around any one).
        views = {}
        for pid in args.peer:
            try:
                v = await _mesh_view(mesh, pid, args.timeout)
                views[pid] = {"peers": v["peers"], "links": v["links"], "rendezvous": v["rendezvous"]}
            except (MeshError, TimeoutError) as exc:
                views[pid] = {"error": str(exc)}
        report["views"] = views
        report["ok"] = all(r["ok"] for r in report["peers"].values())
    except BaseException:
        await asyncio.wait_for(mesh.leave(), 15)
        raise
    return mesh, report


async def _after_rendezvous(mesh: Mesh, args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"phase": "no-rendezvous", "ok": False, "self": mesh.id}

    async def gone() -> bool:
        return not mesh.rendezvous_connected

    await _eventually(gone, args.timeout, "this peer to notice that the rendezvous is gone")
    report["rendezvous_connected"] = mesh.rendezvous_connected
    # Keep the link to the first peer only: the others must be linked anew, with the offer and answer
    # relayed by a peer (there is no rendezvous to carry them).
    hub, rest = args.peer[0], list(args.peer[1:])
    for pid in rest:
        await mesh._drop_link(pid)
    report["dropped_links"] = rest
    t0 = time.monotonic()
    connected_at: dict[str, float] = {}
    for pid in rest:
        try:
            await mesh.connect(pid, args.timeout)
            connected_at[pid] = time.monotonic() - t0
        except (MeshError, TimeoutError) as exc:
            report.setdefault("connect_errors", {})[pid] = str(exc)
    report["peers"] = await _probe_peers(mesh, [hub, *rest], run=1000, bulk=0, timeout=args.timeout,
                                         connected_at=connected_at)
    report["views"] = {}
    for pid in args.peer:
        try:
            v = await _mesh_view(mesh, pid, args.timeout)
            report["views"][pid] = {"peers": v["peers"], "links": v["links"], "rendezvous": v["rendezvous"]}
        except (MeshError, TimeoutError) as exc:
            report["views"][pid] = {"error": str(exc)}
    report["ok"] = all(r["ok"] for r in report["peers"].values())
    return report


# -- driving it from a test or a benchmark (outside the namespaces) -----------------------------


def peer_argv(url: str, *, name: str, mesh: str, ice: IceConfig, heartbeat: float = 0.5,
              peer_timeout: float = 10.0) -> list[str]:
    """The command line of a headless peer with these ICE settings and the diag services (a
    ``gradient-nb peer`` plus :mod:`.diagnostics`)."""
    argv = [sys.executable, "-m", "gradient_nb.testing.diagpeer", "peer", "--rendezvous", url, "--mesh", mesh, "--name", name,
            "--ephemeral", "--heartbeat", str(heartbeat), "--peer-timeout", str(peer_timeout)]
    if ice.stun:
        argv += ["--stun", ice.stun]
    for url_ in (ice.turn, *ice.turn_fallbacks) if ice.turn else ():
        argv += ["--turn", url_]
    if ice.turn:
        argv += ["--turn-user", str(ice.turn_username), "--turn-password", str(ice.turn_password)]
    return argv


def read_json_line(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """The next line of ``proc``'s stdout that is a JSON object. Raises ``RuntimeError`` with the
    process's stderr when it exits first, ``TimeoutError`` when nothing comes in time."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        result: list[str] = []
        reader = threading.Thread(target=lambda out=result: out.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if reader.is_alive():
            raise TimeoutError(f"no JSON line from {proc.args!r} within {timeout:.0f} s")
        line = result[0]
        if not line:
            proc.wait(5)
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise RuntimeError(f"process exited ({proc.returncode}) without a JSON line: {err[-3000:]}")
        if line.startswith("{"):
            return json.loads(line)


def start_rendezvous(lab: NatLab, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """A ``gradient-nb rendezvous`` process on the lab's public server; returns it and its URL."""
    p = lab.spawn(SERVER, [sys.executable, "-m", "gradient_nb.cli", "rendezvous", "--host", lab.server_ip,
                           "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, read_json_line(p, timeout)["url"]


def start_peer(lab: NatLab, host: str, url: str, *, name: str, mesh: str, ice: IceConfig | None = None,
               timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """A ``gradient-nb peer`` process on ``host`` (the lab's STUN/TURN by default); returns it and its
    peer id once it has joined."""
    ice = ice if ice is not None else lab.ice_config(host)
    p = lab.spawn(host, peer_argv(url, name=name, mesh=mesh, ice=ice), stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    try:
        event = read_json_line(p, timeout)
    except BaseException:
        lab.stop(p)
        raise
    return p, event["peer_id"]


def spawn_probe(lab: NatLab, host: str, url: str, *, mesh: str, peers: Sequence[str],
                ice: IceConfig | None = None, runs: int = 1, bulk: int = 0, pause: bool = False,
                timeout: float = 40.0) -> subprocess.Popen:
    """Start this module on ``host`` (the lab's STUN/TURN by default); read its reports with
    :func:`read_json_line`."""
    ice = ice if ice is not None else lab.ice_config(host)
    argv = [sys.executable, "-m", "gradient_nb.testing.meshprobe", "--rendezvous", url, "--mesh", mesh,
            "--name", f"probe-{host}", "--ice", json.dumps(ice.to_dict()), "--runs", str(runs),
            "--bulk", str(bulk), "--timeout", str(timeout)]
    for pid in peers:
        argv += ["--peer", pid]
    if pause:
        argv.append("--pause")
    return lab.spawn(host, argv, stdin=subprocess.PIPE if pause else subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


class _RecentLog(logging.Handler):
    """The last records of the mesh's log, put into a failed report so that a test shows why."""

    def __init__(self, keep: int = 80) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.setFormatter(logging.Formatter("%(relativeCreated)d %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def _main(args: argparse.Namespace) -> int:
    recent = _RecentLog()
    logger = logging.getLogger("gradient_nb")
    logger.addHandler(recent)
    logger.setLevel(logging.INFO)
    ice = IceConfig.from_dict(json.loads(args.ice)) if args.ice else IceConfig()
    ok = True
    for run in range(args.runs):
        mesh, report = await asyncio.wait_for(_run_once(args, ice, run), args.timeout * 4)
        _emit(report)
        ok = ok and report["ok"]
        if mesh is None:
            return 1
        try:
            if args.pause and run == args.runs - 1:
                line = await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), args.timeout * 4)
                if line.strip():
                    after = await asyncio.wait_for(_after_rendezvous(mesh, args), args.timeout * 4)
                    if not after["ok"]:
                        after["log"] = list(recent.lines)
                    _emit(after)
                    ok = ok and after["ok"]
        finally:
            await asyncio.wait_for(mesh.leave(), 15)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradient_nb.testing.meshprobe", description=__doc__.split("\n")[0])
    ap.add_argument("--rendezvous", required=True, help="ws://HOST:PORT")
    ap.add_argument("--mesh", default="default")
    ap.add_argument("--name", default="meshprobe")
    ap.add_argument("--ice", default="", help="IceConfig as JSON (IceConfig.to_dict())")
    ap.add_argument("--peer", action="append", default=[], required=True, help="peer id to check; repeatable")
    ap.add_argument("--runs", type=int, default=1, help="join, check and leave this many times")
    ap.add_argument("--bulk", type=int, default=0, help="bytes sent to each peer's diag.sink (0: none)")
    ap.add_argument("--pause", action="store_true",
                    help="after the report, wait for a stdin line, then check the mesh without its rendezvous")
    ap.add_argument("--timeout", type=float, default=40.0, help="seconds for each network step")
    ap.add_argument("--heartbeat", type=float, default=0.5)
    ap.add_argument("--peer-timeout", type=float, default=10.0)
    ap.add_argument("--eager-links", type=int, default=4)
    args = ap.parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except TimeoutError as exc:
        _emit({"phase": "error", "ok": False, "error": f"TimeoutError: {exc}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
