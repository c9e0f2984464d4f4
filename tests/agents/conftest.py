"""Helpers for the agents tests."""

from __future__ import annotations

from typing import Any


def sync(a: Any, b: Any) -> None:
    """Bring two state replicas into agreement, as their links do (records, or Yjs updates)."""
    if hasattr(a, "export"):
        b.receive(a.export())
        a.receive(b.export())
    else:
        b.doc.apply_update(a.doc.get_update(b.doc.get_state()))
        a.doc.apply_update(b.doc.get_update(a.doc.get_state()))


def replay(state: Any, old: Any) -> None:
    """Put an owner's older, validly signed record back into ``state`` (what a replaying peer does)."""
    if hasattr(state, "receive"):
        state.receive(old)
    else:
        ns, key, raw = old
        from pycrdt import Map

        state.doc.get(ns, type=Map)[key] = raw


def snapshot(state: Any, ns: str, owner: str, name: str) -> Any:
    """The raw signed form of one entry, for a later ``replay``."""
    if hasattr(state, "export"):
        return state.export()
    from pycrdt import Map

    return (ns, f"{owner}/{name}", bytes(state.doc.get(ns, type=Map)[f"{owner}/{name}"]))
