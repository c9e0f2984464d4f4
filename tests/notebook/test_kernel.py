"""The magics in a real ipykernel, driven through jupyter_client like a front-end.

The mesh is real: a rendezvous process and two headless serving peers (``gradient-nb peer --serve``),
which the kernel joins with ``%mesh join``; the kernel serves its own share with ``%%parallax serve``.
Each peer offers 300 MB, so the coordinator must split the bundled model over all three.
"""

from __future__ import annotations

import json
import socket

import pytest
from kernel_driver import Kernel, kill_pids, pid_alive

from tests.conftest import Procs, wait_until

pytestmark = pytest.mark.slow

CAP = "300M"  # one peer cannot hold the model's 0.69 GiB with its KV cache; three can
PEER_ARGS = ("--serve", "default", "--memory-cap", CAP)


def is_usage_error(cell) -> bool:
    return cell.status == "error" and cell.error is not None and cell.error.get("ename") == "UsageError"


def test_bad_arguments_are_clear_usage_errors(kernel: Kernel) -> None:
    kernel.run("%load_ext gradient_nb")
    cases = {
        "%mesh": "usage: %mesh join",
        "%mesh frobnicate": "unknown %mesh command 'frobnicate'",
        "%mesh join notaurl": "must start with ws://",
        "%mesh join ws://h:1 --turn turn:x": "--turn needs --turn-user",
        "%mesh join ws://h:1 --bogus": "unrecognized arguments: --bogus",
        "%mesh spawn two": "invalid int value",
        "%mesh spawn 2 --layers 0:10": "--layers needs --serve",
        "%mesh spawn 1": "not in a mesh",
        "%mesh leave": "not in a mesh",
        "%%parallax serve\nmodle: default": "unknown setting 'modle'",
        "%%parallax serve\ndtype: int3": "dtype must be float32, bfloat16 or float16",
        "%%parallax serve\nlayers: 10": "layers: expected START:END",
        "%%parallax serve\nlayers: 9:3": "need 0 <= START < END",
        "%%parallax serve\nmemory_cap: lots": "not a size",
        "%%parallax serve\napi: true\nhost: 0.0.0.0": "set api_key",
        "%%parallax serve\nport: 8000": "only apply with 'api: true'",
        "%%parallax serve\nthis line has no colon": "expected 'key: value'",
        "%%parallax serve\n# all defaults": "not in a mesh",
        "%parallax serve": "is a cell magic",
        "%%parallax ask\n   \n ": "the cell body is the prompt",
        "%%parallax ask --temperature 5\nhi": "--temperature in [0, 2]",
        "%parallax nonsense": "unknown %parallax command",
        "%parallax cancel now": "takes no arguments",
    }
    for code, expected in cases.items():
        cell = kernel.run(code, ok=False)
        assert is_usage_error(cell), (code, cell.status, cell.error)
        assert expected in cell.error["evalue"], (code, cell.error["evalue"])
    # `%mesh?` shows the help of every subcommand; so does `%parallax?`.
    help_text = json.dumps(kernel.run("%mesh?").payload)
    for sub in ("%mesh join", "%mesh spawn", "%mesh status", "%mesh watch", "%mesh leave"):
        assert sub in help_text
    help_text = json.dumps(kernel.run("%parallax?").payload)
    for sub in ("%%parallax serve", "%%parallax ask", "%parallax status", "%parallax cancel", "--background",
                "memory_cap"):
        assert sub in help_text
    # Nothing was started by any of them.
    kernel.run("from gradient_nb.notebook.session import current\nnb = current()")
    assert kernel.value("nb.busy") == []

    # A rendezvous that is not there: the join fails in the background, and its status line says why.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kernel.run(f"%mesh join ws://127.0.0.1:{port} --ephemeral")
    failed = kernel.run("await nb.wait_mesh()", ok=False)
    assert failed.status == "error" and failed.error["ename"] == "JoinRefused", failed.error
    kernel.pump(0.5)
    assert any("join failed" in w["value"] for w in kernel.widgets_of("HTMLModel"))
    assert kernel.value("nb.mesh is None and nb.busy == []")


def test_serving_in_the_background_while_cells_run(kernel: Kernel, procs: Procs) -> None:
    _, url = procs.rendezvous()
    procs.peer(url, "headless-1", *PEER_ARGS)
    procs.peer(url, "headless-2", *PEER_ARGS)

    kernel.run("%load_ext gradient_nb\nfrom gradient_nb.notebook.session import current\nnb = current()")
    joined = kernel.run(f"%mesh join {url} --ephemeral --name notebook --heartbeat 0.5 --peer-timeout 3")
    assert len(joined.widget_ids()) == 1  # the status line, updated when the join is done
    assert kernel.value("len((await nb.wait_peers(3)).peers())") == 3

    serve = kernel.run(f"%%parallax serve\nmodel: default\nmemory_cap: {CAP}\n")
    assert len(serve.widget_ids()) == 1  # the serving dashboard: status line and three plots
    watch = kernel.run("%mesh watch")
    assert len(watch.widget_ids()) == 1

    kernel.run("await nb.ready(serving_peers=3)", timeout=300)
    route = kernel.value("[(s.start, s.end) for s in nb.engine.current_route()]")
    assert len(route) == 3 and route[0][0] == 0 and route[-1][1] == 30  # across all three peers
    assert kernel.value("nb.server.layers is not None")

    # A long answer streams in the background; meanwhile this kernel keeps executing cells.
    kernel.run("%%parallax ask --background --max-tokens 48\nWrite a short poem about the moon.")
    seen = kernel.wait_value("[nb._ask_task.done(), nb.answer_tokens, sum(range(10))]",
                             lambda v: v[1] > 0 or v[0], timeout=300, what="the first tokens")
    assert seen[0] is False, "the answer finished before any cell could run beside it"
    assert seen[2] == 45
    poem = kernel.value("await nb.answer()", timeout=300)
    assert kernel.value("nb.answer_tokens") >= seen[1]
    assert len(poem) > 20

    # Greedy answer of the real model, served across three processes (the cell runs until it is complete).
    kernel.run("%%parallax ask\nWhat is the capital of France?", timeout=300)
    answer = kernel.value("await nb.answer()", timeout=300)
    assert "Paris" in answer
    kernel.pump(1.5)  # the widgets' last updates

    # What a front-end shows: the streamed answer, the serving status, the topology of three peers.
    htmls = [w["value"] for w in kernel.widgets_of("HTMLModel")]
    assert any("Paris" in v and "tokens" in v for v in htmls), htmls
    assert any("ready, route:" in v and v.count("→") == 2 for v in htmls), htmls
    assert any("joined mesh" in v and "notebook" in v for v in htmls), htmls
    topo = [w for w in kernel.widgets.values() if "snapshot" in w]
    assert topo and len(topo[-1]["snapshot"]["peers"]) == 3
    assert {p["name"] for p in topo[-1]["snapshot"]["peers"]} == {"notebook", "headless-1", "headless-2"}
    assert len([w for w in kernel.widgets_of("AnyModel") if "_widget_layout" in w]) == 3  # plotly figures
    # A bar of layers per serving peer, and a tokens/s line per serving peer.
    assert kernel.value("[len(nb.serving_monitor.layers.data), len(nb.serving_monitor.speed.data)]") == [3, 3]

    # Interrupting a cell that awaits a request cancels that request only: serving goes on.
    code = ("await nb.ask('Tell me a long story about a dragon.', max_tokens=400, "
            "on_text=lambda text, n: print(n, flush=True))")
    msg_id = kernel.start(code)
    kernel.read_until(msg_id, lambda c: c.stdout.strip() != "", timeout=300, what="the story to start")
    kernel.interrupt()
    cell = kernel.finish(msg_id, ok=False, code=code)
    assert cell.status == "error" and cell.error["ename"] in ("KeyboardInterrupt", "CancelledError")
    stopped_at = kernel.value("nb.answer_tokens")
    assert stopped_at < 400
    assert "ServingMonitor-refresh" in kernel.value("nb.busy")
    kernel.run("%%parallax ask\nWhat is the capital of France?", timeout=300)
    assert "Paris" in kernel.value("await nb.answer()", timeout=300)

    df = kernel.value("nb.mesh.metrics('peers').group_by('name').agg("
                      "__import__('polars').col('served_tokens').max()).sort('name').rows()")
    assert {name for name, _ in df} == {"notebook", "headless-1", "headless-2"}
    assert all(tokens > 0 for _, tokens in df)

    kernel.run("%mesh leave")
    kernel.wait_value("nb.mesh is None and nb.busy == []", bool, timeout=60, what="leaving")


def test_spawned_peers_die_with_the_kernel() -> None:
    k = Kernel()
    pids: list[int] = []
    try:
        k.run("%load_ext gradient_nb\nfrom gradient_nb.notebook.session import current\nnb = current()")
        k.run("%mesh join --ephemeral --heartbeat 0.5 --peer-timeout 3")
        k.run("%mesh spawn 2")
        assert k.value("len((await nb.wait_peers(3)).peers())") == 3
        pids = k.value("[p.pid for p in nb.local_peers]")
        assert len(pids) == 2
        status = k.run("%mesh status").stdout
        assert "3 peers" in status and "volunteer-1" in status and "volunteer-2" in status
        # Killed outright: no atexit, no leave. The peers go with it all the same.
        k.km.shutdown_kernel(now=True)
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30, what="the peers to exit")
    finally:
        k.kc.stop_channels()
        if k.km.has_kernel:
            k.km.shutdown_kernel(now=True)
        kill_pids([p for p in pids if pid_alive(p)])
