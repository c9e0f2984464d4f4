"""Why a request has no route right now, in words a user can act on, and whether waiting will help.

A route is a chain of ready peers covering layers ``0..num_layers`` (``MeshEngine.current_route``). When
there is none, the reason is one of a few states of the mesh, and they differ in what the user should do:

- something is *on its way*: a peer was given a range and is loading it, this kernel's serve is starting,
  or peers serve the model but the coordinator has not published an allocation yet. Waiting helps.
- layers are *missing*: no live peer holds them, because the peer that held them left the mesh (named,
  with its range, from this kernel's metrics history) or because nobody was ever given them (the peers'
  memory does not add up to the model, or fixed ``layers:`` ranges leave a gap). Waiting helps only if
  someone joins, so by default an ask fails at once with this explanation.

:func:`explain` reads only the replicated state (the registry and the published allocation), so it says
the same as ``%parallax status`` and costs no network round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RouteStatus:
    """``message``: one line for the user; ``progressing``: a route is expected without anyone joining."""

    message: str
    progressing: bool


def _ranges(layers: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in sorted(layers):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _fmt(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{s}–{e}" for s, e in ranges)


def explain(mesh: Any, engine: Any, known_names: dict[str, str] | None = None, *,
            departed: dict[str, tuple[int, int]] | None = None, starting: bool = False) -> RouteStatus:
    """Why ``engine`` has no route on ``mesh`` now. ``known_names``: peer id -> name for peers that may
    have left (the live ones are named from the registry); ``departed``: peer id -> the layers it served
    when last seen, for peers no longer live (the coordinator's re-plan forgets them, the user should
    not); ``starting``: this kernel's serve is starting."""
    from ..serve.coordinator import allocation_of, serving_peers

    model, num = engine.model_name, engine.info.num_layers
    names = dict(known_names or {})
    names.update({p.id: p.name for p in mesh.peers()})
    live = serving_peers(mesh, model)
    alloc = allocation_of(mesh, model)

    def name(pid: str) -> str:
        return names.get(pid, pid[:8])

    if not live:
        if starting:
            return RouteStatus(f"this kernel is starting to serve {model}", True)
        return RouteStatus(f"no peer in the mesh serves {model}: run %%parallax serve here, or "
                           f"%mesh spawn N --serve default", False)
    if alloc is None:
        return RouteStatus(f"{len(live)} peer{'s' * (len(live) != 1)} serve {model}; waiting for the "
                           f"coordinator's first allocation", True)
    covered: set[int] = set()
    loading: list[str] = []
    left: list[str] = []
    for st in alloc.stages():
        rec = live.get(st.peer_id)
        if rec is None:
            left.append(f"{name(st.peer_id)} ({st.start}–{st.end}) left the mesh")
        elif rec["serving"].get("ready") and rec["serving"].get("layers") == [st.start, st.end]:
            covered.update(range(st.start, st.end))
        else:
            loading.append(f"{name(st.peer_id)} is loading {st.start}–{st.end}")
    assigned = {i for st in alloc.stages() if st.peer_id in live for i in range(st.start, st.end)}
    missing = _ranges(set(range(num)) - covered)
    if not missing:  # every layer is held by a ready peer; the route is held back by something else
        return RouteStatus(f"the peers of {model} are re-routing", True)
    never = _ranges(set(range(num)) - assigned)
    parts = [f"layers {_fmt(missing)} of {model} are not served now"]
    gone_ids = {st.peer_id for st in alloc.stages() if st.peer_id not in live}
    missing_set = set(range(num)) - covered
    for pid, (s, e) in sorted((departed or {}).items(), key=lambda kv: kv[1]):
        if pid not in live and pid not in gone_ids and missing_set & set(range(s, e)):
            left.append(f"{name(pid)} ({s}–{e}) left the mesh")
    parts += left + loading
    if never and not left:
        parts.append(f"no live peer was given {_fmt(never)} (their memory, or fixed ranges, "
                     f"do not cover the model)")
    progressing = starting or (not never and bool(loading))
    return RouteStatus("; ".join(parts), progressing)
