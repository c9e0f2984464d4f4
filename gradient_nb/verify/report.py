"""The Python API behind ``%%verify``: verify a generation, set the sampling policy, show the result.

>>> report = await verify_generation(engine)            # the last generation, every stage
>>> report.figure()                                      # error per layer range (plotly)
>>> set_policy(engine, 0.05)                             # verify 5 % of stages from now on
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

from .attach import verification_of
from .policy import SamplingPolicy
from .service import RequestAudit
from .verifier import Tolerance, Verdict


@dataclass
class VerificationReport:
    audit: RequestAudit
    verdicts: list[Verdict]
    names: dict[str, str]  # peer id -> display name

    @property
    def verify_s(self) -> float:
        return sum(v.verify_s for v in self.verdicts)

    @property
    def cost_fraction(self) -> float:
        """Verification time over the time of the generation it checked."""
        return self.verify_s / self.audit.generate_s if self.audit.generate_s > 0 else math.nan

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for v in sorted(self.verdicts, key=lambda v: v.start):
            out.append({"peer": self.names.get(v.peer, v.peer[:10]), "layers": f"{v.start}:{v.end}",
                        "verdict": v.status, "max_err": v.max_err, "mean_err": v.mean_err,
                        "min_overlap": v.min_overlap, "tokens": v.committed_tokens,
                        "bytes_per_token": v.commitment_bytes / v.committed_tokens if v.committed_tokens else 0.0,
                        "verify_s": v.verify_s, "reason": v.reason})
        return out

    def figure(self) -> Any:
        """Bar chart of each stage's largest and mean committed-value error (log scale), with limits."""
        import plotly.graph_objects as go

        rows = self.rows()
        x = [f"{r['layers']} ({r['peer']})" for r in rows]
        colours = ["#2a9d8f" if r["verdict"] == "pass" else "#e76f51" for r in rows]
        fig = go.Figure([
            go.Bar(name="max error", x=x, y=[_pos(r["max_err"]) for r in rows], marker_color=colours),
            go.Bar(name="mean error", x=x, y=[_pos(r["mean_err"]) for r in rows], marker_color=colours, opacity=0.55),
        ])
        tol = Tolerance()
        fig.add_hline(y=tol.max_err, line_dash="dash", annotation_text="float32 max limit")
        fig.add_hline(y=tol.mean_err, line_dash="dot", annotation_text="float32 mean limit")
        fig.update_layout(barmode="group", yaxis_type="log", yaxis_title="error / value scale",
                          title=f"verification of request {self.audit.id}: {self.verify_s:.2f} s, "
                                f"{100 * self.cost_fraction:.1f} % of the generation", height=360)
        return fig

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("peer", "layers", "verdict", "max err", "mean err",
                                                   "min overlap", "tokens", "B/token", "verify s", "reason"))
        body = []
        for r in self.rows():
            colour = "#2a9d8f" if r["verdict"] == "pass" else "#e76f51"
            body.append(
                f"<tr><td>{html.escape(r['peer'])}</td><td>{r['layers']}</td>"
                f"<td style='color:{colour}'><b>{r['verdict']}</b></td><td>{r['max_err']:.3g}</td>"
                f"<td>{r['mean_err']:.3g}</td><td>{r['min_overlap']:.2f}</td><td>{r['tokens']}</td>"
                f"<td>{r['bytes_per_token']:.1f}</td><td>{r['verify_s']:.3f}</td>"
                f"<td>{html.escape(r['reason'][:200])}</td></tr>")
        cost = (f"<small>verification {self.verify_s:.2f} s for a generation of {self.audit.tokens} tokens in "
                f"{self.audit.generate_s:.2f} s ({100 * self.cost_fraction:.1f} %)</small>")
        return f"<table><tr>{head}</tr>{''.join(body)}</table>{cost}"


def _pos(x: float) -> float | None:
    return None if math.isnan(x) else max(x, 1e-7)


async def verify_generation(engine: Any, audit: RequestAudit | str | None = None,
                            ranges: set[tuple[int, int]] | None = None) -> VerificationReport:
    """Verify every stage (or ``ranges``) of a generation of ``engine`` (a MeshEngine): the last one,
    or the one whose audit (or audit id) is given. Verdicts are recorded in the mesh state."""
    vm = verification_of(engine)
    history = list(vm.history)
    if audit is None:
        if not history:
            raise LookupError("no generation to verify yet")
        audit = history[-1]
    elif isinstance(audit, str):
        found = [a for a in history if a.id == audit]
        if not found:
            raise LookupError(f"no recent generation {audit!r} (known: {[a.id for a in history]})")
        audit = found[0]
    await audit.done.wait()  # the sampled verification (if any) first: its verdicts are kept
    await vm.verify(audit, ranges=ranges)
    verdicts = [s.verdict for s in audit.stages.values()
                if s.verdict is not None and (ranges is None or (s.start, s.end) in ranges)]
    names = {p.id: p.name for p in engine.mesh.peers()} if hasattr(engine.mesh, "peers") else {}
    return VerificationReport(audit, verdicts, names)


def set_policy(engine: Any, rate: float) -> SamplingPolicy:
    """Verify each stage of each request of ``engine`` with probability ``rate`` from now on."""
    vm = verification_of(engine)
    vm.policy = SamplingPolicy(rate)
    return vm.policy
