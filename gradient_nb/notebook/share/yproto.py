"""The few pieces of the Yjs protocol the bridge needs beyond pycrdt: origin-tagged updates, state
vectors, awareness de-duplication, and chunking.

- :class:`TaggedDoc` is a pycrdt ``Doc`` whose update events say where the change came from (the
  Jupyter room, the mesh, one joiner's session). pycrdt calls ``Doc.observe`` callbacks synchronously
  inside ``apply_update``, so a field set around that call tags exactly the events it causes. The bridge
  forwards an update to every side except the one it came from; echoes would be harmless (applying a
  known update changes nothing and fires no event) but cost a round trip each.
- A state vector (``Doc.get_state()``) is ``varuint n, n x (varuint client, varuint clock)``.
  :func:`state_vector` decodes it, bounded, for the seed check (client 0 is the seed that
  jupyter-server-ydoc writes from the file, see ``share/__init__``).
- Awareness updates (``varuint n, n x (client, clock, JSON state)``) are relayed between rooms that
  echo them back (pycrdt-websocket's ``YRoom`` sends a client's awareness to every client, itself
  included). :class:`AwarenessRelay` keeps the highest clock seen per client and lets an entry through
  only when it is news, so a state crosses each bridge once and never loops.
- :func:`chunks` / :class:`Reassembler` cut updates into pieces small enough for one mesh frame each
  and put them back together with a bound on the total.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from pycrdt import Decoder, Doc, Encoder, TransactionEvent

EMPTY_UPDATE = b"\x00\x00"
MAX_CLIENTS = 100_000
MAX_AWARENESS_BYTES = 256 << 10
MAX_AWARENESS_STATE_CHARS = 32 << 10

Listener = Callable[[bytes, str], None]


class TaggedDoc:
    """A pycrdt Doc whose update listeners receive ``(update, origin)``."""

    def __init__(self) -> None:
        self.doc = Doc()
        self._origin = "local"
        self._listeners: list[Listener] = []
        self._sub = self.doc.observe(self._on_event)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(update, origin)`` for every change; returns the function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def apply(self, update: bytes, origin: str) -> None:
        """Apply a Yjs update that came from ``origin``. ValueError when it does not decode."""
        if update == EMPTY_UPDATE:
            return
        self._origin = origin
        try:
            self.doc.apply_update(update)
        finally:
            self._origin = "local"

    def state(self) -> bytes:
        return self.doc.get_state()

    def diff(self, state: bytes | None = None) -> bytes:
        """What this doc has that a doc with state vector ``state`` lacks (everything when None)."""
        return self.doc.get_update(state) if state else self.doc.get_update()

    def _on_event(self, event: TransactionEvent) -> None:
        update = event.update
        if update == EMPTY_UPDATE:
            return
        for listener in list(self._listeners):
            listener(update, self._origin)


def state_vector(sv: bytes) -> dict[int, int]:
    """The client → clock map of a Yjs state vector. ValueError when it is malformed."""
    if not isinstance(sv, bytes):
        raise ValueError("a state vector is bytes")
    try:
        dec = Decoder(sv)
        n = dec.read_var_uint() if sv else 0
        if n > MAX_CLIENTS:
            raise ValueError(f"a state vector of {n} clients")
        out = {}
        for _ in range(n):
            client = dec.read_var_uint()
            out[client] = dec.read_var_uint()
    except (IndexError, RuntimeError) as exc:
        raise ValueError(f"malformed state vector: {exc}") from None
    if dec.length != 0:
        raise ValueError("trailing bytes after a state vector")
    return out


def check_state_vector(sv: Any) -> bytes:
    """``sv`` if it is a well-formed state vector (bytes); ValueError otherwise."""
    if not isinstance(sv, bytes):
        raise ValueError("the state vector 'sv' is bytes")
    state_vector(sv)
    return sv


class AwarenessRelay:
    """Lets each awareness entry through once: when its clock is news, or it removes a known state.

    A client id belongs to the side it was first seen from (``source``): entries for it arriving from
    any other side are dropped, so a joiner cannot pose as one of the owner's users (or another
    joiner's) by replaying their client id with a higher clock.
    """

    def __init__(self) -> None:
        self.clocks: dict[int, int] = {}
        self.states: dict[int, Any] = {}
        self.sources: dict[int, str] = {}

    def news(self, update: bytes, source: str = "") -> bytes | None:
        """The entries of ``update`` (from ``source``) not seen before, re-encoded, or None.
        ValueError when malformed."""
        if not isinstance(update, bytes) or len(update) > MAX_AWARENESS_BYTES:
            raise ValueError(f"an awareness update is at most {MAX_AWARENESS_BYTES} bytes")
        fresh: list[tuple[int, int, str]] = []
        try:
            dec = Decoder(update)
            n = dec.read_var_uint()
            if n > MAX_CLIENTS:
                raise ValueError(f"an awareness update of {n} clients")
            for _ in range(n):
                client, clock = dec.read_var_uint(), dec.read_var_uint()
                raw = dec.read_var_string()
                if len(raw) > MAX_AWARENESS_STATE_CHARS:
                    raise ValueError("an awareness state over the size limit")
                state = json.loads(raw) if raw else None  # JSON only: nothing is evaluated
                if self.sources.setdefault(client, source) != source:
                    continue
                known = self.clocks.get(client, -1)
                if clock > known or (clock == known and state is None and self.states.get(client) is not None):
                    self.clocks[client] = clock
                    self.states[client] = state
                    fresh.append((client, clock, raw))
        except (IndexError, RuntimeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed awareness update: {exc}") from None
        if len(self.clocks) > MAX_CLIENTS:  # forget the oldest clients rather than grow without bound
            for client in list(self.clocks)[: len(self.clocks) - MAX_CLIENTS]:
                self.clocks.pop(client, None)
                self.states.pop(client, None)
                self.sources.pop(client, None)
        if not fresh:
            return None
        enc = Encoder()
        enc.write_var_uint(len(fresh))
        for client, clock, raw in fresh:
            enc.write_var_uint(client)
            enc.write_var_uint(clock)
            enc.write_var_string(raw)
        return enc.to_bytes()

    def snapshot(self) -> bytes:
        """Every live state this relay knows, as one awareness update (for a newly joined session)."""
        live = [(c, self.clocks[c], s) for c, s in self.states.items() if s is not None]
        enc = Encoder()
        enc.write_var_uint(len(live))
        for client, clock, state in live:
            enc.write_var_uint(client)
            enc.write_var_uint(clock)
            enc.write_var_string(json.dumps(state, separators=(",", ":")))
        return enc.to_bytes()

    def users(self) -> list[Any]:
        """The live awareness states (``state["user"]`` is the JupyterLab user)."""
        return [s for s in self.states.values() if s is not None]


def chunks(data: bytes, size: int) -> Iterator[tuple[bytes, bool]]:
    """``(piece, more)`` pairs: ``data`` cut into pieces of at most ``size`` bytes."""
    if not data:
        yield b"", False
        return
    for i in range(0, len(data), size):
        yield data[i:i + size], i + size < len(data)


class Reassembler:
    """Joins ``(piece, more)`` chunks into whole messages, refusing any over ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, piece: Any, more: Any) -> bytes | None:
        """The whole message when ``piece`` completes one, else None. ValueError on bad input."""
        if not isinstance(piece, bytes) or not isinstance(more, bool):
            raise ValueError("a chunk is bytes with a bool 'more'")
        self._size += len(piece)
        if self._size > self.limit:
            self.reset()
            raise ValueError(f"an update over {self.limit} bytes")
        self._parts.append(piece)
        if more:
            return None
        whole = b"".join(self._parts)
        self.reset()
        return whole

    def reset(self) -> None:
        self._parts, self._size = [], 0
