"""``gradient-nb bench collab`` end to end, small: real Jupyter servers, mesh peers and Yjs clients on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

KEYS = {"mesh_p50_ms", "mesh_p95_ms", "single_server_p50_ms", "single_server_p95_ms", "ratio_p50", "edits",
        "setup"}


def test_bench_collab_reports_every_edit() -> None:
    out = subprocess.run([sys.executable, "-m", "gradient_nb.cli", "bench", "collab", "--loopback", "--edits", "10",
                          "--warmup", "2"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert KEYS <= set(report)
    assert report["edits"] == report["mesh_arrived"] == report["single_server_arrived"] == 10
    for key in ("mesh_p50_ms", "mesh_p95_ms", "single_server_p50_ms", "single_server_p95_ms"):
        assert report[key] > 0
    assert report["mesh_p95_ms"] >= report["mesh_p50_ms"]
    assert report["ratio_p50"] == pytest.approx(report["mesh_p50_ms"] / report["single_server_p50_ms"], rel=0.01)
    assert "loopback" in report["setup"]
