"""Verification on the entry peer: audit each request's stages, verify a random sample, keep verdicts.

The entry peer already relays every stage's input, so it knows exactly what each shard was given:
it keeps references to those tensors (no copy) and the commitments that came back in the replies.
For a sampled stage it recomputes the stage's output over the whole sequence in one prefill and
judges the commitments against it. The prefill runs on another peer that serves the same layers,
through the ordinary ``shard.forward`` call with a fresh session (to that peer, it is one more
prefill of one more request), or, where no such peer exists or for the last stage (whose ordinary
reply is the last position's logits only), on a copy of the layers this peer loads itself.

Because the recomputation starts from the very inputs the verified shard got, a verdict blames only
that shard: an upstream shard that cheated does not make an honest downstream one fail. On the last
stage, which draws the tokens itself, each returned token is also checked against the recomputed
logits and the sampling spec the entry sent (``verifier.check_draws``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..mesh.errors import MeshError
from ..mesh.frames import Message
from ..mesh.peer import Mesh
from ..models.loader import ShardModel, load_shard
from ..serve.node import forward_one
from .commitments import Binding
from .policy import SamplingPolicy
from .reputation import failed_peers, record_verdict
from .verifier import Tolerance, Verdict, check_draws, recompute, verify_commitments

log = logging.getLogger(__name__)

VERIFY_TIMEOUT = 120.0
MAX_COMMIT_RECORDS = 4096  # per audited stage: a flood of records from a shard is itself a failure


@dataclass
class StageAudit:
    """One stage of one request on one session: inputs sent, commitments received."""

    peer: str
    start: int
    end: int
    session: str
    is_last: bool
    inputs: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (pos, x) per call
    records: list[Any] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # positions whose output the shard returned
    draws: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)  # last stage: (pos, token, spec)
    sampled: bool = False
    trimmed: bool = False  # inputs released (an older request; its sampled stages are done)
    complete: bool = False  # the session ended normally (its tail commitment was collected)
    verdict: Verdict | None = None

    def sequence(self) -> torch.Tensor:
        """Everything the stage was given, positions 0..T-1 in order."""
        parts, at = [], 0
        for pos, x in sorted(self.inputs, key=lambda px: px[0]):
            if pos != at:
                raise ValueError(f"the recorded inputs skip from position {at} to {pos}")
            parts.append(x)
            at += x.shape[0]
        return torch.cat(parts)


@dataclass
class RequestAudit:
    """Every stage of one generation, with the verdicts of those verified."""

    id: str
    entry: str
    stages: dict[tuple[str, str, int, int], StageAudit] = field(default_factory=dict)
    sampled: set[tuple[int, int]] = field(default_factory=set)  # layer ranges drawn for verification
    generate_s: float = 0.0
    tokens: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def stage(self, peer: str, start: int, end: int, session: str, is_last: bool) -> StageAudit:
        key = (session, peer, start, end)
        s = self.stages.get(key)
        if s is None:
            s = self.stages[key] = StageAudit(peer, start, end, session, is_last,
                                              sampled=(start, end) in self.sampled)
        return s

    @property
    def verdicts(self) -> list[Verdict]:
        return [s.verdict for s in self.stages.values() if s.verdict is not None]


class VerifyManager:
    """Samples, verifies and records verdicts for the requests an entry peer drives."""

    def __init__(self, mesh: Mesh, path: Any, model_hash: str, num_layers: int, *,
                 policy: SamplingPolicy | None = None, keep: int = 8, keep_inputs: int = 2,
                 device: str = "cpu") -> None:
        self.mesh = mesh
        self.path = path
        self.model_hash = model_hash
        self.num_layers = num_layers
        self.policy = policy or SamplingPolicy()
        self.device = device
        self.history: deque[RequestAudit] = deque(maxlen=keep)
        # Stage inputs are the bulk (hidden states of every position): only the newest requests keep
        # them once their sampled verification is done, so that `%verify last` still can.
        self.keep_inputs = keep_inputs
        self._shards: dict[tuple[int, int, str, str | None], ShardModel] = {}
        self._tasks: set[asyncio.Task] = set()
        self._failed_cache: tuple[float, set[str]] = (0.0, set())
        self.verify_s = 0.0  # wall time spent verifying, for the cost figures
        self.verified_tokens = 0

    # -- recording (a RequestObserver of serve's MeshEngine) -----------------------------------
    name = "verify"

    def avoided_peers(self) -> set[str]:
        """Peers caught cheating: routing avoids them."""
        return self.failed_peers()

    def finish(self, audit: RequestAudit, tokens: int, generate_s: float, dropped: asyncio.Future) -> None:
        audit.tokens, audit.generate_s = tokens, generate_s
        self.finish_later(audit, dropped)  # the sampled stages, once their tail commitments are in

    def begin(self, stages: Sequence[tuple[int, int]]) -> RequestAudit:
        audit = RequestAudit(secrets.token_hex(8), self.mesh.id)
        chosen = self.policy.choose(len(stages))
        audit.sampled = {r for i, r in enumerate(stages) if i in chosen}
        self.history.append(audit)
        self._trim()
        return audit

    def _trim(self) -> None:
        old = list(self.history)[: -self.keep_inputs] if self.keep_inputs > 0 else list(self.history)
        for a in old:
            if a.done.is_set():
                for s in a.stages.values():
                    if s.inputs:
                        s.inputs.clear()
                        s.trimmed = True

    def on_call(self, audit: RequestAudit, peer: str, start: int, end: int, session: str, pos: int,
                x: torch.Tensor, header: dict[str, Any]) -> None:
        s = audit.stage(peer, start, end, session, end == self.num_layers)
        s.inputs.append((pos, x))
        n = x.shape[0]
        s.positions.extend([pos + n - 1] if s.is_last else range(pos, pos + n))
        token, spec = header.get("token"), header.get("sample")
        if s.is_last and isinstance(token, int) and isinstance(spec, dict):
            s.draws.append((pos + n - 1, token, spec))
        self._add_records(s, header)

    def on_drop(self, audit: RequestAudit, peer: str, start: int, end: int, session: str,
                header: dict[str, Any]) -> None:
        s = audit.stages.get((session, peer, start, end))
        if s is not None:
            self._add_records(s, header)
            s.complete = True

    @staticmethod
    def _add_records(s: StageAudit, header: dict[str, Any]) -> None:
        recs = header.get("commit")
        if isinstance(recs, list) and len(s.records) + len(recs) <= MAX_COMMIT_RECORDS:
            s.records.extend(recs)
        elif recs is not None:
            s.records.append({"malformed": True})  # judged (and rejected) like any bad record

    # -- verifying -----------------------------------------------------------------------------
    def finish_later(self, audit: RequestAudit, after: asyncio.Future | None = None) -> asyncio.Task:
        """Verify the sampled stages of a finished request in the background."""
        async def run() -> None:
            try:
                if after is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(after), 10)
                await self.verify(audit, sampled_only=True)
            finally:
                audit.done.set()

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    async def verify(self, audit: RequestAudit, *, sampled_only: bool = False,
                     ranges: set[tuple[int, int]] | None = None) -> list[Verdict]:
        """Verify the stages of ``audit`` (all, the sampled ones, or those in ``ranges``) not verified
        yet; returns the new verdicts."""
        out = []
        for s in list(audit.stages.values()):
            if sampled_only and not s.sampled:
                continue
            if ranges is not None and (s.start, s.end) not in ranges:
                continue
            if not s.complete or s.verdict is not None or s.trimmed:
                continue  # cut by a failover (its peer may be gone with its last commitment), done,
                # or too old: its inputs were released
            s.verdict = await self.verify_stage(s)
            record_verdict(self.mesh, s.verdict.summary())
            self._failed_cache = (0.0, set())
            out.append(s.verdict)
        return out

    async def verify_stage(self, s: StageAudit) -> Verdict:
        binding = Binding(self.model_hash, s.start, s.end, f"{self.mesh.id}/{s.session}")
        t0 = time.perf_counter()
        try:
            inputs = s.sequence()
        except ValueError as exc:
            return Verdict(s.peer, s.start, s.end, binding.request, "incomplete", str(exc))
        rec = self.mesh.state.peers().get(s.peer, {}).get("serving") or {}
        dtype, quant = str(rec.get("dtype") or "float32"), rec.get("quantization")
        tol = Tolerance.for_precision(dtype, quant)
        ref, by = None, None
        helper = None if s.is_last else self._other_holder(s)
        if helper is not None:
            try:
                ref, by = await self._recompute_remote(helper, s, inputs), helper[:8]
            except (MeshError, TimeoutError, KeyError, ValueError) as exc:
                log.info("remote recomputation on %s failed (%s); recomputing here", helper[:8], exc)
        if ref is None:
            shard = await asyncio.to_thread(self._shard, s.start, s.end, dtype, quant)
            ref = await asyncio.to_thread(recompute, shard, inputs)
        v = await asyncio.to_thread(verify_commitments, ref, s.records, binding, peer=s.peer, tol=tol,
                                    expected_positions=s.positions)
        if v.ok and s.draws:
            reason = await asyncio.to_thread(check_draws, ref, s.draws, tol)
            if reason:
                v.status, v.reason = "fail", f"a token it returned was not drawn from its logits: {reason}"
        if by is not None and v.status == "fail":
            # Before blaming the shard on a helper's word, recompute here: a helper that lies (to frame
            # a peer, or because it cheats on its own work) is caught instead.
            shard = await asyncio.to_thread(self._shard, s.start, s.end, dtype, quant)
            mine = await asyncio.to_thread(recompute, shard, inputs)
            v = await asyncio.to_thread(verify_commitments, mine, s.records, binding, peer=s.peer, tol=tol,
                                        expected_positions=s.positions)
            if v.ok:
                log.warning("helper %s recomputed layers %d..%d wrongly", by, s.start, s.end)
                record_verdict(self.mesh, Verdict(helper, s.start, s.end, f"{self.mesh.id}/verify-{s.session}", "fail",
                                                  "its recomputation for a verifier was wrong").summary())
                self._failed_cache = (0.0, set())
                by = None
            else:
                by = f"{by[:8]}, confirmed here"
        v.verify_s = time.perf_counter() - t0
        self.verify_s += v.verify_s
        self.verified_tokens += inputs.shape[0]
        if by is not None:
            v.reason = (v.reason + f" (recomputed by {by})").strip()
        return v

    def _other_holder(self, s: StageAudit) -> str | None:
        """A ready peer, other than the verified one and not failed, that can run these layers."""
        bad = self.failed_peers()
        mine = self.mesh.state.peers().get(s.peer, {}).get("serving") or {}
        for pid, rec in self.mesh.state.peers().items():
            srv = rec.get("serving")
            if pid in (s.peer, self.mesh.id) or pid in bad or not isinstance(srv, dict):
                continue
            held = srv.get("layers")
            # It can run the stage if it holds its layers and ends where it ends (chains enter mid-range).
            if isinstance(held, list) and len(held) == 2 and held[0] <= s.start and held[1] == s.end \
                    and srv.get("ready") and srv.get("hash") == self.model_hash \
                    and srv.get("dtype") == mine.get("dtype") and srv.get("quantization") == mine.get("quantization"):
                return pid
        return None

    async def _recompute_remote(self, peer: str, s: StageAudit, inputs: torch.Tensor) -> torch.Tensor:
        # A fresh session and the whole sequence as one prefill: the same call as any new request.
        session = secrets.token_hex(8)
        model = (self.mesh.state.peers().get(peer, {}).get("serving") or {}).get("model")
        try:
            reply = await self.mesh.call(peer, "shard.forward", Message(
                {"model": model, "start": s.start, "end": s.end,
                 "items": [{"session": session, "pos": 0, "n": int(inputs.shape[0])}]}, {"x": inputs}),
                timeout=VERIFY_TIMEOUT)
        finally:
            with contextlib.suppress(MeshError, TimeoutError):
                await self.mesh.call(peer, "shard.drop", Message({"session": session}), timeout=5)
        y = forward_one(reply)
        if y.dim() != 2 or y.shape[0] != inputs.shape[0]:
            raise ValueError(f"the helper returned {tuple(y.shape)} for {inputs.shape[0]} positions")
        return y.float()

    def _shard(self, start: int, end: int, dtype: str, quant: str | None) -> ShardModel:
        key = (start, end, dtype, quant)
        if key not in self._shards:
            self._shards[key] = load_shard(self.path, start, end, dtype=getattr(torch, dtype), quantization=quant,
                                           device=self.device)
        return self._shards[key]

    def failed_peers(self) -> set[str]:
        """Peers whose reputation is failed (re-read from the state at most every second)."""
        now = time.monotonic()
        if now - self._failed_cache[0] > 1.0:
            self._failed_cache = (now, failed_peers(self.mesh))
        return self._failed_cache[1]

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("verification failed to run", exc_info=task.exception())
