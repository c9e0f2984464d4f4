"""Smoke test of ``gradient-nb bench scale`` at a tiny n (the real figures take minutes: README)."""

from __future__ import annotations

import json

from gradient_nb.cli import main


def test_bench_scale_prints_one_json_object_with_the_issue_keys(capsys) -> None:
    assert main(["bench", "scale", "--n", "6", "12", "--latency-ms", "1", "--loss", "0", "--width", "12"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert [r["n"] for r in rows] == [6, 12]
    for r in rows:
        for key in ("n", "join_s", "lookup_hops_p50", "msgs_per_peer_s", "state_bytes_per_peer", "replan_s"):
            assert r[key] >= 0 and key in r
        assert r["lookup_hops_p50"] >= 1 and r["ranges_with_live_providers"] >= 1
        # Each registry replica holds one signed record per peer; the directory's state is far below that.
        assert r["registry_state_bytes_per_peer"] > 0 and r["registry_msgs_per_peer_s"] == r["n"] / out["heartbeat_s"]
    assert rows[1]["registry_state_bytes_per_peer"] > rows[0]["registry_state_bytes_per_peer"]
