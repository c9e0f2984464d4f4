"""``%verify`` / ``%%verify``: check that the mesh really ran the model (VeriLLM).

Registered by ``load_ipython_extension`` (class :class:`VerifyMagics`). Like the other magics it
checks its arguments at once and runs the work on the kernel's event loop, so the cell returns and
the verdicts appear when they are ready.
"""

from __future__ import annotations

import html
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import HTML, display

from .session import NOT_JOINED, current

# Printed above the table: where the score comes from (Reputation.score).
REPUTATION_LEGEND = ("score = (passes + 1) / (passes + failures + 2): the share of passed verifications, "
                     "smoothed so that an unverified peer starts at 0.5 and 2 passes give 0.75; FAILED: "
                     "failed by this kernel or by enough verifiers (routing avoids it)")
USAGE = "usage: %verify last | request ID | policy RATE | reputation   or   %%verify ask + a prompt (see %verify?)"


def parse_rate(text: str) -> float:
    """A sampling rate: ``0.05`` or ``5%``."""
    try:
        rate = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"the rate must be a number or a percentage, not {text!r}") from None
    if not 0 <= rate <= 1:
        raise UsageError("the rate must be within [0, 1] (or 0%..100%)")
    return rate


@magics_class
class VerifyMagics(Magics):
    @line_cell_magic
    def verify(self, line: str, cell: str | None = None) -> Any:
        """Verify generations of the model this kernel's mesh serves.

        %verify last [--layers S:E]     verify every stage (or one) of the last generation
        %verify request ID              the same for a recent generation (IDs: %verify history)
        %verify history                 recent generations, with their verdicts so far
        %verify policy RATE             verify this share of stages at random from now on (0.01, 5%)
        %verify reputation              every verified peer: passes, failures, failed or not
        %%verify ask [--max-tokens N]
        <prompt>                        generate an answer, then verify every stage of it

        Shows a verdict per shard, the error per layer range as a plot, and the cost of verifying
        against the generation it checked.
        """
        args = shlex.split(line)
        if not args:
            raise UsageError(USAGE)
        cmd, rest = args[0], args[1:]
        if cmd == "policy":
            if len(rest) != 1:
                raise UsageError("%verify policy RATE  (e.g. 0.01 or 5%)")
            rate = parse_rate(rest[0])
            engine = self._engine()
            from ..verify.report import set_policy

            set_policy(engine, rate)
            print(f"verifying each stage of each request with probability {rate:g}")
            return None
        if cmd == "reputation":
            if rest:
                raise UsageError("%verify reputation takes no arguments")
            return self._reputation()
        if cmd == "history":
            from ..verify import verification_of

            engine = self._engine()
            for a in verification_of(engine).history:
                vs = ", ".join(f"{v.start}:{v.end} {v.status}" for v in a.verdicts) or "not verified"
                print(f"{a.id}  {a.tokens} tokens  {vs}")
            return None
        if cmd in ("last", "request"):
            target = None
            if cmd == "request":
                if not rest:
                    raise UsageError("%verify request ID")
                target, rest = rest[0], rest[1:]
            ranges = self._ranges(rest)
            return self._run(target, ranges, None)
        if cmd == "ask":
            prompt = (cell or "").strip()
            if not prompt:
                raise UsageError("%%verify ask: the cell body is the prompt")
            max_tokens = 32
            if rest[:1] == ["--max-tokens"] and len(rest) == 2 and rest[1].isdigit() and int(rest[1]) > 0:
                max_tokens = int(rest[1])
            elif rest:
                raise UsageError("%%verify ask [--max-tokens N]")
            return self._run(None, None, (prompt, max_tokens))
        raise UsageError(f"unknown %verify command {cmd!r}. {USAGE}")

    @staticmethod
    def _ranges(rest: list[str]) -> set[tuple[int, int]] | None:
        if not rest:
            return None
        if rest[0] != "--layers" or len(rest) != 2:
            raise UsageError("expected --layers START:END")
        try:
            s, e = (int(v) for v in rest[1].split(":"))
        except ValueError:
            raise UsageError("--layers takes START:END") from None
        return {(s, e)}

    @staticmethod
    def _engine() -> Any:
        s = current()
        if s.engine is None:
            raise UsageError("no served model in this kernel yet: %%parallax serve (or ask) first")
        return s.engine

    def _run(self, target: str | None, ranges: set[tuple[int, int]] | None,
             ask: tuple[str, int] | None) -> None:
        s = current()
        if ask is None:
            self._engine()  # fail in the cell, now, when there is nothing to verify
        elif s.mesh is None and s._join_task is None:
            raise UsageError(NOT_JOINED)
        handle = display(HTML("<i>verifying…</i>"), display_id=True)
        answer = ""  # %%verify ask: the answer, shown above the report (the report does not replace it)

        async def run() -> None:
            from ..serve.sampling import SamplingParams
            from ..verify.report import verify_generation

            nonlocal answer
            engine = await s.wait_route() if ask is not None else s.engine
            audit = None
            if ask is not None:
                ids = engine.encode([{"role": "user", "content": ask[0]}])
                out = [t async for t in engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=ask[1]))]
                answer = (f"<div class='gradient-nb-verified-answer'><b>answer</b><pre style='white-space:pre-wrap'>"
                          f"{html.escape(engine.tokenizer.decode(out, skip_special_tokens=True))}</pre></div>")
                handle.update(HTML(answer + "<i>verifying…</i>"))
                audit = engine.traces[-1].observed.get("verify")
            report = await verify_generation(engine, audit if audit is not None else target, ranges)
            handle.update(HTML(answer + report._repr_html_()))
            display(_separate_limit_labels(report.figure()))
            s.last_verification = report

        def failed(exc: BaseException) -> None:
            from .magics import short_message

            text = short_message(exc) or f"{type(exc).__name__}: {exc}"
            handle.update(HTML(f"{answer}<b>verify</b>: {html.escape(text)}"))

        s.spawn(run(), "verify", on_error=failed)

    def _reputation(self) -> None:
        from ..verify.reputation import reputations

        s = current()
        if s.mesh is None:
            raise UsageError("this kernel has not joined a mesh: %mesh join first")
        names = {p.id: p.name for p in s.mesh.peers()}
        rows = sorted(reputations(s.mesh).values(), key=lambda r: r.score)
        if not rows:
            print("no verdicts in the mesh yet")
            return
        print(REPUTATION_LEGEND)
        for r in rows:
            state = "FAILED" if r.failed(s.mesh.id) else "ok"
            print(f"{names.get(r.peer, r.peer[:10]):20s} {r.passes:5d} pass {r.failures:4d} fail  "
                  f"score {r.score:.2f} = ({r.passes}+1)/({r.passes}+{r.failures}+2)  {state}")


def _separate_limit_labels(fig: Any) -> Any:
    """Put the plot's limit labels on opposite sides: the two limit lines are close on the log axis, and
    labels at the same end of both lines print over each other."""
    limits = [a for a in fig.layout.annotations if "limit" in str(a.text or "")]
    for a, (x, anchor) in zip(limits, [(0.0, "left"), (1.0, "right")], strict=False):
        a.update(x=x, xanchor=anchor)
    return fig
