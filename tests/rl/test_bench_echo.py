"""Smoke test of `gradient-nb bench echo`: one JSON object with the issue's keys, every mode measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
MODE_KEYS = {"reward_first", "reward_last", "samples_per_s", "step_s", "sync_ms", "sync_bytes"}


def test_bench_echo_smoke(warm: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "gradient_nb.cli", "bench", "echo", "--model", str(warm),
                          "--steps", "2", "--num-generations", "2", "--max-tokens", "8"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    for mode in ("colocated", "sequential", "async"):
        assert MODE_KEYS <= set(report[mode]) and report[mode]["samples_per_s"] > 0
    assert report["colocated"]["sync_bytes"] == 0 and report["sequential"]["sync_bytes"] > 0
    assert report["async_vs_sequential_samples_per_s"] > 0 and report["async_vs_colocated_reward"] >= 0
    assert report["placement"]["pinned"] is True and report["placement"]["torch_threads"] == 1
