"""The diagnosis of failed links, and IceConfig's fields (no root needed)."""

from __future__ import annotations

from aioice import Candidate

from gradient_nb.mesh.ice import (
    IceConfig,
    explain_failure,
    install_aioice_fixes,
    relay_can_reach,
    same_network,
)

STUN = IceConfig(stun="stun:198.51.100.1:3478")


def cand(kind: str, host: str, port: int = 4000) -> Candidate:
    return Candidate(foundation="f", component=1, transport="udp", priority=1, host=host, port=port, type=kind)


def test_stun_only_behind_nats_asks_for_turn() -> None:
    local = [cand("host", "10.1.0.2"), cand("srflx", "198.51.100.11", 5000)]
    remote = [cand("host", "10.2.0.2"), cand("srflx", "198.51.100.12", 6000)]
    text = explain_failure(STUN, local, remote)
    assert "TURN server is needed" in text
    assert "symmetric NAT" in text


def test_peer_reflexive_on_a_new_port_is_named_as_symmetric_nat_evidence() -> None:
    local = [cand("host", "198.51.100.11")]
    remote = [cand("host", "10.2.0.2"), cand("srflx", "198.51.100.12", 6000), cand("prflx", "198.51.100.12", 7777)]
    text = explain_failure(STUN, local, remote)
    assert "new port" in text and "TURN server is needed" in text


def test_no_reflexive_address_means_udp_is_blocked() -> None:
    text = explain_failure(STUN, [cand("host", "10.3.0.2")], [cand("host", "198.51.100.12")])
    assert "UDP looks blocked" in text and "TCP or TLS" in text


def test_turn_configured_without_relay_candidate() -> None:
    ice = IceConfig(stun=STUN.stun, turn="turn:198.51.100.1:3478?transport=udp", turn_username="u", turn_password="p")
    text = explain_failure(ice, [cand("host", "10.3.0.2")], [cand("host", "198.51.100.12")])
    assert "no relay candidate" in text


def test_relay_present_points_at_the_relay() -> None:
    text = explain_failure(STUN, [cand("relay", "198.51.100.1")], [cand("srflx", "198.51.100.12")])
    assert "relay was available" in text


def test_peers_on_one_machine_or_lan_are_not_blamed_on_nats() -> None:
    no_stun = IceConfig()
    one_host = explain_failure(no_stun, [cand("host", "172.17.0.5")], [cand("host", "172.17.0.5", 5000)])
    assert "one local network" in one_host and "busy" in one_host
    assert same_network([cand("host", "192.168.1.5")], [cand("host", "192.168.1.9")])
    assert not same_network([cand("host", "10.1.0.2")], [cand("host", "10.2.0.2")])
    # The same private /24 behind two different NATs (two homes on 192.168.1.x) is not one network.
    assert not same_network([cand("host", "192.168.1.5"), cand("srflx", "198.51.100.11")],
                            [cand("host", "192.168.1.5"), cand("srflx", "198.51.100.12")])
    assert same_network([cand("host", "192.168.1.5"), cand("srflx", "198.51.100.11")],
                        [cand("host", "192.168.1.9"), cand("srflx", "198.51.100.11")])


def test_ice_config_round_trips_with_fallbacks() -> None:
    ice = IceConfig(stun="stun:h:3478", turn="turn:h:3478", turn_username="u", turn_password="p",
                    turn_fallbacks=("turn:h:3478?transport=tcp", "turns:h:5349"))
    assert IceConfig.from_dict(ice.to_dict()) == ice
    assert ice.to_dict()["turn_fallbacks"] == ["turn:h:3478?transport=tcp", "turns:h:5349"]
    # aiortc uses one TURN server: the first; the fallbacks are for resolved().
    servers = ice.to_rtc().iceServers
    assert [s.urls for s in servers] == ["stun:h:3478", "turn:h:3478"]


def test_relays_on_public_servers_skip_private_peers() -> None:
    assert install_aioice_fixes()
    assert not relay_can_reach("198.51.100.1", "10.2.0.2")
    assert not relay_can_reach("203.0.113.9", "fe80::1")
    assert relay_can_reach("198.51.100.1", "198.51.100.12")
    assert relay_can_reach("192.168.1.5", "192.168.1.7")  # a TURN server on the LAN itself


def test_own_missing_relay_is_named_before_the_remote_relay() -> None:
    """Issue 17 item 6: a remote relay candidate used to hide that this end obtained none."""
    ice = IceConfig(stun=STUN.stun, turn="turn:198.51.100.1:3478?transport=udp", turn_username="u", turn_password="p")
    text = explain_failure(ice, [cand("host", "10.3.0.2")], [cand("host", "10.2.0.2"), cand("relay", "198.51.100.1")])
    assert "no relay candidate was obtained here" in text
    both = explain_failure(ice, [cand("host", "10.3.0.2"), cand("relay", "198.51.100.1", 7000)],
                           [cand("relay", "198.51.100.1")])
    assert "relay was available" in both
