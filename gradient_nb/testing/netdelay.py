"""Delay every packet of an NFQUEUE queue by D ms: network delay where the kernel has no ``netem``.

An iptables rule (``-j NFQUEUE --queue-num Q``) hands each packet to this process over
nfnetlink_queue; it keeps the packet's id and issues the ACCEPT verdict D ms after the packet arrived.
All packets get the same delay, so they leave in the order they came (no reordering), and only
metadata is copied to us (``NFQNL_COPY_META``): the payload stays in the kernel. The NAT lab
(``natlab.NatLab(..., delay_ms=D)``) runs one in each router namespace, on the packets leaving the LAN.

The protocol is small enough to speak directly (``include/uapi/linux/netfilter/nfnetlink_queue.h``):
bind the queue with a config message, read ``NFQNL_MSG_PACKET`` messages, answer ``NFQNL_MSG_VERDICT``.

    ip netns exec ROUTER python -m gradient_nb.testing.netdelay --queue 0 --delay-ms 20
"""

from __future__ import annotations

import argparse
import collections
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
QUEUE_MAXLEN = 16384


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs  # nfgenmsg
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


class DelayQueue:
    """Bound to nfnetlink queue ``queue``: every packet is accepted ``delay_s`` after it arrived."""

    def __init__(self, queue: int, delay_s: float) -> None:
        self.queue, self.delay_s = queue, delay_s
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.held: collections.deque[tuple[float, int]] = collections.deque()  # (due, packet id), FIFO
        self.packets = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)) +
                     _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)))

    def _config(self, attrs: bytes) -> None:
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq=1))
        while True:
            data = self.sock.recv(65536)
            kind = struct.unpack_from("=H", data, 4)[0]
            if kind == NLMSG_ERROR:
                err = struct.unpack_from("=i", data, 16)[0]
                if err:
                    raise OSError(-err, f"binding nfnetlink queue {self.queue} failed")
                return

    def _accept(self, packet_id: int) -> None:
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.queue,
                                _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))))

    def _read(self) -> None:
        data = self.sock.recv(1 << 20)
        now = time.monotonic()
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                a = off + 20  # after nlmsghdr and nfgenmsg
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    if atype & 0x7FFF == NFQA_PACKET_HDR:
                        self.held.append((now + self.delay_s, struct.unpack_from("!I", data, a + 4)[0]))
                        self.packets += 1
                        break
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3

    def run(self) -> None:
        while True:
            now = time.monotonic()
            while self.held and self.held[0][0] <= now:
                self._accept(self.held.popleft()[1])
            timeout = max(0.0, self.held[0][0] - now) if self.held else 1.0
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if ready:
                self._read()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradient_nb.testing.netdelay")
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--delay-ms", type=float, required=True)
    args = p.parse_args(argv)
    q = DelayQueue(args.queue, args.delay_ms / 1000)
    print("ready", flush=True)
    try:
        q.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
