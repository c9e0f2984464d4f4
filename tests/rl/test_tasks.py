"""Shipped tasks: locally generated prompts, verifiable rewards with the stated partial credit."""

from __future__ import annotations

import random

import pytest

from gradient_nb.rl.tasks import AdditionTask, FormatTask, FunctionTask, Prompt, get_task, score


def test_format_partial_credit() -> None:
    t = FormatTask()
    p = Prompt("x", {"length": 4})
    assert t.reward(p, "<answer>abcd</answer>") == 1.0
    assert t.reward(p, "<answer>ab</answer>") == pytest.approx(0.5 + 0.5 * 0.5)
    assert t.reward(p, "<answer>abcd") == pytest.approx(0.25 + 0.5)
    assert t.reward(p, "abcdefgh") == 0.0
    assert t.prompt(random.Random(1)) == t.prompt(random.Random(1))  # seeded, local


def test_addition() -> None:
    t = AdditionTask()
    p = t.prompt(random.Random(3))
    a, b = map(int, p.text.split("is ")[1].split("?")[0].split("+"))
    assert p.meta["answer"] == a + b
    assert t.reward(p, f"ok <answer> {a + b} </answer>") == 1.0
    assert t.reward(p, f"<answer>{a + b + 1}</answer>") == 0.1
    assert t.reward(p, f"{a + b}") == 0.0


def test_plug_ins() -> None:
    t = FunctionTask(lambda rng: "say hi", lambda p, c: float("hi" in c))
    assert score(t, [t.prompt(random.Random())] * 2, ["hi", "no"]) == [1.0, 0.0]
    assert isinstance(get_task("addition"), AdditionTask)
    assert isinstance(get_task("gradient_nb.rl.tasks:FormatTask"), FormatTask)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
