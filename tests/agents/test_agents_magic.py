"""``%%agents run``'s body is checked. The magics in a real kernel (ledger, tools, runs in tools, vote and plan
mode, the timeline widget) run in ``notebooks/agents.ipynb``, executed by tests/notebook/test_notebooks.py."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from gradient_nb.notebook.agents_magic import parse_run


def test_run_spec_is_checked() -> None:
    assert parse_run("task: What is 2+2?\nmode: vote\nk: 5\ntools: [calculate]") == {
        "task": "What is 2+2?", "mode": "vote", "k": 5, "tools": ["calculate"]}
    for body, msg in (("", "needs a YAML body"), ("task: x\nmode: dance", "mode is"), ("task: x\nk: 0", "k is"),
                      ("task: x\ncolour: red", "unknown keys"), ("task: [", "not YAML")):
        with pytest.raises(UsageError, match=msg):
            parse_run(body)
