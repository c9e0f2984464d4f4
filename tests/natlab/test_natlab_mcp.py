"""MCP across real NATs: a ``gradient-nb agent`` process behind a cone NAT hosts the builtin MCP tools; peers
behind a symmetric NAT (so the link goes through coturn) and behind another cone NAT (a direct link) list
and call them with the official ``mcp`` SDK's ``Client`` over the mesh transport, and tool errors arrive
typed. Needs root (the lab raises LabError otherwise: this test fails, it does not skip)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_natlab_matrix import expected_link

from gradient_nb.mesh.ice import IceConfig
from gradient_nb.testing.meshprobe import read_json_line, start_rendezvous
from gradient_nb.testing.natlab import NatLab

pytestmark = [pytest.mark.natlab, pytest.mark.slow]

HOSTS = {"cone1": "cone", "sym1": "symmetric", "cone2": "cone"}
CALLER = str(Path(__file__).with_name("mcp_caller.py"))
MESH = "mcp-nat"


@pytest.fixture(scope="module")
def small_lab() -> Iterator[NatLab]:
    with NatLab(HOSTS, keep_workdir=False) as lab:
        yield lab


def _ice_args(ice: IceConfig) -> list[str]:
    argv = ["--stun", ice.stun] if ice.stun else []
    for url in (ice.turn, *ice.turn_fallbacks) if ice.turn else ():
        argv += ["--turn", url]
    if ice.turn:
        argv += ["--turn-user", str(ice.turn_username), "--turn-password", str(ice.turn_password)]
    return argv


def _call_from(lab: NatLab, host: str, url: str, agent_id: str) -> dict:
    p = lab.spawn(host, [sys.executable, CALLER, url, MESH, json.dumps(lab.ice_config(host).to_dict()), agent_id],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        report = read_json_line(p, 150)
        report.setdefault("stderr", "")
        if not report.get("ok"):
            p.wait(10)
            report["stderr"] = (p.stderr.read() if p.stderr else "")[-3000:]
        return report
    finally:
        lab.stop(p)


def test_a_tool_behind_a_cone_nat_is_listed_and_called_from_behind_other_nats(small_lab: NatLab) -> None:
    lab = small_lab
    rv, url = start_rendezvous(lab)
    agent = lab.spawn("cone1", [sys.executable, "-m", "gradient_nb.cli", "agent", "--rendezvous", url, "--mesh", MESH,
                                "--name", "nat-toolsmith", "--ephemeral", "--heartbeat", "0.5", "--capacity", "2",
                                *_ice_args(lab.ice_config("cone1"))],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = read_json_line(agent, 120)
        assert ready["event"] == "agent" and {"tools.calculate", "tools.convert_units"} <= set(ready["tools"]), ready
        with ThreadPoolExecutor(max_workers=2) as pool:
            reports = dict(zip(("sym1", "cone2"), pool.map(lambda h: _call_from(lab, h, url, ready["peer_id"]),
                                                           ("sym1", "cone2")), strict=True))
        for host, r in reports.items():
            print(f"MCP cone -> {HOSTS[host]}: link={r.get('link')} list+5 calls in {r.get('mcp_s')} s")
            assert r["ok"], (host, r)
            assert {"calculate", "convert_units"} <= set(r["listed"]) == set(r["ledger_tools"]), r
            assert r["schema"]["properties"]["expression"]["type"] == "string"
            by = [(c["tool"], c.get("result"), c.get("error")) for c in r["calls"]]
            assert by[0] == ("calculate", "126", None), by
            assert by[1][0] == "convert_units" and by[1][1] == pytest.approx(212) and by[1][2] is None, by
            assert [e for _, _, e in by[2:]] == ["ZeroDivision", "InvalidArguments", "UnknownTool"], by
            relayed = expected_link("cone", HOSTS[host]) == "relay"
            assert bool(r["link"]["relayed"]) == relayed, (host, r["link"])
    finally:
        lab.stop(agent)
        lab.stop(rv)
