"""``gradient-nb bench transport``: small-frame round trips and bulk throughput over one link.

Three transports are measured in the same run, each between this process and a child process
(``multiprocessing`` spawn; the SDP or the TCP port goes over a pipe):

- ``link``: a mesh link (aiortc data channel) with the bulk tuning of :mod:`gradient_nb.mesh.link`;
- ``untuned``: the same link with the tuning off (plain aiortc);
- ``direct``: a direct link (:mod:`gradient_nb.mesh.direct`: TCP + TLS 1.3 bound to the peers'
  identities), what peers that can reach each other's address use instead of WebRTC;
- ``tcp``: raw asyncio TCP on loopback with 8-byte length prefixes (the floor any link is held to).

The child echoes every ``rpc`` message and, on ``state``, counts bulk bytes and answers ``done``
after the last one, so the figures are end to end: the sender's clock stops when the receiver has
every byte. One JSON object is printed, with ratios against the baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from typing import Any

_LEN = struct.Struct("!Q")


# ------------------------------------------------------------------------------------------
# the child side


def _tuning(kind: str) -> Any:
    from gradient_nb.mesh.link import STANDARD_PACKET, SctpTuning

    if kind == "link":
        return SctpTuning()
    if kind == "link_standard_packets":
        # what the tuning does across a real network, where packets keep aiortc's size
        return SctpTuning(packet_bytes=STANDARD_PACKET)
    return None


def _child(conn: Any, kind: str, bulk_total: int) -> None:
    try:
        asyncio.run(_child_main(conn, kind, bulk_total))
    finally:
        conn.close()


async def _child_main(conn: Any, kind: str, bulk_total: int) -> None:
    loop = asyncio.get_running_loop()
    if kind == "tcp":
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                # first the echo phase, then bulk: a zero-length frame switches between them
                while True:
                    n = _LEN.unpack(await reader.readexactly(_LEN.size))[0]
                    if n == 0:
                        break
                    writer.write(_LEN.pack(n) + await reader.readexactly(n))
                    await writer.drain()
                got = 0
                while got < bulk_total:
                    n = _LEN.unpack(await reader.readexactly(_LEN.size))[0]
                    await reader.readexactly(n)
                    got += n
                writer.write(_LEN.pack(4) + b"done")
                await writer.drain()
                await reader.read()  # until the parent closes
            finally:
                writer.close()
                done.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        conn.send(server.sockets[0].getsockname()[1])
        await asyncio.wait_for(done.wait(), 300)
        server.close()
        return

    if kind == "direct":
        from gradient_nb.mesh.direct import DirectEndpoint
        from gradient_nb.mesh.identity import Identity

        arrived: asyncio.Future[Any] = loop.create_future()

        async def on_link(new: Any) -> None:
            if not arrived.done():
                arrived.set_result(new)

        identity = Identity.generate()
        endpoint = DirectEndpoint(identity, mesh="bench", secret=None, accept=lambda pid: True, on_link=on_link)
        await endpoint.listen("127.0.0.1", 0)
        conn.send((endpoint.port, identity.peer_id))
        try:
            link = await asyncio.wait_for(arrived, 60)
            try:
                await _serve_link(link, bulk_total)
            finally:
                await link.close()
        finally:
            await endpoint.close()
        return

    from gradient_nb.mesh.ice import IceConfig
    from gradient_nb.mesh.link import answer_link

    offer = await loop.run_in_executor(None, conn.recv)
    link, answer = await answer_link("bench-parent", IceConfig(), offer, tuning=_tuning(kind))
    conn.send(answer)
    try:
        await link.wait_connected(30)
        await _serve_link(link, bulk_total)
    finally:
        await link.close()


async def _serve_link(link: Any, bulk_total: int) -> None:
    """The child's side of a link: echo every ``rpc`` message, count bulk bytes on ``state``."""
    rpc, state = link.transports["rpc"], link.transports["state"]

    async def echo() -> None:
        while True:
            await rpc.send(await rpc.recv())

    echo_task = asyncio.create_task(echo())
    got = len(await asyncio.wait_for(state.recv(), 120))
    cpu0, t0 = time.process_time(), time.perf_counter()
    while got < bulk_total:
        got += len(await asyncio.wait_for(state.recv(), 120))
    share = (time.process_time() - cpu0) / max(time.perf_counter() - t0, 1e-9)
    await state.send(json.dumps({"done": True, "receiver_cpu_share": round(share, 2)}).encode())
    # wait for the parent to close the link
    with _suppress():
        await asyncio.wait_for(rpc.recv(), 60)
    echo_task.cancel()
    with _suppress():
        await echo_task


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and not issubclass(exc[0], KeyboardInterrupt)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# the parent side


def _summary(rtts: list[float]) -> dict[str, float]:
    rtts = sorted(rtts)
    return {"rtt_median_ms": round(statistics.median(rtts) * 1e3, 4),
            "rtt_p90_ms": round(rtts[int(0.9 * (len(rtts) - 1))] * 1e3, 4)}


async def _measure_link(kind: str, small: int, rounds: int, bulk_msg: int, bulk_total: int) -> dict[str, Any]:
    from gradient_nb.mesh.ice import IceConfig
    from gradient_nb.mesh.link import offer_link

    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child_conn, kind, bulk_total), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    pending, offer = await offer_link("bench-child", IceConfig(), tuning=_tuning(kind))
    link = None
    try:
        parent_conn.send(offer)
        answer = await asyncio.wait_for(loop.run_in_executor(None, parent_conn.recv), 60)
        link = await pending.complete(answer)
        await link.wait_connected(30)
        out = await _drive_link(link, small, rounds, bulk_msg, bulk_total)
        st = link.stats()
        return {**out, "candidates": f"{st.local_candidate_type}/{st.remote_candidate_type}",
                "sctp_packet_bytes": st.sctp_packet_bytes}
    finally:
        if link is not None:
            await link.close()
        else:
            await pending.close()
        await loop.run_in_executor(None, proc.join, 30)
        if proc.is_alive():
            proc.kill()


async def _measure_direct(small: int, rounds: int, bulk_msg: int, bulk_total: int) -> dict[str, Any]:
    from gradient_nb.mesh.direct import DirectEndpoint
    from gradient_nb.mesh.identity import Identity

    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child_conn, "direct", bulk_total), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    link = None
    try:
        port, peer_id = await asyncio.wait_for(loop.run_in_executor(None, parent_conn.recv), 60)

        async def refuse(new: Any) -> None:
            await new.close()

        endpoint = DirectEndpoint(Identity.generate(), mesh="bench", secret=None, accept=lambda pid: False,
                                  on_link=refuse)
        t0 = time.perf_counter()
        link = await endpoint.dial(peer_id, [f"127.0.0.1:{port}"], timeout=30)
        connect_ms = (time.perf_counter() - t0) * 1e3
        return {**await _drive_link(link, small, rounds, bulk_msg, bulk_total),
                "connect_ms": round(connect_ms, 2), "tls": "TLSv1.3"}
    finally:
        if link is not None:
            await link.close()
        await loop.run_in_executor(None, proc.join, 30)
        if proc.is_alive():
            proc.kill()


async def _drive_link(link: Any, small: int, rounds: int, bulk_msg: int, bulk_total: int) -> dict[str, Any]:
    """The parent's side: ``rounds`` round trips of ``small`` bytes, then ``bulk_total`` bytes."""
    rpc, state = link.transports["rpc"], link.transports["state"]
    frame = os.urandom(small)
    for _ in range(20):  # warm-up
        await rpc.send(frame)
        await asyncio.wait_for(rpc.recv(), 10)
    rtts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await rpc.send(frame)
        await asyncio.wait_for(rpc.recv(), 10)
        rtts.append(time.perf_counter() - t0)
    blob = os.urandom(bulk_msg)
    cpu0, t0 = time.process_time(), time.perf_counter()
    sent = 0
    while sent < bulk_total:
        await state.send(blob)
        sent += len(blob)
    reply = await asyncio.wait_for(state.recv(), 120)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done = json.loads(reply)
    return {**_summary(rtts), "bulk_mb_s": round(bulk_total / dt / 1e6, 2),
            "bulk_seconds": round(dt, 3), "sender_cpu_share": round(cpu / dt, 2),
            "receiver_cpu_share": done["receiver_cpu_share"]}


async def _measure_tcp(small: int, rounds: int, bulk_msg: int, bulk_total: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child_conn, "tcp", bulk_total), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    try:
        port = await asyncio.wait_for(loop.run_in_executor(None, parent_conn.recv), 60)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        frame = os.urandom(small)

        async def roundtrip() -> None:
            writer.write(_LEN.pack(len(frame)) + frame)
            await writer.drain()
            n = _LEN.unpack(await reader.readexactly(_LEN.size))[0]
            await reader.readexactly(n)

        for _ in range(20):
            await asyncio.wait_for(roundtrip(), 10)
        rtts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await asyncio.wait_for(roundtrip(), 10)
            rtts.append(time.perf_counter() - t0)
        writer.write(_LEN.pack(0))
        blob = os.urandom(bulk_msg)
        cpu0, t0 = time.process_time(), time.perf_counter()
        sent = 0
        while sent < bulk_total:
            writer.write(_LEN.pack(len(blob)) + blob)
            await writer.drain()
            sent += len(blob)
        n = _LEN.unpack(await asyncio.wait_for(reader.readexactly(_LEN.size), 120))[0]
        await reader.readexactly(n)
        dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        writer.close()
        return {**_summary(rtts), "bulk_mb_s": round(bulk_total / dt / 1e6, 2),
                "bulk_seconds": round(dt, 3), "sender_cpu_share": round(cpu / dt, 2)}
    finally:
        await loop.run_in_executor(None, proc.join, 30)
        if proc.is_alive():
            proc.kill()


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    total = args.bulk_mib << 20
    msg = args.message_kib << 10
    out: dict[str, Any] = {"bench": "transport", "small_frame_bytes": args.small, "rounds": args.rounds,
                           "bulk_bytes": total, "bulk_message_bytes": msg}
    out["tcp"] = await _measure_tcp(args.small, args.rounds, msg, total)
    out["direct"] = await _measure_direct(args.small, args.rounds, msg, total)
    out["untuned"] = await _measure_link("untuned", args.small, args.rounds, msg, total)
    out["link"] = await _measure_link("link", args.small, args.rounds, msg, total)
    out["link_standard_packets"] = await _measure_link("link_standard_packets", args.small, args.rounds, msg, total)
    link, untuned, tcp = out["link"], out["untuned"], out["tcp"]
    out["ratios"] = {
        "bulk_tuned_over_untuned": round(link["bulk_mb_s"] / untuned["bulk_mb_s"], 2),
        "bulk_standard_packets_over_untuned": round(out["link_standard_packets"]["bulk_mb_s"] / untuned["bulk_mb_s"], 2),
        "bulk_link_over_tcp": round(link["bulk_mb_s"] / tcp["bulk_mb_s"], 3),
        "rtt_tuned_over_untuned": round(link["rtt_median_ms"] / untuned["rtt_median_ms"], 2),
        "rtt_link_over_tcp": round(link["rtt_median_ms"] / tcp["rtt_median_ms"], 2),
        "rtt_direct_over_tcp": round(out["direct"]["rtt_median_ms"] / tcp["rtt_median_ms"], 2),
        "bulk_direct_over_tcp": round(out["direct"]["bulk_mb_s"] / tcp["bulk_mb_s"], 3),
        "rtt_direct_over_link": round(out["direct"]["rtt_median_ms"] / link["rtt_median_ms"], 2),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradient-nb bench transport", description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=1024, help="small frame size in bytes (default 1024)")
    p.add_argument("--rounds", type=int, default=300, help="round trips per transport (default 300)")
    p.add_argument("--bulk-mib", type=int, default=64, help="bulk volume in MiB (default 64)")
    p.add_argument("--message-kib", type=int, default=1024, help="bulk message size in KiB (default 1024)")
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
