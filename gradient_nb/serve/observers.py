"""Hooks through which layers above ``serve`` watch serving without ``serve`` knowing them.

Verification (``gradient_nb.verify``) is the user: on a serving peer it commits to every output a
shard returns, and on the entry peer it audits the stages of each request, verifies a sample and
steers routing away from peers caught cheating. ``serve`` only calls these protocols; whoever
composes a peer (the CLI, the notebook, a script) attaches the observers it wants.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ..models.loader import ShardModel


class ShardObserver(Protocol):
    """Watches a serving peer's shard. Header fields it returns travel in the reply."""

    def on_load(self, shard: ShardModel) -> ShardModel:
        """The shard just loaded; returns the shard to serve (normally the same one)."""
        ...

    def on_forward(self, key: str, entry: int, end: int, pos: int, tokens: int, output: torch.Tensor,
                   is_last: bool) -> dict[str, Any]:
        """A ``shard.forward`` of request ``key`` ran layers ``entry..end`` on ``tokens`` tokens from
        position ``pos``; ``output`` is hidden states [tokens, hidden], or on the last stage the logits
        of the last position [vocab]."""
        ...

    def on_drop(self, key: str) -> dict[str, Any]:
        """Request ``key`` ended (``shard.drop``)."""
        ...


class RequestObserver(Protocol):
    """Watches the requests an entry peer drives through chains of stages."""

    name: str  # the key of what ``begin`` returned in ``RequestTrace.observed``

    def avoided_peers(self) -> set[str]:
        """Peers routing must not use."""
        ...

    def begin(self, stages: Sequence[tuple[int, int]]) -> Any:
        """A request starts on a chain with these layer ranges; returns this observer's record of it."""
        ...

    def on_call(self, record: Any, peer: str, start: int, end: int, session: str, pos: int,
                x: torch.Tensor, header: dict[str, Any]) -> None:
        """A stage answered: ``x`` was its input from position ``pos``, ``header`` its reply for this
        request; on the last stage it also holds the ``token`` drawn and the ``sample`` spec it was
        drawn with."""
        ...

    def on_drop(self, record: Any, peer: str, start: int, end: int, session: str,
                header: dict[str, Any]) -> None:
        """A stage answered the request's ``shard.drop``."""
        ...

    def finish(self, record: Any, tokens: int, generate_s: float, dropped: asyncio.Future) -> None:
        """The request ended after ``tokens`` tokens; ``dropped`` completes when every stage dropped it."""
        ...

    async def aclose(self) -> None:
        """The engine is closing: stop any task this observer started."""
        ...
