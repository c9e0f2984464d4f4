"""`gradient-nb bench serve` runs end to end and prints its figures as one JSON object (no time asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_serve_prints_ratios_against_its_own_baseline() -> None:
    out = subprocess.run([sys.executable, "-m", "gradient_nb.cli", "bench", "serve", "--peers", "2", "--tokens", "3"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "serve" and figures["peers"] == 2 and figures["new_tokens"] == 3
    for key in ("mesh_single_stream_ratio", "mesh_ttft_ratio", "mesh_8_streams_ratio_to_one_process_single"):
        assert figures[key] > 0
    # The ratio is the mesh figure over the baseline measured in the same run.
    assert figures["mesh_single_stream_ratio"] == pytest.approx(
        figures["mesh_single_stream_tokens_per_s"] / figures["baseline_one_process_tokens_per_s"], rel=0.02)
    assert sum(e - s for pipe in figures["allocation"] for _, s, e in pipe) % 30 == 0
