"""Data-parallel trainers through torch.distributed (gloo, CPU): two real trainer processes.

On the same fixed batch, two ranks (each a share of whole groups) give the LoRA gradients and the
updated adapter of one trainer on the combined batch, and rank 1 (following as an EchoRun) stops when
rank 0 does; then, in a second group, rank 0 dies, and rank 1 fails loudly (TrainerLost) instead of
waiting for a batch forever.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")


def _init_methods(n: int) -> list[str]:
    """``n`` distinct free loopback ports (held together while chosen, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


def _ranks(tiny: Path, out: Path) -> list[subprocess.CompletedProcess]:
    init, init2 = _init_methods(2)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tiny), init, init2, "2", str(r), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    done = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=180)  # a hang would end here, not in CI's timeout
            done.append(subprocess.CompletedProcess(p.args, p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def test_two_ranks_equal_one_trainer_on_the_combined_batch_and_a_dead_rank_fails_loudly(tiny: Path,
                                                                                         tmp_path: Path) -> None:
    sys.path.insert(0, str(WORKER.parent))
    try:
        from dist_worker import config, fixed_groups
    finally:
        sys.path.remove(str(WORKER.parent))
    from gradient_nb.rl.trainer import Trainer

    rank0, rank1 = _ranks(tiny, tmp_path)
    assert rank0.returncode == -9, rank0.stdout[-2000:]  # it killed itself in the second group
    assert "follower done after 1 step(s)" in rank1.stdout, rank1.stdout[-2000:]
    assert rank1.returncode == 3 and "TrainerLost" in rank1.stdout, rank1.stdout[-2000:]
    one = Trainer(config(str(tiny)))
    groups = fixed_groups(one.policy.tokenizer)
    grads = one.gradients(groups)
    one.train_step(groups)
    adapter = one.policy.adapter_state()
    before = Trainer(config(str(tiny))).policy.adapter_state()
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert {k[5:] for k in got if k.startswith("grad.")} == set(grads) and grads
        assert max(float((got[f"grad.{k}"] - g).abs().max()) for k, g in grads.items()) < 1e-6
        assert max(float((got[f"adapter.{k}"] - w).abs().max()) for k, w in adapter.items()) < 1e-6
    assert max(float((adapter[k] - before[k]).abs().max()) for k in adapter) > 1e-3  # the step did move it

