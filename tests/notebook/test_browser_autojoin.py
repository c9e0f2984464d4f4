"""Kernels that join by themselves, and the Mesh panel's own Join/Leave, in JupyterLab in Chromium.

Real clicks and keystrokes only (no ``window.jupyterapp``): the extension's settings (as the settings editor
saves them) turn auto-join on for a rendezvous with one headless peer; two notebooks are opened, and with
no ``%load_ext`` and no magic each kernel joins as a peer of its own: another peer's ``gradient-nb mesh
status`` lists both, with two ids under one user, and one kernel reaches the other by peer id. At the
panel's default width its Layers and RTT columns are on screen. The palette lists the commands under
"gradient-nb". Then the panel's Leave, and its Join with an empty URL: a new local mesh in the kernel.
Screenshots go to test-artifacts/autojoin-*.png.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, T, _need_browser, lab, write_notebook

from tests.conftest import Procs

pytestmark = [pytest.mark.browser, pytest.mark.slow]
__all__ = ["lab"]  # the JupyterLab fixture, shared with test_browser

PANEL = "#gradient-nb-mesh-panel"


def mesh_status(url: str) -> dict:
    """The mesh as another peer sees it (the CLI joins as an observer with a throwaway key)."""
    out = subprocess.run([str(Path(sys.executable).parent / "gradient-nb"), "mesh", "status", url, "--json",
                          "--timeout", "20"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_status(url: str, predicate, what: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        snap = mesh_status(url)
        if predicate(snap):
            return snap
        assert time.monotonic() < deadline, f"{what}: {snap['peers']}"
        time.sleep(1)


def open_notebook(page, base: str, name: str) -> None:
    page.goto(f"{base}/lab/tree/{name}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=T)
    try:  # Lab may ask which kernel to start; take the one it proposes (Python 3)
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=10_000)
    except Exception:
        pass
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", state="attached", timeout=T)


def show_panel(page) -> None:
    tab = page.locator(".jp-SideBar li[data-id='gradient-nb-mesh-panel']")
    if "lm-mod-current" not in (tab.get_attribute("class") or ""):
        tab.click()
    page.locator(PANEL).wait_for(state="visible", timeout=T)


def assert_columns_visible(page) -> None:
    """Every Layers and RTT cell lies inside the panel at its default width (nothing cut off)."""
    panel = page.locator(PANEL).bounding_box()
    cells = page.locator(f"{PANEL} td[data-column='layers'], {PANEL} td[data-column='rtt']")
    assert cells.count() >= 2
    for i in range(cells.count()):
        cell = cells.nth(i)
        assert cell.is_visible()
        box = cell.bounding_box()
        assert box["x"] >= panel["x"] and box["x"] + box["width"] <= panel["x"] + panel["width"] + 0.5, \
            (cell.get_attribute("data-column"), box, panel)


def test_kernels_join_by_themselves_and_the_panel_joins_and_leaves(lab, procs: Procs) -> None:
    _need_browser()
    from playwright.sync_api import sync_playwright

    base, root = lab
    _, url = procs.rendezvous()
    procs.peer(url, "headless-1")
    # The extension's settings, where JupyterLab's settings editor saves them.
    settings = root / ".lab-settings" / "gradient-nb-labextension" / "plugin.jupyterlab-settings"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"autoJoin": True, "rendezvousUrl": url, "mesh": "default"}))
    write_notebook(root / "alpha.ipynb", ["1 + 1"])
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        try:
            # 1. A fresh kernel joins by itself, named after its notebook.
            open_notebook(page, base, "alpha.ipynb")
            show_panel(page)
            page.wait_for_selector(f"{PANEL}[data-peer-count='2']", state="attached", timeout=T)
            snap = wait_status(url, lambda s: any(p["name"] == "alpha" and p.get("user") for p in s["peers"]),
                               "alpha in another peer's mesh status")
            alpha = next(p for p in snap["peers"] if p["name"] == "alpha")
            page.wait_for_selector(f"{PANEL} tr[data-link-key]", state="attached", timeout=T)
            assert_columns_visible(page)
            page.locator(PANEL).screenshot(path=str(ARTIFACTS / "autojoin-panel.png"))

            # 2. A second notebook of the same user: its own peer, and alpha keeps its id and route.
            write_notebook(root / "beta.ipynb", [
                "from gradient_nb.notebook.session import current\n"
                f"_r = await current().mesh.call({alpha['id']!r}, 'mesh.ping', timeout=30)\n"
                "print('reached alpha')"])
            open_notebook(page, base, "beta.ipynb")
            snap = wait_status(url, lambda s: {"alpha", "beta"} <= {p["name"] for p in s["peers"]},
                               "both kernels in mesh status")
            kernels = {p["name"]: p for p in snap["peers"] if p["name"] in ("alpha", "beta")}
            assert kernels["alpha"]["id"] == alpha["id"] != kernels["beta"]["id"]
            assert kernels["alpha"]["user"] == kernels["beta"]["user"] is not None
            assert kernels["alpha"]["user"] not in (alpha["id"], kernels["beta"]["id"])
            page.wait_for_selector(f"{PANEL}[data-peer-count='3']", state="attached", timeout=T)
            page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor:visible").first.click()
            page.keyboard.press("Shift+Enter")
            page.wait_for_function("[...document.querySelectorAll('.jp-OutputArea-output')]"
                                   ".some(e => e.textContent.includes('reached alpha'))", timeout=T)

            # 3. The palette lists the commands under the product's name.
            page.keyboard.press("Control+Shift+C")
            page.locator(".lm-CommandPalette-input").fill("gradient-nb")
            labels = page.locator(".lm-CommandPalette-itemLabel").all_inner_texts()
            headers = page.locator(".lm-CommandPalette-header").all_inner_texts()
            assert {"gradient-nb: Join a Mesh…", "gradient-nb: Leave the Mesh",
                    "gradient-nb: Show Mesh Panel"} <= set(labels), labels
            assert [h.lower() for h in headers] == ["gradient-nb"], headers
            page.keyboard.press("Escape")

            # 4. The panel's Leave: beta leaves (and auto-join does not pull it back), alpha stays.
            show_panel(page)
            page.locator(f"{PANEL} button[data-command='gradient-nb:leave']").click()
            page.wait_for_selector(f"{PANEL}[data-joined='false']", state="attached", timeout=T)
            wait_status(url, lambda s: "beta" not in {p["name"] for p in s["peers"]}
                        and "alpha" in {p["name"] for p in s["peers"]}, "beta gone, alpha still there")
            assert page.locator(PANEL).get_attribute("data-joined") == "false"

            # 5. The panel's Join with an empty URL: a new local mesh in this kernel, named as typed.
            page.locator(f"{PANEL} button[data-command='gradient-nb:join']").click()
            field = page.locator(".jp-Dialog input")
            field.wait_for(timeout=T)
            assert field.input_value() == url  # the settings' URL, offered
            field.press("Control+a")
            field.press("Backspace")
            field.press("Enter")
            name = page.locator(".jp-Dialog input")
            page.wait_for_function("document.querySelector('.jp-Dialog-header')?.textContent"
                                   ".includes('Start a local mesh')", timeout=T)
            name.press("Control+a")
            name.type("local-beta")
            name.press("Enter")
            page.wait_for_selector(f"{PANEL}[data-peer-count='1']", state="attached", timeout=T)
            summary = page.locator(f"{PANEL} .gnb-MeshView-summary").inner_text()
            assert url not in summary, summary  # its own rendezvous, not the settings' one
            assert "local-beta" in page.locator(f"{PANEL} tr[data-peer-id]").inner_text()
            page.screenshot(path=str(ARTIFACTS / "autojoin-local-mesh.png"))
            page.locator(f"{PANEL} button[data-command='gradient-nb:leave']").click()
            page.wait_for_selector(f"{PANEL}[data-joined='false']", state="attached", timeout=T)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "autojoin-failure.png"))
            raise
        finally:
            browser.close()
