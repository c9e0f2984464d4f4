"""The mesh itself through real NATs: ``gradient-nb rendezvous`` on the lab's public server, ``gradient-nb
peer`` processes and :mod:`gradient_nb.testing.meshprobe` drivers inside NATed lab hosts.

Every pair of NAT types links through the mesh and can call, stream and sync state, directly where a
direct path exists and through coturn where it cannot, with nobody choosing a relay policy; a join
that needs TURN and has only STUN fails at once and says so; a mesh of three NATed LANs keeps working
after its rendezvous is killed. Needs root (the lab raises LabError otherwise: these tests fail, they
do not skip).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import host_of
from test_natlab_matrix import expected_link

from gradient_nb.testing.meshprobe import (
    peer_argv,
    read_json_line,
    spawn_probe,
    start_peer,
    start_rendezvous,
)
from gradient_nb.testing.natlab import NAT_TYPES, NatLab

pytestmark = [pytest.mark.natlab, pytest.mark.slow]

PAIRS = list(itertools.combinations_with_replacement(NAT_TYPES, 2))
DIRECT_TYPES = {"host", "srflx", "prflx"}
BULK = 1 << 20


@pytest.fixture(scope="module")
def rendezvous(lab: NatLab) -> Iterator[str]:
    proc, url = start_rendezvous(lab)
    try:
        yield url
    finally:
        lab.stop(proc)


def _pair(lab: NatLab, url: str, a: str, b: str) -> dict[str, Any]:
    """A ``gradient-nb peer`` behind NAT type ``a`` and a probe behind ``b``, alone in their own mesh."""
    mesh = f"pair-{a}-{b}"
    peer = probe = None
    try:
        peer, pid = start_peer(lab, host_of(a, 1), url, name=f"peer-{a}", mesh=mesh)
        probe = spawn_probe(lab, host_of(b, 2), url, mesh=mesh, peers=[pid], bulk=BULK)
        report = read_json_line(probe, 240)
        report["peer_id"] = pid
        try:
            probe.wait(20)  # it leaves the mesh after its report
        except subprocess.TimeoutExpired:
            pass
        return report
    except (RuntimeError, TimeoutError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        for p in (probe, peer):
            if p is not None:
                lab.stop(p)


@pytest.fixture(scope="module")
def pairs(lab: NatLab, rendezvous: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Every pair, three at a time: each pair has its own mesh, processes and ports, and the NAT
    routers keep one conntrack entry per flow, so concurrent pairs do not disturb each other."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        reports = dict(zip(PAIRS, pool.map(lambda p: _pair(lab, rendezvous, *p), PAIRS), strict=True))
    for (a, b), r in reports.items():
        peer = next(iter(r.get("peers", {}).values()), {})
        mine, theirs = peer.get("link") or {}, peer.get("remote_link") or {}
        print(f"mesh {a:>11} <-> {b:<11} ok={r['ok']} link={peer.get('link_type')} "
              f"(probe {mine.get('local_type')}->{mine.get('type')} relayed={mine.get('relayed')}; "
              f"peer {theirs.get('local_type')}->{theirs.get('type')} relayed={theirs.get('relayed')}) "
              f"connect={peer.get('connect_s')} s rtt={peer.get('rtt_ms')} ms bulk={peer.get('bulk_MBps')} MB/s")
    return reports


def _the_peer(report: dict[str, Any]) -> dict[str, Any]:
    assert report["ok"], report
    (peer,) = report["peers"].values()
    return peer


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_pair_links_calls_streams_and_syncs_state(pairs: dict, pair: tuple[str, str]) -> None:
    report = pairs[pair]
    peer = _the_peer(report)
    assert peer["echo"] and peer["stream"] and peer["state"], peer
    assert peer["bulk_bytes"] == BULK
    assert report["registry"] == sorted([report["self"], report["peer_id"]])
    mine, theirs = peer["link"], peer["remote_link"]
    want = expected_link(*pair)
    assert peer["link_type"] == want, peer
    if want == "direct":
        assert not mine["relayed"] and not theirs["relayed"], peer
        assert {mine["local_type"], mine["type"], theirs["local_type"], theirs["type"]} <= DIRECT_TYPES, peer
    else:
        # Both ends say so: the mesh shows relayed links as such (ARCHITECTURE principle 2).
        assert mine["relayed"] and theirs["relayed"], peer
        assert "relay" in {mine["local_type"], theirs["local_type"]}, peer


@pytest.mark.parametrize("pair", [("cone", "cone"), ("public", "cone")], ids=["cone-cone", "public-cone"])
def test_cone_links_are_direct_with_turn_configured(pairs: dict, pair: tuple[str, str]) -> None:
    report = pairs[pair]
    peer = _the_peer(report)
    assert report["ice"]["turn"], "the probe had a TURN server to fall back on"
    assert peer["link_type"] == "direct"
    # A cone NAT's STUN-learned address (or the public host's own) carries the link.
    assert {peer["link"]["type"], peer["remote_link"]["type"]} & {"srflx", "host"}, peer


def test_symmetric_nat_with_turn_connects_without_a_relay_policy(lab: NatLab, pairs: dict) -> None:
    for pair in (("cone", "symmetric"), ("symmetric", "symmetric"), ("public", "symmetric")):
        report = pairs[pair]
        peer = _the_peer(report)
        assert "relay_only" not in report["ice"], report["ice"]
        assert peer["link_type"] == expected_link(*pair), (pair, peer)
    # Nor does the peer process get one: its command line has no such option to give.
    argv = peer_argv("ws://x:1", name="n", mesh="m", ice=lab.ice_config(host_of("symmetric", 1)))
    assert not any("relay" in a for a in argv), argv


def test_udp_blocked_lan_joins_over_turn_tcp(pairs: dict) -> None:
    report = pairs[("cone", "udp-blocked")]
    _the_peer(report)
    # No UDP leaves that LAN: the probe resolved TURN to TCP and dropped STUN.
    assert report["ice"]["turn"].endswith("transport=tcp") and "stun" not in report["ice"], report["ice"]


def test_stun_only_through_symmetric_nat_fails_fast_and_says_turn_is_needed(lab: NatLab, rendezvous: str) -> None:
    mesh = "stun-only"
    cone, sym = host_of("cone", 2), host_of("symmetric", 1)
    first, first_id = start_peer(lab, cone, rendezvous, name="cone-volunteer", mesh=mesh,
                                 ice=lab.ice_config(cone, turn=False))
    try:
        started = time.monotonic()
        joiner = lab.spawn(sym, peer_argv(rendezvous, name="sym-joiner", mesh=mesh,
                                          ice=lab.ice_config(sym, turn=False)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = joiner.communicate(timeout=90)
        finally:
            lab.stop(joiner)
        print(f"STUN-only join through a symmetric NAT refused after {time.monotonic() - started:.1f} s: "
              f"{err.strip()}")
        assert joiner.returncode == 2, (out, err)
        assert '"joined"' not in out
        assert err.startswith("error: "), err
        # The reason comes from the ICE failure (not a timeout), names the peer, and says what to do.
        assert "TURN server is needed" in err, err
        assert "cone-volunteer" in err and first_id[:8] in err, err
        assert "symmetric NAT" in err, err
    finally:
        lab.stop(first)


def test_three_natted_lans_survive_rendezvous_loss(lab: NatLab) -> None:
    rv, url = start_rendezvous(lab)
    mesh = "three-lans"
    procs: list[subprocess.Popen] = [rv]
    try:
        cone, cone_id = start_peer(lab, host_of("cone", 1), url, name="cone-lan", mesh=mesh)
        procs.append(cone)
        # The second peer's join links it to the first (or the join fails), so the peers are linked.
        sym, sym_id = start_peer(lab, host_of("symmetric", 1), url, name="sym-lan", mesh=mesh)
        procs.append(sym)
        ids = [cone_id, sym_id]
        probe = spawn_probe(lab, host_of("udp-blocked", 1), url, mesh=mesh, peers=ids, pause=True)
        procs.append(probe)
        before = read_json_line(probe, 240)
        assert before["ok"], before
        everyone = sorted([*ids, before["self"]])
        assert before["registry"] == everyone
        for pid, peer in before["peers"].items():
            assert peer["echo"] and peer["stream"] and peer["state"], peer
            # cone <-> udp-blocked and symmetric <-> udp-blocked need the relay.
            assert peer["link_type"] == "relay", peer
            view = before["views"][pid]
            assert view["peers"] == everyone, view
            assert set(view["links"]) == set(everyone) - {pid}, view
        print("three LANs:", {p["name"]: (p["link_type"], p["connect_s"], p["rtt_ms"])
                              for p in before["peers"].values()})

        os.killpg(rv.pid, signal.SIGKILL)
        rv.wait(10)
        assert probe.stdin is not None
        probe.stdin.write("go\n")
        probe.stdin.flush()
        after = read_json_line(probe, 240)
        # The whole report (pytest would cut the dict short): which peer failed, and with what error.
        assert after["phase"] == "no-rendezvous" and after["ok"], json.dumps(after, indent=1)
        assert after["rendezvous_connected"] is False
        assert after["dropped_links"] == ids[1:]
        for pid, peer in after["peers"].items():
            assert peer["echo"] and peer["stream"] and peer["state"], peer
            view = after["views"][pid]
            assert view["rendezvous"] is False and view["peers"] == everyone, view
        # The dropped link came back, signaled through the peer that still had links.
        assert set(after["peers"][sym_id]) >= {"connect_s", "link"}, after["peers"][sym_id]
        print("three LANs without the rendezvous:", {p["name"]: (p["link_type"], p.get("connect_s"))
                                                     for p in after["peers"].values()})
        assert probe.wait(60) == 0, probe.stderr.read() if probe.stderr else ""
    finally:
        for p in reversed(procs):
            lab.stop(p)
