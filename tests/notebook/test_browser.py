"""The JupyterLab Mesh panel in a real browser: JupyterLab with the built extension, Debian's chromium
driven by Playwright, a kernel that joins a real mesh of two headless peers with ``%mesh join``.

The panel must list the 3 peers (the kernel and both headless ones), then 2 when one of them leaves.
A screenshot of the panel is saved to test-artifacts/mesh-panel.png.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_driver import REPO

from tests.conftest import Procs

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
T = 120_000  # ms: generous bound on each wait in the page; a healthy run takes a few seconds each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path, cells: list[str]) -> None:
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None}
                    for s in cells],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """JupyterLab on a free port, serving ``tmp_path``; it and its kernels are stopped after the test."""
    ext = subprocess.run([str(Path(sys.executable).parent / "jupyter"), "labextension", "list"],
                         capture_output=True, text=True)
    assert "gradient-nb-labextension" in ext.stdout + ext.stderr, \
        "the Mesh panel extension is not installed in this environment (build labextension/ first)"
    port = free_port()
    # Its own settings and workspaces: no layout restored from another run, no news pop-up over the screenshots.
    settings, workspaces = tmp_path / ".lab-settings", tmp_path / ".lab-workspaces"
    notify = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notify.parent.mkdir(parents=True)
    notify.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    workspaces.mkdir()
    log_path = tmp_path / "lab.log"
    with log_path.open("w") as log:  # a file, not a pipe: an unread pipe fills up and stalls the server
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
             f"--ServerApp.root_dir={tmp_path}", "--IdentityProvider.token=", "--ServerApp.password=",
             "--LabApp.expose_app_in_browser=True", "--ServerApp.disable_check_xsrf=True", "--allow-root",
             f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={workspaces}"],
            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"jupyter lab did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield base, tmp_path
    finally:
        # Its own session: the server and the kernels it started go together.
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with _suppress_lookup():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)  # a kernel that outlived the server


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, *_: object) -> bool:
        return kind is ProcessLookupError


def _need_browser() -> None:
    """Skip on a developer machine without chromium; in CI (which installs it) its absence fails."""
    if not Path(CHROMIUM).exists():
        message = f"no browser at {CHROMIUM} (apt-get install chromium; scripts/test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_mesh_panel_lists_the_peers_of_the_kernels_mesh(lab: tuple[str, Path], procs: Procs) -> None:
    _need_browser()
    from playwright.sync_api import sync_playwright

    base, root = lab
    _, url = procs.rendezvous()
    procs.peer(url, "headless-1")
    leaver = procs.peer(url, "headless-2")
    write_notebook(root / "mesh.ipynb", [
        "%load_ext gradient_nb",
        f"%mesh join {url} --ephemeral --name notebook --heartbeat 0.5 --peer-timeout 3",
        "%mesh leave",
    ])
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        try:
            page.goto(f"{base}/lab/tree/mesh.ipynb")
            panel = page.locator("#gradient-nb-mesh-panel")
            panel.wait_for(state="attached", timeout=T)
            page.wait_for_function("window.jupyterapp && window.jupyterapp.commands.hasCommand('gradient-nb:join')",
                                   timeout=T)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=T)
            try:  # Lab may ask which kernel to start; take the one it proposes (Python 3)
                page.locator(".jp-Dialog .jp-mod-accept").click(timeout=10_000)
            except Exception:
                pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", state="attached",
                                   timeout=T)
            command(page, "gradient-nb:show-mesh")
            page.wait_for_function(
                "document.querySelector('#gradient-nb-mesh-panel').textContent.includes('has not joined a mesh')",
                timeout=T)

            command(page, "notebook:run-cell-and-select-next")  # %load_ext
            command(page, "notebook:run-cell-and-select-next")  # %mesh join
            page.wait_for_selector("#gradient-nb-mesh-panel[data-peer-count='3']", state="attached", timeout=T)
            rows = panel.locator("tr[data-peer-id]")
            assert rows.count() == 3
            names = " ".join(rows.all_inner_texts())
            for name in ("notebook", "headless-1", "headless-2"):
                assert name in names, names
            page.wait_for_function("document.querySelector('.gnb-MeshStatus').textContent === 'Mesh: 3 peers'",
                                   timeout=T)
            # The join cell's own output says where it joined.
            page.wait_for_function("[...document.querySelectorAll('.jp-OutputArea-output')]"
                                   ".some(e => e.textContent.includes('joined mesh'))", timeout=T)
            panel.screenshot(path=str(ARTIFACTS / "mesh-panel.png"))
            page.screenshot(path=str(ARTIFACTS / "mesh-lab.png"))

            # One headless peer leaves (SIGTERM: it withdraws from the mesh on its way out).
            leaver.terminate()
            page.wait_for_selector("#gradient-nb-mesh-panel[data-peer-count='2']", state="attached", timeout=T)
            assert rows.count() == 2
            assert "headless-2" not in " ".join(rows.all_inner_texts())
            page.wait_for_function("document.querySelector('.gnb-MeshStatus').textContent === 'Mesh: 2 peers'",
                                   timeout=T)

            # And the kernel leaves with %mesh leave: the panel says so.
            command(page, "notebook:run-cell-and-select-next")
            page.wait_for_selector("#gradient-nb-mesh-panel[data-peer-count='0']", state="attached", timeout=T)
            page.wait_for_function(
                "document.querySelector('#gradient-nb-mesh-panel').textContent.includes('has not joined a mesh')",
                timeout=T)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "mesh-panel-failure.png"))
            print("browser console errors:", console[-20:])
            raise
        finally:
            browser.close()


def command(page, name: str) -> None:
    # Not awaited in the page: some commands' promises settle only when a kernel finishes.
    page.evaluate("c => { window.jupyterapp.commands.execute(c); }", name)


def test_quickstart_runs_in_jupyterlab(lab: tuple[str, Path]) -> None:
    """The quick start, run in the browser: the answer streams into the page, the dashboards render."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    base, root = lab
    (root / "quickstart.ipynb").write_bytes((REPO / "notebooks" / "quickstart.ipynb").read_bytes())
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/quickstart.ipynb")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=T)
            try:
                page.locator(".jp-Dialog .jp-mod-accept").click(timeout=10_000)
            except Exception:
                pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", state="attached",
                                   timeout=T)
            # Everything up to the answer; the last cells leave the mesh.
            command(page, "notebook:run-all-cells")
            # Streamed, then finished: the final text carries the token count.
            page.wait_for_function(
                "[...document.querySelectorAll('.gradient-nb-answer')]"
                ".some(e => e.textContent.includes('Paris') && e.textContent.includes('tokens'))",
                timeout=300_000)
            # The serving dashboard's three plotly figures and the topology of the three peers rendered.
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 3", timeout=T)
            # The route while serving, or, once the last cells left the mesh, the route it had.
            page.wait_for_function("[...document.querySelectorAll('.jp-OutputArea-output')]"
                                   ".some(e => /ready, route:|last route:/.test(e.textContent))", timeout=T)
            page.screenshot(path=str(ARTIFACTS / "quickstart-lab.png"), full_page=True)
            # The last cell waits for the leave: the notebook ends outside any mesh.
            page.wait_for_function("[...document.querySelectorAll('.jp-OutputArea-output')]"
                                   ".some(e => e.textContent.includes(\"{'joined': False}\"))", timeout=T)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "quickstart-lab-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
