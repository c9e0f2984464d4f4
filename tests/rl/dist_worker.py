"""One data-parallel trainer rank for tests/rl/test_distributed.py (run as a script, one process a rank).

    python dist_worker.py MODEL INIT_METHOD INIT_METHOD_2 WORLD RANK OUT

Every rank computes its share's all-reduced LoRA gradients on a fixed batch. Rank 0 then trains one step
on the whole batch (handing it out) and stops the group; rank 1 follows as an ``EchoRun`` does for a
rank > 0 and must end "done" when told to stop. Each writes its gradients and updated adapter to
OUT/rank{R}.safetensors. Then both join a second group, rank 0 kills itself, and rank 1 must fail with
TrainerLost (exit code 3) instead of waiting for a batch forever.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import torch


def fixed_groups(tokenizer, n_groups: int = 4, n: int = 4) -> list:
    """The same batch in every process: prompts, completions of different lengths, log-probs, rewards."""
    from gradient_nb.rl.rollouts import Group, Rollout
    from gradient_nb.rl.tasks import Prompt

    g = torch.Generator().manual_seed(7)
    vocab = len(tokenizer)
    groups = []
    for k in range(n_groups):
        prompt = tokenizer(f"question {k}: say hi")["input_ids"]
        rs = []
        for _ in range(n):
            length = int(torch.randint(3, 10, (1,), generator=g))
            rs.append(Rollout(0, Prompt(""), list(prompt), torch.randint(4, vocab, (length,), generator=g).tolist(),
                              (-torch.rand(length, generator=g) * 4).tolist(), float(torch.rand(1, generator=g))))
        groups.append(Group(rs))
    return groups


def config(model: str, **kw):
    from gradient_nb.rl.trainer import EchoConfig

    return EchoConfig(model=model, mode="colocated", num_generations=4, prompts_per_step=4, lora_rank=4, seed=3,
                      learning_rate=1e-2, **kw)


def main() -> int:
    model, init, init2, world, rank, out = sys.argv[1:7]
    world, rank = int(world), int(rank)
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from gradient_nb.rl.distributed import DistributedTrainer, TrainerLost, share
    from gradient_nb.rl.trainer import EchoRun

    trainer = DistributedTrainer(config(model, world_size=world, rank=rank, init_method=init, dist_timeout_s=30))
    groups = fixed_groups(trainer.policy.tokenizer)
    grads = trainer.gradients(share(groups, rank, world))
    if rank == 0:
        trainer.train_step(groups)
        trainer.close()  # what EchoRun does when its steps are done: the others stop
    else:
        state = asyncio.run(EchoRun(trainer.cfg, trainer).run())
        print(f"follower {state.status} after {trainer.policy.version} step(s)", flush=True)
    tensors = {f"grad.{k}": v for k, v in grads.items()}
    tensors.update({f"adapter.{k}": v for k, v in trainer.policy.adapter_state().items()})
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))

    again = DistributedTrainer(config(model, world_size=world, rank=rank, init_method=init2, dist_timeout_s=30))
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        asyncio.run(EchoRun(again.cfg, again).run())
    except TrainerLost as exc:
        print(f"TrainerLost: {exc}", flush=True)
        return 3
    return 0

if __name__ == "__main__":
    sys.exit(main())
