"""``%agents`` in a real kernel joined to a mesh with a real `gradient-nb agent` process."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from gradient_nb.notebook.agents_magic import parse_run
from tests.agents.test_mcp_mesh import spawn_agent
from tests.notebook.kernel_driver import Kernel


def test_run_spec_is_checked() -> None:
    assert parse_run("task: What is 2+2?\nmode: vote\nk: 5\ntools: [calculate]") == {
        "task": "What is 2+2?", "mode": "vote", "k": 5, "tools": ["calculate"]}
    for body, msg in (("", "needs a YAML body"), ("task: x\nmode: dance", "mode is"), ("task: x\nk: 0", "k is"),
                      ("task: x\ncolour: red", "unknown keys"), ("task: [", "not YAML")):
        with pytest.raises(UsageError, match=msg):
            parse_run(body)


def test_ledger_tools_and_a_plan_run_in_a_kernel(procs) -> None:
    _, url = procs.rendezvous()
    agent = spawn_agent(procs, url, "calc-agent", "--capacity", "2")
    kernel = Kernel()
    try:
        kernel.run("%load_ext gradient_nb\nfrom gradient_nb.notebook.session import current\nnb = current()")
        kernel.run(f"%mesh join {url} --ephemeral --name notebook --heartbeat 0.5 --peer-timeout 3")
        kernel.wait_value("nb.mesh is not None", bool, timeout=60, what="the join")
        kernel.run("from gradient_nb.notebook import agents_magic as am")
        kernel.run("%agents ledger")
        kernel.wait_value("len(am._state['requester'].ledger.agents())", lambda n: n >= 1, timeout=60,
                          what="the agent in the ledger")
        ledger = kernel.run("%agents ledger")
        assert "calc-agent" in str(ledger.outputs) and "tools.calculate" in str(ledger.outputs)
        tools = kernel.run("%agents tools")
        assert "tools.convert_units(value, from_unit, to_unit)" in tools.stdout
        run = kernel.run("%%agents run\ntask: Compute 17*23, then add 9 to that\nmode: plan\ntools: [calculate]")
        assert run.outputs, "the run shows a timeline"
        kinds = kernel.wait_value("(lambda r: r.kinds())(list(am._state['requester'].runs.runs.values())[-1])",
                                  lambda k: "final" in k, timeout=60, what="the run to finish")
        events = kernel.value("[(e.kind, e.data.get('error') or e.data.get('reason')) for e in "
                              "list(am._state['requester'].runs.runs.values())[-1].events]")
        assert kinds[0] == "plan" and kinds.count("dispatch") == 2 and kinds[-1] == "final", events
        final = kernel.value("list(am._state['requester'].runs.runs.values())[-1].events[-1].data['answer']")
        assert final == "400"
        assert kernel.value("am._state['server'].url(list(am._state['requester'].runs.runs)[-1])").startswith(
            "http://127.0.0.1:")
    finally:
        kernel.stop()
    assert agent.poll() is None
