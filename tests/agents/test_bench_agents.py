"""The agents benchmark's generated task set: enough tasks, each with an exact answer checked independently."""

from __future__ import annotations

from gradient_nb.agents.worker import route_task
from gradient_nb.bench.agents import correct, tasks


def test_generated_tasks_have_exact_answers() -> None:
    ts = tasks(120, seed=1)
    assert len(ts) == 120 and len({t for t, _ in ts}) > 100
    for text, truth in ts:
        if text.startswith("Compute"):  # "Compute A*B, then add C to that."
            a, b, c = (int(x) for x in text.replace("Compute ", "").replace(", then add ", "*").split(" to")[0].split("*"))
            assert truth == str(a * b + c)
        elif text.startswith("Convert"):
            assert route_task(text)[0] == "convert_units"
        else:
            assert truth.lstrip("-").isdigit()
    assert correct("391", "391") and correct("125.53", "125.528832") and not correct("390", "391")
    assert not correct(None, "1")
