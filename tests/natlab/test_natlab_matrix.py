"""Every pair of NAT types connects through plain aiortc, directly where a direct path exists and
through coturn where it cannot, with the default transport policy (nobody picks "relay")."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import host_of, run_probe

from gradient_nb.testing.natlab import NAT_TYPES, NatLab

pytestmark = pytest.mark.natlab

PAIRS = list(itertools.combinations_with_replacement(NAT_TYPES, 2))


def expected_link(a: str, b: str) -> str:
    """Which link ICE should end up with between hosts behind NATs of types ``a`` and ``b``."""
    both = {a, b}
    if "udp-blocked" in both:
        return "relay"  # no UDP leaves that LAN: only TURN over TCP
    if both in ({"symmetric"}, {"symmetric", "cone"}):
        # A symmetric NAT's port for the peer is unknown to it, and the other side's NAT filters
        # by port: no hole can be punched. (public <-> symmetric works directly: the public host
        # answers the check that arrives from the new port, learned as peer-reflexive.)
        return "relay"
    return "direct"


@pytest.fixture(scope="module")
def matrix(lab: NatLab) -> dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]]:
    """All pairs, run a few at a time: each pair has its own processes and ports, and the NAT
    routers keep one conntrack entry per flow, so concurrent pairs do not disturb each other."""

    def one(pair: tuple[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
        a, b = pair
        return run_probe(lab, host_of(a, 1), host_of(b, 2), bulk=1 << 20)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(PAIRS, pool.map(one, PAIRS), strict=True))


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_pair_connects_with_expected_link(matrix: dict, pair: tuple[str, str]) -> None:
    offer, answer = matrix[pair]
    assert offer["ok"], offer
    assert answer["ok"], answer
    assert offer["echoed"] == 5
    assert answer["bulk_received"] == 1 << 20
    want = expected_link(*pair)
    for report in (offer, answer):
        assert report["link_type"] == want, report
        types = {report["local_type"], report["remote_type"]}
        if want == "direct":
            assert "relay" not in types and types <= {"host", "srflx", "prflx"}, report
        else:
            assert "relay" in types, report


@pytest.mark.parametrize("pair", [("cone", "cone"), ("public", "cone")], ids=["cone-cone", "public-cone"])
def test_cone_links_are_direct_even_with_turn_configured(matrix: dict, pair: tuple[str, str]) -> None:
    offer, answer = matrix[pair]
    assert offer["turn"] and answer["turn"], "both peers had a TURN server to fall back on"
    assert offer["link_type"] == answer["link_type"] == "direct"


def test_udp_blocked_lan_resolves_turn_to_tcp(matrix: dict) -> None:
    offer, answer = matrix[("cone", "udp-blocked")]
    assert offer["turn"].endswith("transport=udp")
    assert answer["turn"].startswith("turn:") and answer["turn"].endswith("transport=tcp")
    # STUN over UDP cannot answer there either; dropping it spares aioice's gathering timeout.
    assert offer["stun"] and answer["stun"] is None
    assert answer["local_type"] == "relay"


def test_turn_over_tls_with_test_ca(lab: NatLab) -> None:
    """TURN over TLS verifies coturn's certificate against the lab CA (SSL_CERT_FILE from spawn)."""
    a, b = host_of("udp-blocked", 1), host_of("symmetric", 2)
    offer, answer = run_probe(lab, a, b, offer_ice=lab.ice_config(a, turn_transport="tls"))
    assert offer["ok"] and answer["ok"], (offer, answer)
    assert offer["turn"].startswith("turns:")
    assert offer["local_type"] == "relay"


def test_symmetric_with_stun_only_fails_with_explanation(lab: NatLab) -> None:
    a, b = host_of("symmetric", 1), host_of("cone", 2)
    offer, answer = run_probe(lab, a, b, offer_ice=lab.ice_config(a, turn=False),
                              answer_ice=lab.ice_config(b, turn=False), timeout=8.0)
    for report in (offer, answer):
        assert not report["ok"], report
        assert "TURN server is needed" in report["explanation"], report
        assert {c["type"] for c in report["local_candidates"]} == {"host", "srflx"}
