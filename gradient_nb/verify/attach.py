"""Plug verification into serving: commitments on serving peers, audits on entry peers.

``serve`` calls observers (``gradient_nb.serve.observers``) and knows nothing of verification; whoever
composes a peer attaches these. The CLI and the notebook always do, so volunteers commit and entries
verify by default; a script that builds ``ServingPeer`` or ``MeshEngine`` itself calls
:func:`attach_commitments` / :func:`attach_verification`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from ..mesh.identity import Identity
from ..models.loader import ShardModel
from .commitments import Binding, CommitmentBuilder
from .policy import SamplingPolicy
from .service import VerifyManager

log = logging.getLogger(__name__)

MAX_COMMIT_SESSIONS = 4096  # commitment buffers kept; a session never dropped is forgotten LRU-first
# Test-only fault injection, read from this process's own environment (never from the network): makes
# this peer a dishonest shard, so tests can check that verification catches it.
TEST_FAULT_ENV = "GRADIENT_NB_TEST_FAULT"


class CommitmentObserver:
    """Signs top-k commitments to every output of a shard, per request (``ShardObserver``).

    Full chunks ride in each ``shard.forward`` reply, the tail in the ``shard.drop`` reply. The last
    stage returns, so commits to, the logits of each call's last position.
    """

    def __init__(self, identity: Identity, model_hash: str) -> None:
        self.identity = identity
        self.model_hash = model_hash
        self._builders: OrderedDict[str, CommitmentBuilder] = OrderedDict()

    def on_load(self, shard: ShardModel) -> ShardModel:
        return shard

    def on_forward(self, key: str, entry: int, end: int, pos: int, tokens: int, output: torch.Tensor,
                   is_last: bool) -> dict[str, Any]:
        b = self._builders.get(key)
        if b is None:
            b = self._builders[key] = CommitmentBuilder(self.identity, Binding(self.model_hash, entry, end, key))
            while len(self._builders) > MAX_COMMIT_SESSIONS:
                self._builders.popitem(last=False)
        self._builders.move_to_end(key)
        records = b.push(pos + tokens - 1, output.reshape(1, -1)) if is_last else b.push(pos, output)
        return {"commit": records} if records else {}

    def on_drop(self, key: str) -> dict[str, Any]:
        b = self._builders.pop(key, None)
        return {"commit": b.flush()} if b is not None else {}


class _TestFault:
    """Serves a dishonest shard (``TEST_FAULT_ENV``): what verification tests must catch."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def on_load(self, shard: ShardModel) -> ShardModel:
        from .simulate import apply_test_fault

        log.warning("TEST FAULT INJECTION %r: this peer serves wrong activations", self.spec)
        return apply_test_fault(shard, self.spec)

    def on_forward(self, *args: Any) -> dict[str, Any]:
        return {}

    def on_drop(self, key: str) -> dict[str, Any]:
        return {}


def attach_commitments(server: Any) -> CommitmentObserver:
    """Make a ``ServingPeer`` commit to its outputs (before ``start()``, so the first load is covered)."""
    fault = os.environ.get(TEST_FAULT_ENV)
    if fault:
        server.observers.append(_TestFault(fault))
    obs = CommitmentObserver(server.mesh.identity, server.info.content_hash)
    server.observers.append(obs)
    return obs


def attach_verification(engine: Any, policy: SamplingPolicy | None = None,
                        accept: Sequence[str] | None = None) -> VerifyManager:
    """Verify a random sample of the requests a ``MeshEngine`` drives, and route around failed peers and
    peers serving a precision not in ``accept`` (default: the precisions the allocation states, else
    float32); stages are checked at the limits of an accepted precision."""
    existing = next((o for o in engine.observers if isinstance(o, VerifyManager)), None)
    if existing is not None:
        return existing
    vm = VerifyManager(engine.mesh, engine.path, engine.info.content_hash, engine.info.num_layers, policy=policy,
                       model_name=engine.model_name, accept=accept)
    engine.observers.append(vm)
    return vm


def verification_of(engine: Any) -> VerifyManager:
    """The verification attached to ``engine``."""
    vm = next((o for o in engine.observers if isinstance(o, VerifyManager)), None)
    if vm is None:
        raise LookupError("verification is not attached to this engine: call "
                          "gradient_nb.verify.attach_verification(engine) first")
    return vm
