"""Issue 17 item 6: a NAT that forgets its mappings (router reboot, short UDP timeout) while a stream
flows. The link is found dead from its pings, in-flight calls fail at once with the retryable
``LinkLost`` (not a 30 s ``CallTimeout``), the mesh re-links by itself, and calls and streams work
again over the new link. Two peers behind two cone NATs (a WebRTC link: neither can dial the other's
private address), and a NATed peer with a public one (a direct TCP link). Needs root.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradient_nb.testing.meshprobe import read_json_line, start_rendezvous
from gradient_nb.testing.natlab import NatLab

pytestmark = [pytest.mark.natlab, pytest.mark.slow]

SCRIPT = str(Path(__file__).with_name("relink_peer.py"))


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    with NatLab({"cone1": "cone", "cone2": "cone", "pub1": "public"}, keep_workdir=False) as lab:
        yield lab


@pytest.mark.parametrize(("server_host", "kinds", "protocols"), [
    ("cone2", ("webrtc-direct", "webrtc-relay"), ("udp",)),  # two NATs: a WebRTC link, found dead by pings
    ("pub1", ("direct-tcp",), ("tcp",)),  # the NATed peer dials the public one: TCP, found dead by the kernel
], ids=["webrtc", "direct-tcp"])
def test_a_forgotten_nat_mapping_fails_calls_fast_and_the_mesh_relinks(
        lab: NatLab, server_host: str, kinds: tuple[str, ...], protocols: tuple[str, ...]) -> None:
    rendezvous, url = start_rendezvous(lab)
    procs = [rendezvous]
    try:
        def spawn(host: str, *args: str) -> subprocess.Popen:
            ice = json.dumps(lab.ice_config(host).to_dict())
            p = lab.spawn(host, [sys.executable, SCRIPT, args[0], url, ice, *args[1:]], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            return p

        server = spawn(server_host, "serve")
        peer_id = read_json_line(server, 90)["peer_id"]
        driver = spawn("cone1", "drive", peer_id)
        flowing = read_json_line(driver, 120)
        assert flowing["streaming"] and flowing["kind"] in kinds, flowing

        lab.forget_mappings("cone1", protocols=protocols)
        driver.stdin.write("broken\n")
        driver.stdin.flush()

        ended = read_json_line(driver, 60)
        print("stream ended:", ended, "link before:", flowing)
        assert ended["error_type"] == "LinkLost" and ended["retryable"], ended
        assert "lost" in ended["message"] and "retry" in ended["message"], ended
        resumed = read_json_line(driver, 120)
        print("resumed:", resumed)
        assert resumed["resumed"], resumed
        assert resumed["kind"] in kinds and resumed["rtt_ms"] is not None
    finally:
        for p in reversed(procs):
            lab.stop(p)
