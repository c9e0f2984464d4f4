"""Untrusted samplers: the trainer audits a fraction of the rollouts against their stages' commitments.

Volunteers' samplers are serving peers, and every serving peer already commits to what it outputs
(``verify.attach_commitments``, on by default for ``gradient-nb peer --serve`` and the notebook): per
request, signed top-k records of each stage's hidden states, or of the last stage's logits, riding back
in the ``shard.forward`` / ``shard.drop`` replies. A rollout is a request like any other, so it carries
those commitments to the trainer, and the trainer holds what a verifier needs: the exact policy the
rollout claims (the base model plus the adapter blob of its version, the very bytes the sampler fetched
and merged) and the inputs it relayed to each stage. INTELLECT-2 checks its volunteers' rollouts the same
way (TOPLOC over prime-rl); here the scheme is the verify layer's, not a second one.

``RolloutAuditor`` is a ``RequestObserver`` on the rollout engine. It records every rollout's stages
(``verify.service.RequestAudit``: inputs by reference, commitment records, drawn tokens) and the peers
that served it. After a batch is sampled, ``audit`` draws each rollout with probability
``audit_fraction`` (``secrets``: a sampler cannot tell which of its rollouts will be checked, and it
commits to all of them before the draw), and for each drawn one, every stage whose session ended
normally is re-computed in ONE prefill over prompt + completion (the inputs the stage was given) with
layers ``start..end`` of the base model with the version's adapter merged by the samplers' own code
(``models.adapter.AdapterMerge``), and judged exactly as ``verify`` judges a shard:
``verify_commitments`` at ``Tolerance.for_precision("float32")`` (RL samples at float32; the trainer
trains at float32), plus ``check_draws`` on the last stage, so a sampler that computes honestly but
returns tokens of its choosing fails too. A rollout without commitments fails (``rejected``): a sampler
that does not commit cannot be audited.

A stage that fails blames only its peer (it was recomputed from the inputs that peer was given). That
peer's rollouts are all dropped from the batch — every group that holds one, since a group is GRPO's
unit — the failure is counted and signed into the mesh state as a verify verdict (``%verify
reputation`` shows it), and the peer is excluded for the rest of the run: routing avoids it
(``avoided_peers``) and the trainer stops syncing it. Honest variation stays far inside the limits
(float32: ~1e-6 against a limit of 4e-3), so honest samplers are not dropped.

Why audit before training and not after: one poisoned batch applied to the adapter cannot be taken
back, and the next version would be published from it; a prefill per audited rollout is cheap next to
its decoding (the trainer teacher-forces every rollout anyway).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.adapter import AdapterMerge, LoraAdapter, adapter_from_bytes
from ..models.loader import ShardModel, load_shard
from ..serve.sampling import MAX_SEED
from ..verify.commitments import Binding
from ..verify.reputation import record_verdict
from ..verify.service import RequestAudit, VerifyManager
from ..verify.verifier import Tolerance, Verdict, check_draws, recompute, verify_commitments
from .rollouts import Group, Rollout

log = logging.getLogger(__name__)

MAX_RECORDS = 4096  # requests whose stages are kept until their batch is audited (a batch is far fewer)
DROP_WAIT_S = 10.0  # how long an audit waits for a rollout's tail commitments (the shard.drop replies)
_SCALE = 1 << 53


@dataclass
class AuditReport:
    """What one batch's audit did."""

    audited: int = 0  # rollouts re-computed
    failed: int = 0  # audited rollouts with a stage that failed
    dropped: int = 0  # rollouts dropped: every rollout of the groups that hold one from a failed sampler
    newly_excluded: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)


class RolloutAuditor:
    """Records the stages of every rollout an engine drives and audits a fraction of them (see the module)."""

    name = "echo-audit"

    def __init__(self, mesh: Any, path: Any, model_hash: str, num_layers: int, *, fraction: float,
                 tol: Tolerance | None = None) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"audit_fraction must be within [0, 1], not {fraction}")
        self.mesh, self.path, self.model_hash, self.num_layers = mesh, path, model_hash, num_layers
        self.fraction = fraction
        self.tol = tol or Tolerance.for_precision("float32")
        self._records: OrderedDict[int, tuple[RequestAudit, asyncio.Future]] = OrderedDict()  # by sampling seed
        self._adapters: OrderedDict[int, tuple[bytes, bytes]] = OrderedDict()  # version -> (config, blob)
        self._shards: dict[tuple[int, int], tuple[ShardModel, AdapterMerge]] = {}
        self.excluded: dict[str, str] = {}  # peer id -> why (the verdict's reason)
        self.verdicts: deque[Verdict] = deque(maxlen=256)  # the latest, newest last
        self.audited = 0
        self.failed = 0
        self.dropped = 0

    # -- the adapters of the versions being sampled ---------------------------------------------
    def remember(self, version: int, config: bytes, blob: bytes, keep: int = 8) -> None:
        """The bytes of ``version`` as published to the samplers (what their rollouts are audited under)."""
        self._adapters[version] = (config, blob)
        while len(self._adapters) > keep:
            self._adapters.popitem(last=False)

    # -- recording (a RequestObserver) ----------------------------------------------------------
    def avoided_peers(self) -> set[str]:
        return set(self.excluded)

    def begin(self, stages: Sequence[tuple[int, int]]) -> RequestAudit:
        return RequestAudit(secrets.token_hex(8), self.mesh.id)

    def on_call(self, audit: RequestAudit, peer: str, start: int, end: int, session: str, pos: int,
                x: torch.Tensor, header: dict[str, Any]) -> None:
        s = audit.stage(peer, start, end, session, end == self.num_layers)
        if x is not None:
            s.inputs.append((pos, x))
        n = 1 if x is None else x.shape[0]
        s.positions.extend([pos + n - 1] if s.is_last else range(pos, pos + n))
        token, spec = header.get("token"), header.get("sample")
        if s.is_last and isinstance(token, int) and isinstance(spec, dict):
            s.draws.append((pos + n - 1, token, spec))
        VerifyManager._add_records(s, header)

    def on_drop(self, audit: RequestAudit, peer: str, start: int, end: int, session: str,
                header: dict[str, Any]) -> None:
        s = audit.stages.get((session, peer, start, end))
        if s is not None:
            VerifyManager._add_records(s, header)
            s.complete = True

    def finish(self, audit: RequestAudit, tokens: int, generate_s: float, dropped: asyncio.Future) -> None:
        seed = next((spec.get("seed") for s in audit.stages.values() for _, _, spec in s.draws), None)
        if isinstance(seed, int):  # a rollout's sampling seed is unique to it (group_seeds: 62 random bits)
            self._records[seed] = (audit, dropped)
            while len(self._records) > MAX_RECORDS:
                self._records.popitem(last=False)

    async def aclose(self) -> None:
        return None

    # -- auditing -------------------------------------------------------------------------------
    def _draw(self) -> bool:
        return secrets.randbelow(_SCALE) < self.fraction * _SCALE

    async def audit(self, groups: list[Group]) -> tuple[list[Group], AuditReport]:
        """Audit a fraction of ``groups``' rollouts; returns the groups to train on and what happened."""
        report = AuditReport()
        taken = [(r, None if r.seed is None else self._records.pop(r.seed & MAX_SEED, None))
                 for g in groups for r in g.rollouts]
        # One batch is sampled at a time: what is left are requests of no batch trained on (a batch dropped
        # for mixed versions, other users of the engine). Their stage inputs are released here.
        self._records.clear()
        for r, rec in taken:
            if rec is not None:
                r.peers = tuple(sorted({s.peer for s in rec[0].stages.values()}))
                r.sampler = ",".join(p[:8] for p in r.peers)
        # A rollout the engine kept no record of (it drew no token) has nothing to audit and no one to blame.
        chosen = [(r, rec) for r, rec in taken if rec is not None and self._draw()]
        drops = [dropped for _, (_, dropped) in chosen]
        if drops:  # the tail commitments come with the shard.drop replies; a drop that failed leaves its
            await asyncio.wait(drops, timeout=DROP_WAIT_S)  # stage incomplete, and it is not judged
        for r, (audit, _) in chosen:
            verdicts = await asyncio.to_thread(self._audit_rollout, r, audit)
            if not verdicts:
                continue
            report.audited += 1
            report.verdicts += verdicts
            self.verdicts.extend(verdicts)
            bad = [v for v in verdicts if not v.ok]
            if bad:
                report.failed += 1
            for v in verdicts:
                record_verdict(self.mesh, v.summary())
            for v in bad:
                if v.peer and v.peer not in self.excluded:
                    self.excluded[v.peer] = f"{v.status}: {v.reason}"
                    report.newly_excluded.append(v.peer)
                    log.warning("sampler %s failed a rollout audit (%s): its rollouts are dropped and it is "
                                "excluded", v.peer[:8], v.reason)
        keep, report.dropped = self.screen(groups)
        self.audited += report.audited
        self.failed += report.failed
        return keep, report

    def screen(self, groups: list[Group]) -> tuple[list[Group], int]:
        """The groups without a rollout from an excluded sampler, and how many rollouts were dropped (async
        mode screens a buffered batch again when it is taken: its sampler may have been caught since)."""
        keep = [g for g in groups if not any(set(r.peers) & set(self.excluded) for r in g.rollouts)]
        dropped = sum(len(g.rollouts) for g in groups) - sum(len(g.rollouts) for g in keep)
        self.dropped += dropped
        return keep, dropped

    def _adapter(self, version: int) -> LoraAdapter:
        if version not in self._adapters:
            raise LookupError(f"version {version} was not published through this auditor")
        return adapter_from_bytes(*self._adapters[version])

    def _shard(self, start: int, end: int) -> tuple[ShardModel, AdapterMerge]:
        if (start, end) not in self._shards:
            shard = load_shard(self.path, start, end, dtype=torch.float32)
            self._shards[(start, end)] = (shard, AdapterMerge(shard.layers, shard.start))
        return self._shards[(start, end)]

    def _audit_rollout(self, r: Rollout, audit: RequestAudit) -> list[Verdict]:
        """The verdicts on the stages of one rollout (worker thread); a stage without commitments fails."""
        stages = [s for s in audit.stages.values() if s.complete and s.inputs]
        if not stages:  # every session was cut by a failover and never completed: nothing to hold anyone to
            return []  # (not counted as audited)
        adapter = self._adapter(r.version)
        out = []
        for s in stages:
            binding = Binding(self.model_hash, s.start, s.end, f"{audit.entry}/{s.session}")
            try:
                inputs = s.sequence()
            except ValueError as exc:  # this entry's record has a gap: nothing the stage can be blamed for
                log.warning("rollout audit skipped a stage of %s: %s", s.peer[:8], exc)
                continue
            shard, merge = self._shard(s.start, s.end)
            merge.apply(adapter)
            ref = recompute(shard, inputs)
            v = verify_commitments(ref, s.records, binding, peer=s.peer, tol=self.tol, expected_positions=s.positions)
            if v.ok and s.draws:
                why = check_draws(ref, s.draws, self.tol)
                if why:
                    v.status, v.reason = "fail", f"a token it returned was not drawn from its logits: {why}"
            v.reason = (v.reason + f" (rollout audit, policy version {r.version})").strip()
            out.append(v)
        return out

