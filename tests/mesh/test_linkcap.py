"""The link cap: idle links beyond the kept few close, the least recently used go first over the cap,
busy links stay."""

from __future__ import annotations

import pytest

from gradient_nb.mesh.linkcap import LinkCap


def test_idle_links_close_the_recent_and_busy_stay_and_the_cap_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("gradient_nb.mesh.linkcap.time.monotonic", lambda: now[0])
    cap = LinkCap(max_links=4, idle_s=60)
    peers = [f"{i:040x}" for i in range(8)]
    for p in peers:
        now[0] += 1
        cap.touch(p)  # peers[7] is the most recently used
    busy = {peers[0]}
    # Over the cap: the least recently used idle links go first, until 4 are left; busy ones never.
    assert cap.to_evict(peers, busy=busy.__contains__) == peers[1:5]
    left = [peers[0], *peers[5:]]
    assert cap.to_evict(left, busy=busy.__contains__) == []
    # Later, all idle: everything but the 2 kept most recent (and the busy one) closes.
    now[0] += 61
    cap.touch(peers[6])
    assert cap.to_evict(left, busy=busy.__contains__, keep=2) == [peers[5]]
    assert cap.evicted == 5
