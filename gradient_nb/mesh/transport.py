"""The message transport that RPC runs on.

A transport is a reliable, ordered, message-oriented duplex channel between two peers. A WebRTC
link (``link.py``) is the real one; :func:`memory_pair` joins two endpoints in one process for unit
tests of the layers above. Messages may be larger than one data-channel message: a transport
chunks and reassembles them itself, up to ``max_message_size``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable


class LinkClosed(ConnectionError):
    """The transport is closed: nothing more can be sent or received on it."""


class LinkDied(LinkClosed):
    """The transport closed because its link died (missed pings, a broken connection), not because
    either side closed it: the layers above report :class:`~gradient_nb.mesh.errors.LinkLost`."""


@runtime_checkable
class Transport(Protocol):
    max_message_size: int

    @property
    def closed(self) -> bool: ...

    async def send(self, data: bytes) -> None:
        """Send one whole message; waits while the link is congested. Raises LinkClosed."""

    async def recv(self) -> bytes:
        """The next whole message. Raises LinkClosed once the transport is closed."""

    async def close(self) -> None: ...


class _MemoryEnd:
    def __init__(self, max_message_size: int, depth: int) -> None:
        self.max_message_size = max_message_size
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=depth)
        self.other: _MemoryEnd | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, data: bytes) -> None:
        if self._closed or self.other is None or self.other._closed:
            raise LinkClosed("memory transport closed")
        if len(data) > self.max_message_size:
            raise ValueError(f"message of {len(data)} bytes exceeds {self.max_message_size}")
        await self.other._inbox.put(bytes(data))

    async def recv(self) -> bytes:
        if self._closed and self._inbox.empty():
            raise LinkClosed("memory transport closed")
        item = await self._inbox.get()
        if item is None:
            self._closed = True
            raise LinkClosed("memory transport closed")
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for end in (self, self.other):
            if end is not None:
                try:
                    end._inbox.put_nowait(None)
                except asyncio.QueueFull:
                    # The reader is far behind; drop its backlog so the close is seen at once.
                    while not end._inbox.empty():
                        end._inbox.get_nowait()
                    end._inbox.put_nowait(None)


def memory_pair(max_message_size: int = 64 << 20, depth: int = 64) -> tuple[Transport, Transport]:
    """Two connected in-process transport ends (bounded queues, so backpressure is real)."""
    a, b = _MemoryEnd(max_message_size, depth), _MemoryEnd(max_message_size, depth)
    a.other, b.other = b, a
    return a, b
