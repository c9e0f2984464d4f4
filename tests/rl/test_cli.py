"""`gradient-nb echo train` headless with a sampler process, then `gradient-nb serve --adapter` serves the result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_echo_train_then_serve_the_adapter(warm: Path, tmp_path: Path) -> None:
    config = tmp_path / "echo.yaml"
    config.write_text(f"task: format\nmode: sequential\nmodel: {warm}\nsteps: 2\nnum_generations: 4\n"
                      f"max_tokens: 8\nsave: {tmp_path / 'adapter'}\n")
    out = subprocess.run([sys.executable, "-m", "gradient_nb.cli", "echo", "train", str(config), "--peers", "1"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 2 and all(s["sync_bytes"] > 0 and s["samples"] == 4 for s in steps)
    assert events[-1]["event"] == "done" and events[-1]["status"] == "done"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    served = subprocess.run([sys.executable, "-m", "gradient_nb.cli", "serve", "--peers", "1", "--model", str(warm),
                             "--whole-model", "--adapter", str(tmp_path / "adapter"), "--max-tokens", "4",
                             "--prompt", "hi"], capture_output=True, text=True, timeout=240)
    assert served.returncode == 0, served.stderr[-2000:]
    assert "serving with the LoRA adapter" in served.stdout and "tokens in" in served.stdout
