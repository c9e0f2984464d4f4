"""A standalone WebRTC link probe: plain aiortc, one data channel, SDP exchanged through files.

Run one ``offer`` and one ``answer`` process (usually in two NAT lab hosts) with the same
``--signal`` directory; each prints one JSON object and exits 0 when the link worked::

    python -m gradient_nb.testing.linkprobe offer  --signal /tmp/x --ice '{"stun": "stun:..."}'
    python -m gradient_nb.testing.linkprobe answer --signal /tmp/x --ice '{"stun": "stun:..."}'

The offerer echoes ``--messages`` small messages through the answerer (RTT) and, with ``--bulk N``,
sends N bytes and waits for the answerer's count (throughput). Both report the selected candidate
pair's types, the time from start to an open channel, and on failure the candidates each side had
with :func:`gradient_nb.mesh.ice.explain_failure`'s diagnosis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from ..mesh.ice import IceConfig, explain_failure, selected_pair

CHUNK = 65536  # below every peer's advertised SCTP message limit (FACTS.md)


async def _wait_file(path: Path, deadline: float) -> dict[str, Any]:
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path.name} from the other side")
        await asyncio.sleep(0.05)
    return json.loads(path.read_text())


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _cands(cands: list[Any]) -> list[dict[str, Any]]:
    return [{"type": c.type, "address": f"{c.host}:{c.port}", "transport": c.transport} for c in cands]


async def probe(role: str, signal_dir: Path, ice: IceConfig, *, messages: int = 5, bulk: int = 0,
                timeout: float = 20.0) -> dict[str, Any]:
    """Run one side of the probe; returns the JSON-ready report (``ok`` says whether it worked)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    ice = await ice.resolved()
    pc = RTCPeerConnection(ice.to_rtc())
    report: dict[str, Any] = {"role": role, "ok": False, "stun": ice.stun, "turn": ice.turn}
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    opened = asyncio.get_running_loop().create_future()
    ice_failed = asyncio.get_running_loop().create_future()

    def wire(ch: Any) -> None:
        ch.on("message", inbox.put_nowait)

        @ch.on("open")
        def _() -> None:
            if not opened.done():
                opened.set_result(ch)

        if ch.readyState == "open" and not opened.done():
            opened.set_result(ch)

    @pc.on("iceconnectionstatechange")
    def _() -> None:
        if pc.iceConnectionState == "failed" and not ice_failed.done():
            ice_failed.set_result(None)

    try:
        if role == "offer":
            wire(pc.createDataChannel("probe"))
            await pc.setLocalDescription(await pc.createOffer())
            report["gather_s"] = time.monotonic() - t0
            _write_atomic(signal_dir / "offer.json", {"sdp": pc.localDescription.sdp})
            answer = await _wait_file(signal_dir / "answer.json", deadline)
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        else:
            pc.on("datachannel", wire)
            offer = await _wait_file(signal_dir / "offer.json", deadline)
            await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            report["gather_s"] = time.monotonic() - t0
            _write_atomic(signal_dir / "answer.json", {"sdp": pc.localDescription.sdp})

        done, _pending = await asyncio.wait([opened, ice_failed], timeout=max(0.0, deadline - time.monotonic()),
                                            return_when=asyncio.FIRST_COMPLETED)
        if opened not in done:
            raise TimeoutError("ICE failed" if ice_failed in done else "no open data channel before the timeout")
        ch = opened.result()
        report["connect_s"] = time.monotonic() - t0
        report.update(selected_pair(pc) or {})

        if role == "offer":
            rtts = []
            for i in range(messages):
                sent = time.perf_counter()
                ch.send(f"ping {i}")
                reply = await asyncio.wait_for(inbox.get(), max(0.1, deadline - time.monotonic()))
                if reply != f"pong {i}":
                    raise RuntimeError(f"bad echo {reply!r}")
                rtts.append(time.perf_counter() - sent)
            report["echoed"] = len(rtts)
            report["rtt_ms"] = statistics.median(rtts) * 1e3 if rtts else None
            if bulk:
                report["bulk_bytes"] = bulk
                report["bulk_MBps"] = await _send_bulk(ch, inbox, bulk, deadline)
            ch.send("bye")
            # The answerer closes after "bye"; wait for that so its report is complete.
            await asyncio.wait_for(inbox.get(), max(0.1, deadline - time.monotonic()))
        else:
            got = 0
            while True:
                msg = await asyncio.wait_for(inbox.get(), max(0.1, deadline - time.monotonic()))
                if isinstance(msg, bytes):
                    got += len(msg)
                elif msg.startswith("ping "):
                    ch.send("pong " + msg[5:])
                elif msg == "bulk-end":
                    ch.send(f"bulk-got {got}")
                    report["bulk_received"] = got
                elif msg == "bye":
                    ch.send("bye")
                    await asyncio.sleep(0.2)  # let the last message leave before the close
                    break
        report["ok"] = True
    except Exception as exc:  # the report carries the failure
        report["error"] = f"{type(exc).__name__}: {exc}"
        transport = pc.sctp.transport.transport if pc.sctp else None
        conn = getattr(transport, "_connection", None)
        if conn is not None:
            report["local_candidates"] = _cands(conn.local_candidates)
            report["remote_candidates"] = _cands(conn.remote_candidates)
            report["explanation"] = explain_failure(ice, conn.local_candidates, conn.remote_candidates)
    finally:
        try:
            await asyncio.wait_for(pc.close(), 5)
        except TimeoutError:
            report["close_error"] = "RTCPeerConnection.close() took over 5 s"
    return report


async def _send_bulk(ch: Any, inbox: asyncio.Queue, total: int, deadline: float) -> float:
    low = asyncio.Event()
    ch.bufferedAmountLowThreshold = 1 << 20
    ch.on("bufferedamountlow", low.set)
    chunk = os.urandom(CHUNK)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        ch.send(chunk[:n])
        sent += n
        if ch.bufferedAmount > 4 << 20:
            low.clear()
            await asyncio.wait_for(low.wait(), max(0.1, deadline - time.monotonic()))
    ch.send("bulk-end")
    reply = await asyncio.wait_for(inbox.get(), max(0.1, deadline - time.monotonic()))
    if reply != f"bulk-got {total}":
        raise RuntimeError(f"bulk transfer incomplete: {reply!r}")
    return total / (time.perf_counter() - start) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradient_nb.testing.linkprobe")
    ap.add_argument("role", choices=["offer", "answer"])
    ap.add_argument("--signal", required=True, type=Path, help="directory both sides can read and write")
    ap.add_argument("--ice", default="{}", help="IceConfig as JSON (IceConfig.to_dict())")
    ap.add_argument("--messages", type=int, default=5)
    ap.add_argument("--bulk", type=int, default=0, help="bytes to send offerer→answerer")
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--log", choices=["debug", "info"], help="aioice/aiortc logging to stderr")
    args = ap.parse_args(argv)
    if args.log:
        import logging

        logging.basicConfig(level=args.log.upper(), format="%(relativeCreated)6.0f %(name)s %(message)s")
    report = asyncio.run(probe(args.role, args.signal, IceConfig.from_dict(json.loads(args.ice)),
                               messages=args.messages, bulk=args.bulk, timeout=args.timeout))
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
