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

The limits come from the requester, not the shard. The entry accepts a set of precisions (given to
it, or stated by the coordinator's allocation); a shard announcing another is not routed to
(:meth:`VerifyManager.avoided_peers`), and each stage is checked at the limits of the precision it was
accepted at when the entry called it: its own if that was accepted, else the strictest accepted one.
A shard that calls itself "int8" where float32 was asked for is held to float32.

Helpers are held to account too (``policy``): a failing answer is always recomputed here, a passing
one at the ``recheck`` rate, and at the ``canary`` rate a helper is also sent a past job whose answer
this peer computed itself. Whenever a helper's answer meets one computed here, the helper gets a
verdict as a verifier (``reputation``): a lying or lazy helper is failed, avoided for routing and not
asked again, and helpers are asked best standing first.
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
from ..mesh.tasks import cancel_and_wait
from ..models.loader import ShardModel, load_shard
from ..serve.coordinator import accepted_precisions, precision_of
from ..serve.node import forward_one
from ..serve.scheduler import parse_precision, strictest
from .commitments import Binding
from .policy import SamplingPolicy
from .reputation import failed_peers, record_verdict, reputations
from .verifier import Tolerance, Verdict, agree, check_draws, recompute, verify_commitments

log = logging.getLogger(__name__)

VERIFY_TIMEOUT = 120.0
MAX_COMMIT_RECORDS = 4096  # per audited stage: a flood of records from a shard is itself a failure
KNOWN_JOBS = 4  # jobs of known answer kept per layer range and precision, for canaries
DEFAULT_ACCEPT = frozenset({"float32"})  # when neither the requester nor the allocation states any


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
    precision: str = "float32"  # checked at this precision's limits: one the requester accepted
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
                 device: str = "cpu", model_name: str | None = None, accept: Sequence[str] | None = None
                 ) -> None:
        self.mesh = mesh
        self.model_name = model_name
        self.accept = frozenset(accept) if accept else None  # the requester's precisions; None: the mesh's
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
        # (start, end, precision) -> jobs recomputed here: (inputs, output), the canaries' answers
        self._known: dict[tuple[int, int, str], deque[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.verify_s = 0.0  # wall time spent verifying, for the cost figures
        self.verified_tokens = 0

    # -- recording (a RequestObserver of serve's MeshEngine) -----------------------------------
    name = "verify"

    def avoided_peers(self) -> set[str]:
        """Peers routing avoids: caught cheating (as shards or helpers), or serving a precision the
        requester does not accept."""
        accepted = self.accepted()
        wrong = {pid for pid, rec in self.mesh.state.peers().items()
                 if isinstance(rec.get("serving"), dict) and precision_of(rec) not in accepted}
        return self.failed_peers() | wrong

    def accepted(self) -> frozenset[str]:
        """The precisions this entry accepts: its own requester's, else the allocation's, else float32."""
        if self.accept:
            return self.accept
        stated = accepted_precisions(self.mesh, self.model_name) if self.model_name else None
        return frozenset(stated) if stated else DEFAULT_ACCEPT

    def _precision_for(self, peer: str) -> str:
        """The precision a stage on ``peer`` is held to: its announced one if accepted, else the
        strictest accepted (it was never the shard's to choose)."""
        accepted = self.accepted()
        announced = precision_of(self.mesh.state.peers().get(peer) or {})
        return announced if announced in accepted else strictest(accepted)

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
        if not s.inputs:
            s.precision = self._precision_for(peer)  # fixed when the shard was called, not when verified
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
        tol = Tolerance.for_precision(*parse_precision(s.precision))

        def judge(ref: torch.Tensor) -> Verdict:
            v = verify_commitments(ref, s.records, binding, peer=s.peer, tol=tol, expected_positions=s.positions)
            if v.ok and s.draws:
                reason = check_draws(ref, s.draws, tol)
                if reason:
                    v.status, v.reason = "fail", f"a token it returned was not drawn from its logits: {reason}"
            return v

        v, by, mine = None, None, None
        for helper in ([] if s.is_last else self._helpers(s))[:2]:
            check_here = False
            if self.policy.draw_canary():
                if not self._known.get((s.start, s.end, s.precision)):
                    check_here = True  # no job of known answer for these layers yet: this one becomes one
                elif not await self._canary_passes(helper, s, tol):
                    continue  # caught on a job of known answer: ask the next helper, or recompute here
            try:
                theirs = await self._recompute_remote(helper, s.start, s.end, inputs)
            except (MeshError, TimeoutError, KeyError, ValueError) as exc:
                log.info("remote recomputation on %s failed (%s)", helper[:8], exc)
                continue
            v = await asyncio.to_thread(judge, theirs)
            if v.status == "fail" or check_here or self.policy.draw_recheck():
                # A failure is never taken on a helper's word (it may frame the shard), and a pass is
                # spot-checked (it may launder a partner's work): recompute here, and judge the helper.
                mine = await self._recompute_local(s, inputs)
                self._judge_helper(helper, s, theirs, mine, tol, "a spot-check here")
                if helper in self.failed_peers():
                    v = None
                    break  # its verdict is worthless; the stage is judged on our recomputation below
                by = f"{helper[:8]}, confirmed here"
            else:
                by = helper[:8]
            break
        if v is None:
            if mine is None:
                mine = await self._recompute_local(s, inputs)
            v = await asyncio.to_thread(judge, mine)
        v.verify_s = time.perf_counter() - t0
        self.verify_s += v.verify_s
        self.verified_tokens += inputs.shape[0]
        if by is not None:
            v.reason = (v.reason + f" (recomputed by {by})").strip()
        return v

    async def _recompute_local(self, s: StageAudit, inputs: torch.Tensor) -> torch.Tensor:
        dtype, quant = parse_precision(s.precision)
        shard = await asyncio.to_thread(self._shard, s.start, s.end, dtype, quant)
        ref = await asyncio.to_thread(recompute, shard, inputs)
        if not s.is_last:  # a hidden-state job of known answer: a future canary for this range
            jobs = self._known.setdefault((s.start, s.end, s.precision), deque(maxlen=KNOWN_JOBS))
            jobs.append((inputs, ref))
        return ref

    async def _canary_passes(self, helper: str, s: StageAudit, tol: Tolerance) -> bool:
        """Send ``helper`` a job whose answer is known here (one more fresh prefill to it); False if it
        answered wrongly (it is then failed as a verifier).

        The known jobs are the newest few recomputed here for these layers, so they keep changing; a
        helper that remembered every input it was ever sent could still spot a replay, which is why
        passes are also spot-checked on real jobs."""
        jobs = self._known[(s.start, s.end, s.precision)]
        inputs, known = jobs[secrets.randbelow(len(jobs))]
        try:
            theirs = await self._recompute_remote(helper, s.start, s.end, inputs)
        except (MeshError, TimeoutError, KeyError, ValueError) as exc:
            log.info("canary on %s failed to run (%s)", helper[:8], exc)
            return False
        self._judge_helper(helper, s, theirs, known, tol, "a job whose answer was known")
        return helper not in self.failed_peers()

    def _judge_helper(self, helper: str, s: StageAudit, theirs: torch.Tensor, mine: torch.Tensor, tol: Tolerance,
                      how: str) -> None:
        """A verdict on ``helper`` as a verifier: its recomputation against one made (or known) here."""
        why = agree(mine, theirs, tol)
        if why:
            log.warning("helper %s recomputed layers %d..%d wrongly (%s)", helper[:8], s.start, s.end, why)
        verdict = Verdict(helper, s.start, s.end, f"{self.mesh.id}/verify-{s.session}", "fail" if why else "pass",
                          f"its recomputation for a verifier was wrong, caught by {how}: {why}" if why else
                          f"its recomputation for a verifier matched {how}")
        record_verdict(self.mesh, verdict.summary(), role="verifier")
        self._failed_cache = (0.0, set())

    def _helpers(self, s: StageAudit) -> list[str]:
        """Ready peers, other than the verified one and not failed, that serve these layers at the stage's
        precision: best standing as verifiers first (by evidence this peer accepts)."""
        bad = self.failed_peers()
        standing = reputations(self.mesh)
        out = []
        for pid, rec in self.mesh.state.peers().items():
            srv = rec.get("serving")
            if pid in (s.peer, self.mesh.id) or pid in bad or not isinstance(srv, dict):
                continue
            held = srv.get("layers")
            # It can run the stage if it holds its layers and ends where it ends (chains enter mid-range).
            if isinstance(held, list) and len(held) == 2 and held[0] <= s.start and held[1] == s.end \
                    and srv.get("ready") and srv.get("hash") == self.model_hash and precision_of(rec) == s.precision:
                out.append(pid)
        rep = {p: standing[p].verifier_score if p in standing else 0.5 for p in out}
        return sorted(out, key=lambda p: (-rep[p], secrets.randbelow(1 << 16)))

    async def _recompute_remote(self, peer: str, start: int, end: int, inputs: torch.Tensor) -> torch.Tensor:
        # A fresh session and the whole sequence as one prefill: the same call as any new request.
        session = secrets.token_hex(8)
        model = (self.mesh.state.peers().get(peer, {}).get("serving") or {}).get("model")
        try:
            reply = await self.mesh.call(peer, "shard.forward", Message(
                {"model": model, "start": start, "end": end,
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
            await cancel_and_wait(t)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("verification failed to run", exc_info=task.exception())
