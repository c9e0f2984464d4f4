"""Smoke check of the built extension in a real JupyterLab + chromium (not part of the pytest suite).

Starts JupyterLab on a free port with the venv's labextensions, opens a notebook, registers the
gradient_nb.mesh comm in the kernel with a snapshot the notebook controls, and checks that the
Mesh panel lists 3 peers, then 2, and that the status bar follows.

    .venv/bin/python labextension/ui-tests/smoke_mesh_panel.py [screenshot.png]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

SETUP = """\
from gradient_nb.notebook import comm as _gc
mesh_state = {"joined": True, "mesh": "default", "self": "aaaaaaaa1111", "rendezvous": "ws://127.0.0.1:1",
              "peers": [{"id": i, "name": n, "devices": [{"kind": "cpu", "name": "x86_64", "memory_bytes": 2**34}],
                         "free_memory_bytes": 2**33, "tflops": 0.2, "services": ["shard"], "layers": [0, 15],
                         "last_seen": 0}
                        for i, n in [("aaaaaaaa1111", "alice"), ("bbbbbbbb2222", "bob"), ("cccccccc3333", "carol")]],
              "links": [{"a": "aaaaaaaa1111", "b": "bbbbbbbb2222", "type": "host", "relayed": False, "rtt_ms": 0.4,
                         "bytes_sent": 1, "bytes_received": 1},
                        {"a": "aaaaaaaa1111", "b": "cccccccc3333", "type": "relay", "relayed": True, "rtt_ms": 31.0,
                         "bytes_sent": 1, "bytes_received": 1}]}
_gc.register(get_ipython(), lambda: dict(mesh_state), poll_interval=0.2)
"""
DROP = "mesh_state['peers'] = mesh_state['peers'][:2]; mesh_state['links'] = mesh_state['links'][:1]"
TOPOLOGY = """\
from gradient_nb.notebook.topology import TopologyWidget
w = TopologyWidget(dict(mesh_state))
w
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shot = sys.argv[1] if len(sys.argv) > 1 else None
    root = Path(tempfile.mkdtemp(prefix="gnb-smoke-"))
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None}
                    for s in (SETUP, DROP, TOPOLOGY)],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (root / "mesh.ipynb").write_text(json.dumps(nb))
    port = free_port()
    # Lab's log goes to a file: an unread pipe fills up and stalls the server.
    log = (root / "lab.log").open("w")
    lab = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.root_dir={root}", "--IdentityProvider.token=", "--ServerApp.password=",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.disable_check_xsrf=True", "--allow-root"],
        stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=os.environ.copy())
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api", timeout=1)
                break
            except OSError:
                if lab.poll() is not None:
                    raise RuntimeError(f"jupyter lab exited, see {root / 'lab.log'}") from None
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            print(f"lab up, log in {root / 'lab.log'}", flush=True)
            try:
                check(page, base, shot)
            except Exception:
                page.screenshot(path="/tmp/gnb-smoke-failure.png")
                print("console errors:", errors[-20:], flush=True)
                raise
            browser.close()
        return 0
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)


def step(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)


def run(page, command: str) -> None:
    # Not awaited in the page: some commands' promises settle only when a kernel finishes.
    step(command)
    page.evaluate("c => { window.jupyterapp.commands.execute(c); }", command)


def check(page, base: str, shot: str | None) -> None:
    T = 90_000
    step("open notebook")
    page.goto(f"{base}/lab/tree/mesh.ipynb")
    panel = page.locator("#gradient-nb-mesh-panel")
    panel.wait_for(state="attached", timeout=T)
    step("panel attached")
    page.wait_for_function("window.jupyterapp && window.jupyterapp.commands.hasCommand('gradient-nb:join')",
                           timeout=T)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=T)
    # Lab may ask which kernel to start; take the proposed one (Python 3).
    try:
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=10_000)
        step("kernel selected")
    except Exception:
        pass
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", state="attached", timeout=T)
    step("kernel idle")
    run(page, "gradient-nb:show-mesh")
    page.wait_for_function(
        "document.querySelector('#gradient-nb-mesh-panel').textContent.includes('has not joined a mesh')",
        timeout=T)
    run(page, "notebook:run-cell-and-select-next")
    page.wait_for_selector("#gradient-nb-mesh-panel[data-peer-count='3']", state="attached", timeout=T)
    step("3 peers")
    rows = panel.locator("tr[data-peer-id]")
    assert rows.count() == 3, rows.count()
    page.wait_for_function("document.querySelector('.gnb-MeshStatus').textContent === 'Mesh: 3 peers'",
                           timeout=T)
    links = panel.locator("tr[data-link-key]").all_inner_texts()
    print(json.dumps({"peers": rows.all_inner_texts(), "links": links}, ensure_ascii=False), flush=True)
    if shot:
        page.screenshot(path=shot)
    run(page, "notebook:run-cell-and-select-next")
    page.wait_for_selector("#gradient-nb-mesh-panel[data-peer-count='2']", state="attached", timeout=T)
    assert rows.count() == 2
    page.wait_for_function("document.querySelector('.gnb-MeshStatus').textContent === 'Mesh: 2 peers'",
                           timeout=T)
    step("2 peers")
    # Restart: the comm dies with the kernel; the panel falls back to "not joined" and, once
    # the setup cell runs again in the new kernel, re-opens the comm on its own.
    run(page, "notebook:restart-kernel")
    page.locator(".jp-Dialog-button.jp-mod-accept").click(timeout=T)
    page.wait_for_selector("#gradient-nb-mesh-panel[data-peer-count='0']", state="attached", timeout=T)
    step("restarted")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", state="attached", timeout=T)
    run(page, "notebook:move-cursor-up")
    run(page, "notebook:move-cursor-up")
    run(page, "notebook:run-cell")
    page.wait_for_selector("#gradient-nb-mesh-panel[data-peer-count='3']", state="attached", timeout=T)
    step("3 peers again after restart")
    # The topology anywidget renders its bundled front-end in the output area.
    run(page, "notebook:move-cursor-down")
    run(page, "notebook:move-cursor-down")
    run(page, "notebook:run-cell")
    page.wait_for_selector(".gnb-topology[data-peer-count='3'] g.gnb-node", state="attached", timeout=T)
    step("topology widget shows 3 peers")
    if shot:
        page.screenshot(path=shot.replace(".png", "-topology.png"))
    print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
