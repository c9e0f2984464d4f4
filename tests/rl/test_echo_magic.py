"""`%%echo train` runs on the kernel's loop (other code keeps running), `%echo status|metrics|stop`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import polars as pl
import pytest
from IPython.core.error import UsageError

from gradient_nb.notebook.echo_magic import _RUN, EchoMagics


async def test_echo_magic_colocated(warm: Path, ipython) -> None:
    ip = ipython
    ip.register_magics(EchoMagics)
    with pytest.raises(UsageError, match="unknown echo settings"):
        ip.run_cell_magic("echo", "train", "mode: colocated\nbogus: 1\n")
    ip.run_cell_magic("echo", "train", f"task: {{name: format, min_len: 4, max_len: 4}}\nmode: colocated\n"
                                       f"model: {warm}\nsteps: 3\nnum_generations: 4\nmax_tokens: 24\n")
    ticks = 0
    while "run" not in _RUN or _RUN["run"].state.status in ("starting", "running"):
        ticks += 1  # the loop is free while it trains
        await asyncio.sleep(0.01)
    assert ticks > 10
    status = ip.run_line_magic("echo", "status")
    assert status["status"] == "done" and status["done_steps"] == 3
    frame = ip.run_line_magic("echo", "metrics")
    assert isinstance(frame, pl.DataFrame) and frame.height == 3 and "reward_mean" in frame.columns
    with pytest.raises(UsageError, match="samples on the mesh: join it"):
        ip.run_cell_magic("echo", "train", "mode: sequential\nsteps: 1\n")
