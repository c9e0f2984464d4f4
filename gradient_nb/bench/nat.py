"""NAT traversal benchmark: for every pair of NAT types in the NAT lab (root needed), what the mesh does
and what plain aiortc does, each also as a ratio to the no-NAT baseline (public <-> public) measured in
the same run.

- ``mesh``: a ``gradient-nb peer`` process behind one NAT type and a
  :mod:`gradient_nb.testing.meshprobe` behind the other, introduced by a ``gradient-nb rendezvous`` on
  the lab's public server. Per run the probe joins anew (fresh identity): ``connect_s`` is the time
  from the start of ``join()`` (ICE servers resolved, rendezvous, the join-time link check) to a link
  to the peer; ``link_type`` is what the mesh reports for that link (``relay`` when either end says it
  is relayed); ``rtt_ms`` is the median round trip of a small ``diag.echo`` call; ``bulk_MBps`` is one
  ``diag.sink`` call of ``--bulk-mb`` MB.
- ``raw``: the plain aiortc link probe (:mod:`gradient_nb.testing.linkprobe`, SDP through files):
  time to an open data channel, link type, RTT, bulk throughput. ``mesh_vs_raw`` is what the mesh
  costs on top (signaling through the rendezvous, DTLS identity binding, RPC framing).

    python -m gradient_nb.bench.nat [--runs 3] [--bulk-mb 8] [--pairs cone-symmetric,public-public] [--no-raw]

Prints one JSON object (medians over the runs). Pairs run one after another so that they do not
compete for the CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from ..testing import meshprobe
from ..testing.natlab import NAT_TYPES, NatLab

BASELINE = ("public", "public")


def _probe(lab: NatLab, offer_host: str, answer_host: str, bulk: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gnb-bench-") as sig:
        procs = [lab.spawn(host, [sys.executable, "-m", "gradient_nb.testing.linkprobe", role, "--signal", sig,
                                  "--ice", json.dumps(lab.ice_config(host).to_dict()), "--timeout", str(timeout),
                                  "--messages", "20", "--bulk", str(bulk)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for role, host in (("offer", offer_host), ("answer", answer_host))]
        reports = []
        for p in procs:
            try:
                out, _err = p.communicate(timeout=timeout + 30)
            except subprocess.TimeoutExpired:
                lab.stop(p)
                out = ""
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            reports.append(json.loads(lines[-1]) if lines else {"ok": False, "error": "no report"})
    offer, answer = reports
    if not (offer.get("ok") and answer.get("ok")):
        return {"ok": False, "error": offer.get("error") or answer.get("error"),
                "explanation": offer.get("explanation")}
    return {"ok": True, "connect_s": offer["connect_s"], "link_type": offer["link_type"],
            "local_type": offer["local_type"], "remote_type": offer["remote_type"], "rtt_ms": offer["rtt_ms"],
            "bulk_MBps": offer.get("bulk_MBps"),
            # The TURN URL (so the transport) of the side whose relay carries the link.
            "turn": next((r["turn"] for r in (offer, answer) if r["local_type"] == "relay"), None)}


def _mesh_runs(lab: NatLab, url: str, a_host: str, b_host: str, mesh: str, runs: int, bulk: int,
               timeout: float) -> list[dict[str, Any]]:
    """One peer process on ``a_host``; one probe process on ``b_host`` that joins ``runs`` times."""
    peer = probe = None
    try:
        peer, pid = meshprobe.start_peer(lab, a_host, url, name=f"bench-{a_host}", mesh=mesh)
        probe = meshprobe.spawn_probe(lab, b_host, url, mesh=mesh, peers=[pid], runs=runs, bulk=bulk,
                                      timeout=timeout)
        out = []
        for _ in range(runs):
            report = meshprobe.read_json_line(probe, timeout * 6)
            rep = (report.get("peers") or {}).get(pid, {})
            if not (report.get("ok") and rep.get("ok")):
                out.append({"ok": False, "error": report.get("error") or rep.get("error"),
                            "explanation": rep.get("link_error")})
                break
            link, remote = rep["link"], rep["remote_link"]
            out.append({"ok": True, "connect_s": rep["connect_s"], "link_type": rep["link_type"],
                        "local_type": link["local_type"], "remote_type": remote["local_type"],
                        "rtt_ms": rep["rtt_ms"], "bulk_MBps": rep.get("bulk_MBps"),
                        "turn": report["ice"].get("turn") if link["local_type"] == "relay" else None})
        return out
    except (RuntimeError, TimeoutError) as exc:
        return [{"ok": False, "error": f"{type(exc).__name__}: {exc}"}]
    finally:
        for p in (probe, peer):
            if p is not None:
                lab.stop(p)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["ok"]]
    entry: dict[str, Any] = {"runs": len(runs), "connected": len(ok)}
    if not ok:
        entry.update(error=runs[0].get("error"), explanation=runs[0].get("explanation"))
        return entry
    entry.update({
        "link_type": sorted({r["link_type"] for r in ok}),
        # The candidate types at the probe's end -> at the other end of the selected pair.
        "pair_types": sorted({f"{r['local_type']}->{r['remote_type']}" for r in ok}),
        "turn": next((r["turn"] for r in ok if r["turn"]), None),
        "connect_s": _median([r["connect_s"] for r in ok]),
        "rtt_ms": _median([r["rtt_ms"] for r in ok]),
        "bulk_MBps": _median([r["bulk_MBps"] for r in ok]),
    })
    return entry


def _host(nat: str, i: int) -> str:
    return f"{nat.replace('-', '')}{i}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradient_nb.bench.nat", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="connections per pair (medians are reported)")
    ap.add_argument("--bulk-mb", type=float, default=8.0, help="MB sent over each link per run")
    ap.add_argument("--pairs", default="", help="comma-separated TYPE-TYPE pairs (default: all)")
    ap.add_argument("--no-raw", action="store_true", help="measure only the mesh, not plain aiortc")
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args(argv)

    pairs = list(itertools.combinations_with_replacement(NAT_TYPES, 2))
    if args.pairs:
        wanted = set()
        for item in args.pairs.split(","):
            a, b = next(((x, y) for x in NAT_TYPES for y in NAT_TYPES if f"{x}-{y}" == item), (None, None))
            if a is None:
                ap.error(f"unknown pair {item!r}; types: {', '.join(NAT_TYPES)}")
            wanted.add(tuple(sorted((a, b), key=NAT_TYPES.index)))
        pairs = [p for p in pairs if p in wanted]
    if BASELINE not in pairs:
        pairs.insert(0, BASELINE)
    bulk = int(args.bulk_mb * 1e6)
    hosts = {_host(nat, i): nat for nat in NAT_TYPES for i in (1, 2)}

    started = time.monotonic()
    results: dict[str, Any] = {}
    with NatLab(hosts) as lab:
        rendezvous, url = meshprobe.start_rendezvous(lab)
        try:
            for a, b in pairs:
                entry: dict[str, Any] = {"mesh": _summary(_mesh_runs(
                    lab, url, _host(a, 1), _host(b, 2), f"bench-{a}-{b}", args.runs, bulk, args.timeout))}
                if not args.no_raw:
                    entry["raw"] = _summary([_probe(lab, _host(a, 1), _host(b, 2), bulk, args.timeout)
                                             for _ in range(args.runs)])
                results[f"{a}-{b}"] = entry
        finally:
            lab.stop(rendezvous)

    base = results[f"{BASELINE[0]}-{BASELINE[1]}"]
    for entry in results.values():
        for kind, e in entry.items():
            b = base[kind]
            e["connect_vs_baseline"] = _ratio(e.get("connect_s"), b.get("connect_s"))
            e["rtt_vs_baseline"] = _ratio(e.get("rtt_ms"), b.get("rtt_ms"))
            e["throughput_vs_baseline"] = _ratio(e.get("bulk_MBps"), b.get("bulk_MBps"))
        if "raw" in entry:
            m, r = entry["mesh"], entry["raw"]
            entry["mesh_vs_raw"] = {"connect": _ratio(m.get("connect_s"), r.get("connect_s")),
                                    "rtt": _ratio(m.get("rtt_ms"), r.get("rtt_ms")),
                                    "throughput": _ratio(m.get("bulk_MBps"), r.get("bulk_MBps"))}
    print(json.dumps({
        "bench": "nat", "baseline": f"{BASELINE[0]}-{BASELINE[1]} (no NAT, direct)", "runs_per_pair": args.runs,
        "bulk_bytes": bulk, "elapsed_s": round(time.monotonic() - started, 1), "pairs": results,
    }, indent=1))
    return 0 if all(e["connected"] == e["runs"] for entry in results.values() for k, e in entry.items()
                    if k in ("mesh", "raw")) else 1


if __name__ == "__main__":
    sys.exit(main())
