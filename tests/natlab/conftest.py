"""NAT lab fixtures: one lab per module (namespaces, NAT routers, coturn), probes run inside it.

These tests need root (CI runs as root). Without it the lab raises LabError and they fail: a NAT
lab that silently skips would let a regression in NAT traversal through unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from gradient_nb.mesh.ice import IceConfig
from gradient_nb.testing.natlab import NatLab

# Two hosts of every NAT type, so that every unordered pair of types (same type included) exists.
HOSTS = {f"{short}{i}": nat for nat, short in (("public", "pub"), ("cone", "cone"), ("symmetric", "sym"),
                                               ("udp-blocked", "udpb")) for i in (1, 2)}


def host_of(nat: str, i: int) -> str:
    return next(h for h, n in HOSTS.items() if n == nat and h.endswith(str(i)))


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    with NatLab(HOSTS, keep_workdir=False) as lab:
        yield lab


def run_probe(lab: NatLab, offer_host: str, answer_host: str, *, offer_ice: IceConfig | None = None,
              answer_ice: IceConfig | None = None, timeout: float = 20.0, bulk: int = 0,
              messages: int = 5) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the link probe between two lab hosts; returns (offerer's report, answerer's report)."""
    with tempfile.TemporaryDirectory(prefix="gnb-probe-") as sig:
        procs = []
        for role, host, ice in (("offer", offer_host, offer_ice), ("answer", answer_host, answer_ice)):
            ice = ice if ice is not None else lab.ice_config(host)
            procs.append(lab.spawn(host, [sys.executable, "-m", "gradient_nb.testing.linkprobe", role,
                                          "--signal", sig, "--ice", json.dumps(ice.to_dict()),
                                          "--timeout", str(timeout), "--messages", str(messages),
                                          "--bulk", str(bulk)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        reports = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=timeout + 30)
            except subprocess.TimeoutExpired:
                lab.stop(p)
                raise
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if not lines:
                raise AssertionError(f"probe printed no report (rc {p.returncode}): {err[-3000:]}")
            reports.append(json.loads(lines[-1]))
        return reports[0], reports[1]
