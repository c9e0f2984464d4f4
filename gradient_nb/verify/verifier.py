"""Re-compute a shard's output by one prefill and compare it with what the shard committed to.

The shard served a request token by token (a prefill, then one decode step per token, batched with
whatever other requests it had). The verifier holds the same layers, runs them ONCE over the whole
input sequence the shard was given (cache-free, parallel: much cheaper than the decoding), and checks
every committed row:

- ``overlap``: the share of the committed top-k indices that are also in the recomputed top-k;
- ``err``: the error of the committed values at those indices, relative to the row's scale (the RMS
  of the recomputed row, floored at a small absolute value so that near-zero rows do not blow up).

Honest nondeterminism (another batch composition, batch position, thread count, KV cache versus
prefill) moves float32 values by ~1e-6 relative, far below the float16 rounding of the committed
values (4.9e-4), and one int8 peer against another by a few percent; the attacks a verifier must
catch (a skipped layer, perturbed weights, nf4 instead of fp32, another request's or random states)
move them by far more. :class:`Tolerance` records the calibration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..models.loader import ShardModel
from ..serve.sampling import draw_scores, nucleus
from .commitments import TOPK, Binding, Commitment, open_all


@dataclass(frozen=True)
class Tolerance:
    """Pass limits per chunk: on the committed values' error (the largest of any row, and the mean of
    the rows' largest) and on the top-k overlap (the smallest of any row, and the mean).

    Calibrated on the bundled model, 3 stages x batch sizes 1 and 8 x 1 and 2 threads. float32
    honest: max err <= 4.8e-4 (the float16 rounding of the committed values is the floor), mean
    <= 3.7e-4, overlap 1.0; the mildest attack measured, 1 % weight noise, gave chunk means >= 4.5e-3
    and maxima >= 8.8e-3. Other precisions get their own limits (_PRECISION_LIMITS).

    ``logit_err`` bounds how far a peer's last-position logits may stand from the recomputed ones,
    relative to the row's largest |logit| (the slack of ``check_draws``). Measured over 504 draws per
    precision (batches of 8, 24-token requests, served vs one prefill): float32 <= 1.0e-6, float16
    <= 3.9e-3, bfloat16 <= 0.024, nf4 <= 0.010, int8 <= 0.089; the limits are ~2x (float32: 100x).
    """

    max_err: float = 0.004
    mean_err: float = 0.002
    min_overlap: float = 0.6
    mean_overlap: float = 0.9
    logit_err: float = 1e-4

    @classmethod
    def for_precision(cls, dtype: str = "float32", quantization: str | None = None) -> Tolerance:
        """The limits for a shard served (and re-computed) at ``dtype`` with ``quantization``.

        Each precision has its own calibration (see ``_PRECISION_LIMITS``); a quantized shard computing
        in a 16-bit float gets the looser of the two, since both sources of nondeterminism apply. An
        unknown quantization gets the loosest calibrated limits (int8) rather than failing honest peers;
        an unknown dtype the float32 ones (the loader only serves the dtypes named here).
        """
        by_dtype = _PRECISION_LIMITS.get(str(dtype).removeprefix("torch."), cls())
        if quantization is None:
            return by_dtype
        by_quant = _PRECISION_LIMITS.get(str(quantization), _PRECISION_LIMITS["int8"])
        return cls(max_err=max(by_dtype.max_err, by_quant.max_err),
                   mean_err=max(by_dtype.mean_err, by_quant.mean_err),
                   min_overlap=min(by_dtype.min_overlap, by_quant.min_overlap),
                   mean_overlap=min(by_dtype.mean_overlap, by_quant.mean_overlap),
                   logit_err=max(by_dtype.logit_err, by_quant.logit_err))


# Per-precision limits, each set with a safety margin over the honest maxima measured on the bundled
# model (SmolLM2-135M, CPU): 3 stages (0:10, 10:20, 20:30), requests of 20 tokens (a 6-token prefill
# then 14 decode calls) and of 64 tokens, batch sizes 1, 3 and 8, the same requests at other batch
# positions, 1 and 2 threads, the server and the verifier each loading their own copy of the layers at
# that precision; 132 honest verifications per precision and length. "max" is the largest error of a
# committed value in a chunk, "mean" the chunk mean of the rows' largest error, "overlap" the top-k
# overlap (a chunk's worst row / its mean). The attack figures are the smallest seen over 54 runs.
_PRECISION_LIMITS: dict[str, Tolerance] = {
    "float32": Tolerance(),
    # int8 (bitsandbytes LLM.int8: the outlier columns kept in float16 depend on the whole batch, so
    # batch composition moves the values) against another int8 peer: max <= 0.31, mean <= 0.044,
    # overlap >= 0.75 / 0.9 on 20-token requests, >= 0.625 / 0.875 on 64-token ones (264 runs, the
    # overlap limits 0.4 / 0.8 hold both); a skipped layer gave means >= 0.15. Weight noise
    # below 10 % of each matrix's std is not reliably caught: 1 % in 1 of 54 runs, 5 % in 34 of 54
    # (never on the logits stage), 10 % in 53-54 of 54. No statistic of the commitments tried (the mean
    # error over all committed entries, the top-k mismatch fraction) separates 1 % from honest int8
    # variation: the honest level differs between stages by more than the noise moves it.
    "int8": Tolerance(max_err=0.75, mean_err=0.1, min_overlap=0.4, mean_overlap=0.8, logit_err=0.2),
    # nf4 computing in float32 (bitsandbytes on CPU dequantizes, then a float32 matmul; quantization is
    # deterministic, so two peers hold identical weights): honest max <= 0.018, mean <= 0.0038,
    # overlap >= 0.875 / 0.975. Limits ~2.2x / 2.6x that; 1 % weight noise (applied before quantizing)
    # gives means >= 0.027, maxima >= 0.047: all caught. Nothing lower than nf4 can be served instead.
    "nf4": Tolerance(max_err=0.04, mean_err=0.01, min_overlap=0.6, mean_overlap=0.9, logit_err=0.025),
    # float16 (usable on CPU, ~2-3x slower than bfloat16 there): honest max <= 0.015, mean <= 0.0023,
    # overlap >= 0.875 / 0.977. The mean limit has only a 1.5x margin because the attacks sit close:
    # 1 % weight noise gives means >= 0.0042, bfloat16 served as float16 >= 0.0040 (2x would let some
    # through); the max limit has 2x.
    "float16": Tolerance(max_err=0.03, mean_err=0.0035, min_overlap=0.6, mean_overlap=0.9, logit_err=0.01),
    # bfloat16 (8-bit mantissa: decode with a KV cache vs one prefill drifts by a few %): honest
    # max <= 0.042, mean <= 0.0134, overlap >= 0.625 / 0.925 on one CPU; on a Xeon with AMX-BF16
    # (oneDNN's tile kernels, whose sums depend on the batch) max <= 0.082 over the calibration and
    # 0.13 for one request of a batch of 6 (tests/verify/test_precision_tolerances.py), mean <= 0.021.
    # The max limit is 2x that. A limit of 0.085 failed that honest peer and caught 3 more of the 216
    # weight-noise runs (1 %: 16 -> 18 of 54): a false alarm on every AMX peer costs more. The mean
    # limit keeps 1.3x over the AMX worst, since 2-3 % weight noise sits just above it.
    # (nf4 computing in bfloat16 gets these limits: max <= 0.035, mean <= 0.012, overlap >= 0.75 / 0.95.)
    # Caught: nf4 served instead (means >= 0.046); int8 served instead and 2-3 % weight noise only on
    # hidden-state stages (the logits stage stays inside), 1 % noise in 16-17 of 54 runs (see the README).
    "bfloat16": Tolerance(max_err=0.26, mean_err=0.027, min_overlap=0.4, mean_overlap=0.8, logit_err=0.05),
}


@dataclass
class ChunkCheck:
    pos: int
    n: int
    max_err: float
    mean_err: float
    min_overlap: float
    mean_overlap: float
    ok: bool


@dataclass
class Verdict:
    """The outcome of checking one shard's commitments for one request."""

    peer: str
    start: int
    end: int
    request: str
    status: str  # "pass" | "fail" | "rejected" (malformed / forged / wrong binding) | "incomplete"
    reason: str = ""
    chunks: list[ChunkCheck] = field(default_factory=list)
    committed_tokens: int = 0
    commitment_bytes: int = 0
    verify_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    @property
    def max_err(self) -> float:
        return max((c.max_err for c in self.chunks), default=float("nan"))

    @property
    def mean_err(self) -> float:
        n = sum(c.n for c in self.chunks)
        return sum(c.mean_err * c.n for c in self.chunks) / n if n else float("nan")

    @property
    def min_overlap(self) -> float:
        return min((c.min_overlap for c in self.chunks), default=float("nan"))

    def summary(self) -> dict[str, Any]:
        """A msgpack-able summary (what is signed and stored in the mesh state)."""
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {"peer": self.peer, "start": self.start, "end": self.end, "request": self.request,
                "status": self.status, "reason": self.reason[:500], "tokens": self.committed_tokens,
                "bytes": self.commitment_bytes, "max_err": num(self.max_err), "mean_err": num(self.mean_err),
                "min_overlap": num(self.min_overlap), "chunks": len(self.chunks),
                "verify_s": round(self.verify_s, 6)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recompute(shard: ShardModel, inputs: torch.Tensor) -> torch.Tensor:
    """The shard's output for every position of ``inputs`` in one cache-free prefill.

    ``inputs`` are token ids [T] on a first stage, hidden states [T, H] otherwise. Returns hidden
    states [T, H], or logits [T, vocab] on the last stage.
    """
    return shard(inputs).float()


def compare(reference: torch.Tensor, commitments: Sequence[Commitment], tol: Tolerance
            ) -> tuple[list[ChunkCheck], str]:
    """Check each commitment against the recomputed rows; returns the checks and a failure reason."""
    checks: list[ChunkCheck] = []
    reasons: list[str] = []
    width = reference.shape[-1]
    for c in commitments:
        if c.pos + c.n > reference.shape[0]:
            reasons.append(f"chunk at {c.pos} covers positions beyond the {reference.shape[0]} recomputed")
            checks.append(ChunkCheck(c.pos, c.n, math.inf, math.inf, 0.0, 0.0, False))
            continue
        if int(c.indices.max()) >= width:
            reasons.append(f"chunk at {c.pos} names index {int(c.indices.max())} >= width {width}")
            checks.append(ChunkCheck(c.pos, c.n, math.inf, math.inf, 0.0, 0.0, False))
            continue
        rows = reference[c.pos: c.pos + c.n]
        err, overlap = row_stats(rows, c.indices, c.values)
        chk = ChunkCheck(c.pos, c.n, float(err.max()), float(err.mean()), float(overlap.min()),
                         float(overlap.mean()), True)
        chk.ok = (chk.max_err <= tol.max_err and chk.mean_err <= tol.mean_err
                  and chk.min_overlap >= tol.min_overlap and chk.mean_overlap >= tol.mean_overlap)
        if not chk.ok:
            reasons.append(f"positions {c.pos}..{c.pos + c.n - 1}: max err {chk.max_err:.3g} "
                           f"(limit {tol.max_err}), mean err {chk.mean_err:.3g} (limit {tol.mean_err}), "
                           f"top-k overlap min {chk.min_overlap:.2f} / mean {chk.mean_overlap:.2f}")
        checks.append(chk)
    return checks, "; ".join(reasons[:3])


def row_stats(rows: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the committed values' largest error relative to the row's RMS, and the top-k overlap."""
    rows = rows.float()
    k = indices.shape[1]
    scale = rows.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-3)
    mine_vals = rows.gather(-1, indices)
    # Relative to the value itself where it stands out of the row (outlier features are 100x the
    # RMS, and their float16 rounding alone would exceed any useful RMS-relative limit), else to the RMS.
    err = ((mine_vals - values).abs() / torch.maximum(mine_vals.abs(), scale)).amax(-1)
    mine = rows.abs().topk(k, dim=-1).indices
    overlap = (mine[:, :, None] == indices[:, None, :]).any(-1).float().mean(-1)
    return err, overlap


def agree(reference: torch.Tensor, other: torch.Tensor, tol: Tolerance, k: int = TOPK) -> str:
    """Why ``other`` (a helper's recomputation) is not an honest computation of ``reference``, or "".

    It is judged exactly as a shard's commitments would be: its top-``k`` entries of every row,
    against the reference, under the same per-precision limits (``compare``)."""
    if other.shape != reference.shape:
        return f"shape {tuple(other.shape)} where {tuple(reference.shape)} was expected"
    other = other.float()
    idx = other.abs().topk(min(k, other.shape[-1]), dim=-1).indices
    err, overlap = row_stats(reference, idx, other.gather(-1, idx))
    if not (torch.isfinite(err).all() and float(err.max()) <= tol.max_err and float(err.mean()) <= tol.mean_err
            and float(overlap.min()) >= tol.min_overlap and float(overlap.mean()) >= tol.mean_overlap):
        return (f"max err {float(err.max()):.3g} (limit {tol.max_err}), mean err {float(err.mean()):.3g} "
                f"(limit {tol.mean_err}), top-k overlap min {float(overlap.min()):.2f}")
    return ""


def verify_commitments(reference: torch.Tensor, records: Sequence[Any], binding: Binding, *, peer: str,
                       tol: Tolerance | None = None, expected_positions: Sequence[int] | None = None
                       ) -> Verdict:
    """The verdict on one shard's records for one request, given the recomputed output rows."""
    t0 = time.perf_counter()
    tol = tol or Tolerance()
    v = Verdict(peer=peer, start=binding.start, end=binding.end, request=binding.request, status="pass")
    if not isinstance(records, (list, tuple)) or not records:
        v.status, v.reason = "rejected", "no commitments for this request"
        return v
    good, bad = open_all(records, binding, signer=peer)
    v.commitment_bytes = sum(c.nbytes for c in good)
    v.committed_tokens = sum(c.n for c in good)
    if bad:
        v.status, v.reason = "rejected", "; ".join(bad[:3])
        v.verify_s = time.perf_counter() - t0
        return v
    covered = [p for c in good for p in c.positions]
    if len(covered) != len(set(covered)):
        v.status, v.reason = "rejected", "commitments overlap"
        return v
    if expected_positions is not None:
        missing = sorted(set(expected_positions) - set(covered))
        if missing:
            v.status, v.reason = "incomplete", f"{len(missing)} served positions are not committed (first {missing[0]})"
    checks, reason = compare(reference, good, tol)
    v.chunks = checks
    if not all(c.ok for c in checks):
        v.status, v.reason = "fail", reason
    v.verify_s = time.perf_counter() - t0
    return v


def check_draws(logits: torch.Tensor, draws: Sequence[tuple[int, int, dict[str, Any]]], tol: Tolerance) -> str:
    """Why a token the last stage drew could not come from an honest peer's logits, or "" if all could.

    ``logits`` [T, vocab] are the recomputed ones; each draw is (position, token, the sampling spec the
    entry sent). The last stage draws each token itself, so commitments alone would not show a peer
    that computes honestly but returns tokens of its choosing. An honest peer's logits differ from the
    recomputed ones by up to ``slack`` (``Tolerance.logit_err``): a greedy token must be within
    ``slack`` of the best logit, and a sampled token's Gumbel score (``draw_scores``) within twice
    that (divided by the temperature) of the best score among the tokens surely in the nucleus.
    """
    for pos, token, spec in draws:
        if not (0 <= pos < logits.shape[0] and 0 <= token < logits.shape[1]):
            return f"the token drawn at position {pos} is out of range"
        row = logits[pos].float()
        # The slack is the precision's noise on the logits themselves, so it comes from the unmasked row;
        # the best a draw could be is the best token the spec's mask allows (-inf for a disallowed one).
        slack = tol.logit_err * float(row.abs().max())
        allowed = draw_scores(row, {**spec, "temperature": 0.0})
        if spec["temperature"] == 0.0:
            if float(allowed[token]) < float(allowed.max()) - slack:
                return (f"position {pos}: greedy token {token} has logit {float(allowed[token]):.3f}, "
                        f"the best allowed {float(allowed.max()):.3f} (slack {slack:.3g})")
            continue
        kept = nucleus(row, spec)
        if float(row[token]) < float(row[kept].min()) - slack:
            return f"position {pos}: token {token} is outside the top_p nucleus"
        scores = draw_scores(row, {**spec, "top_p": 1.0})
        sure = kept & (row >= float(row[kept].min()) + slack)
        sure[int(allowed.argmax())] = True  # the top allowed token is always in the nucleus
        best = float(scores[sure].max())
        if float(scores[token]) < best - 2 * slack / spec["temperature"]:
            return (f"position {pos}: token {token} is not the draw of seed {spec['seed']} step "
                    f"{spec['step']} (score {float(scores[token]):.3f}, the draw's {best:.3f})")
    return ""


def verify_stage(shard: ShardModel, inputs: torch.Tensor, records: Sequence[Any], binding: Binding, *,
                 peer: str, tol: Tolerance | None = None, expected_positions: Sequence[int] | None = None
                 ) -> Verdict:
    """Recompute the stage over ``inputs`` and judge ``records`` (what the shard committed)."""
    t0 = time.perf_counter()
    if (shard.start, shard.end) != (binding.start, binding.end):
        raise ValueError(f"the verifier holds layers {shard.start}..{shard.end}, "
                         f"not {binding.start}..{binding.end}")
    ref = recompute(shard, inputs)
    v = verify_commitments(ref, records, binding, peer=peer, tol=tol, expected_positions=expected_positions)
    v.verify_s = time.perf_counter() - t0
    return v
