"""NAT traversal benchmark: for every pair of NAT types in the NAT lab (root needed), the time to an
open data channel, the link type ICE chose, the round trip and the bulk throughput of an aiortc data
channel, each also as a ratio to the no-NAT baseline (public <-> public) measured in the same run.

    python -m gradient_nb.bench.nat [--runs 3] [--bulk-mb 8] [--pairs cone-symmetric,public-public]

Prints one JSON object. Pairs run one after another so that they do not compete for the CPU.
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


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradient_nb.bench.nat", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="connections per pair (medians are reported)")
    ap.add_argument("--bulk-mb", type=float, default=8.0, help="MB sent over the data channel per run")
    ap.add_argument("--pairs", default="", help="comma-separated TYPE-TYPE pairs (default: all)")
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
    hosts = {f"{nat.replace('-', '')}{i}": nat for nat in NAT_TYPES for i in (1, 2)}

    started = time.monotonic()
    results: dict[str, Any] = {}
    with NatLab(hosts) as lab:
        for a, b in pairs:
            runs = [_probe(lab, f"{a.replace('-', '')}1", f"{b.replace('-', '')}2", bulk, args.timeout)
                    for _ in range(args.runs)]
            ok = [r for r in runs if r["ok"]]
            entry: dict[str, Any] = {"runs": len(runs), "connected": len(ok)}
            if ok:
                entry.update({
                    "link_type": sorted({r["link_type"] for r in ok}),
                    "pair_types": sorted({f"{r['local_type']}->{r['remote_type']}" for r in ok}),
                    "turn": next((r["turn"] for r in ok if r["turn"]), None),
                    "connect_s": _median([r["connect_s"] for r in ok]),
                    "rtt_ms": _median([r["rtt_ms"] for r in ok if r["rtt_ms"] is not None]),
                    "bulk_MBps": _median([r["bulk_MBps"] for r in ok if r["bulk_MBps"]]),
                })
            else:
                entry["error"] = runs[0].get("error")
                entry["explanation"] = runs[0].get("explanation")
            results[f"{a}-{b}"] = entry

    base = results[f"{BASELINE[0]}-{BASELINE[1]}"]
    for entry in results.values():
        entry["connect_vs_baseline"] = _ratio(entry.get("connect_s"), base.get("connect_s"))
        entry["rtt_vs_baseline"] = _ratio(entry.get("rtt_ms"), base.get("rtt_ms"))
        entry["throughput_vs_baseline"] = _ratio(entry.get("bulk_MBps"), base.get("bulk_MBps"))
    print(json.dumps({
        "bench": "nat", "baseline": f"{BASELINE[0]}-{BASELINE[1]} (no NAT, direct)", "runs_per_pair": args.runs,
        "bulk_bytes": bulk, "elapsed_s": round(time.monotonic() - started, 1), "pairs": results,
    }, indent=1))
    return 0 if all(e["connected"] == e["runs"] for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
