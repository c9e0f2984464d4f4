"""Share over the mesh / Open shared notebook, in two JupyterLabs in Chromium.

Two JupyterLab servers (each its own root and port: Alice's and Bob's machines, on loopback), one
Chromium page each, each with a notebook whose kernel joins the same mesh (a rendezvous of this test,
``%mesh join``). On Alice's page the palette's *Share Notebook over the Mesh…* gives a code in a dialog;
on Bob's, *Open Shared Notebook…* with that code opens the notebook; what is typed in a cell on one page
appears on the other, both ways, until Alice's kernel leaves the mesh (its share closes with it). The
commands' errors (kernel not in a mesh, a damaged code) come back as messages. Real keystrokes and palette commands only (no ``window.jupyterapp``).
Screenshots go to test-artifacts/share-*.png.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, T, _need_browser, lab, write_notebook
from test_browser_autojoin import open_notebook

from tests.conftest import Procs

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The test_browser `lab` fixture's body, run once per machine (a fixture gives one value per test).
start_lab = contextlib.contextmanager(lab.__wrapped__)

SHARED = "notes.ipynb"


@pytest.fixture
def labs(tmp_path: Path) -> Iterator[tuple[tuple[str, Path], tuple[str, Path]]]:
    """Alice's and Bob's JupyterLabs, each serving its own directory."""
    with contextlib.ExitStack() as stack:
        alice, bob = tmp_path / "alice", tmp_path / "bob"
        alice.mkdir()
        bob.mkdir()
        yield stack.enter_context(start_lab(alice)), stack.enter_context(start_lab(bob))


def join_mesh(page) -> None:
    """Run the notebook's first cell (``%mesh join``) with Shift+Enter; wait until the kernel is in the mesh."""
    page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content").first.click()
    page.keyboard.press("Shift+Enter")
    page.wait_for_function("[...document.querySelectorAll('.jp-OutputArea-output')]"
                           ".some(e => e.textContent.includes('joined mesh'))", timeout=T)
    page.wait_for_selector("#gradient-nb-mesh-panel[data-joined='true']", state="attached", timeout=T)


def palette(page, label: str) -> None:
    page.keyboard.press("Control+Shift+C")
    field = page.locator(".lm-CommandPalette-input")
    field.fill(label)
    item = page.locator(".lm-CommandPalette-item", has_text=label).first
    item.wait_for(timeout=T)
    field.press("Enter")


def expect_error(page, text: str) -> None:
    """An error dialog that says ``text`` (a message, not a traceback); dismissed with Escape."""
    body = page.locator(".jp-Dialog .jp-Dialog-body")
    body.wait_for(timeout=T)
    page.wait_for_function("t => document.querySelector('.jp-Dialog .jp-Dialog-body')?.textContent.includes(t)",
                           arg=text, timeout=T)
    assert "Traceback" not in body.inner_text()
    page.keyboard.press("Escape")
    page.locator(".jp-Dialog").wait_for(state="detached", timeout=T)


def share(page, choice: int = 0) -> None:
    """The palette's Share command, with the dialog's choice ``choice`` (0: read-write, 1: read-only)."""
    palette(page, "gradient-nb: Share Notebook over the Mesh…")
    select = page.locator(".jp-Dialog select")
    select.wait_for(timeout=T)
    for _ in range(choice):
        select.press("ArrowDown")
    page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept").click()


def open_shared(page, code: str) -> None:
    palette(page, "gradient-nb: Open Shared Notebook…")
    field = page.locator(".jp-Dialog input")
    field.wait_for(timeout=T)
    field.type(code)
    field.press("Enter")


def cell_texts(page) -> list[str]:
    return page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content").all_inner_texts()


def wait_text(page, text: str, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in t for t in cell_texts(page)):
        assert time.monotonic() < deadline, f"{what}: {cell_texts(page)}"
        time.sleep(0.2)


def type_at_end(page, cell: int, text: str) -> None:
    editor = page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content").nth(cell)
    editor.click()
    page.keyboard.press("Control+End")
    page.keyboard.type(text)


def test_share_over_the_mesh_and_open_on_another_lab(labs, procs: Procs) -> None:
    _need_browser()
    from playwright.sync_api import sync_playwright

    (base_a, root_a), (base_b, root_b) = labs
    _, url = procs.rendezvous()
    join = f"%load_ext gradient_nb\n%mesh join {url} --ephemeral --heartbeat 0.5 --peer-timeout 3 --name"
    write_notebook(root_a / SHARED, [f"{join} alice", "x = 1"])
    write_notebook(root_b / "bob.ipynb", [f"{join} bob"])
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        a = browser.new_page(viewport={"width": 1300, "height": 800})
        b = browser.new_page(viewport={"width": 1300, "height": 800})
        page = a
        try:
            open_notebook(a, base_a, SHARED)
            open_notebook(b, base_b, "bob.ipynb")
            # Before Bob's kernel joins: each command says so, plainly.
            page = b
            share(b)
            expect_error(b, "has not joined a mesh")  # the kernel's answer
            palette(b, "gradient-nb: Open Shared Notebook…")
            expect_error(b, "whose kernel has joined the mesh")  # the front end's, before asking for a code
            page = a
            join_mesh(a)
            page = b
            join_mesh(b)
            open_shared(b, "gnbshare1.not-a-code")
            expect_error(b, "the share code is damaged")  # the kernel's ShareError, as a message
            page = a
            b.wait_for_selector("#gradient-nb-mesh-panel[data-peer-count='2']", state="attached", timeout=T)

            # Alice shares her notebook: read-write (the dialog's first choice), the code in a dialog.
            share(a)
            code_field = a.locator(".jp-Dialog .gnb-ShareCode-code")
            code_field.wait_for(timeout=T)
            code = code_field.input_value()
            assert code.startswith("gnbshare1."), code
            a.locator(".jp-Dialog .gnb-ShareCode-copy").click()
            a.wait_for_function("document.querySelector('.gnb-ShareCode-copy').textContent === 'Copied'", timeout=T)
            a.screenshot(path=str(ARTIFACTS / "share-code.png"))
            a.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept").click()  # Close
            a.locator(".jp-Dialog").wait_for(state="detached", timeout=T)

            # Bob opens it with the code: a new tab, the notebook's cells.
            page = b
            open_shared(b, code)
            b.wait_for_selector(f".lm-TabBar-tab[title*='shared/{SHARED}'], .lm-TabBar-tab:has-text('{SHARED}')",
                                timeout=T)
            wait_text(b, "x = 1", "the shared notebook on Bob's lab")
            assert (root_b / "shared" / SHARED).exists()

            # Alice types; Bob sees it. Bob types; Alice sees it.
            page = a
            type_at_end(a, 1, "  # from alice")
            wait_text(b, "x = 1  # from alice", "Alice's typing on Bob's page")
            page = b
            type_at_end(b, 1, " and bob")
            wait_text(a, "x = 1  # from alice and bob", "Bob's typing on Alice's page")
            a.screenshot(path=str(ARTIFACTS / "share-alice.png"))
            b.screenshot(path=str(ARTIFACTS / "share-bob.png"))

            # Alice's kernel leaves the mesh: its share closes with it, and Bob's typing stays on Bob's side.
            page = a
            palette(a, "gradient-nb: Leave the Mesh")
            a.wait_for_selector("#gradient-nb-mesh-panel[data-joined='false']", state="attached", timeout=T)
            page = b
            type_at_end(b, 1, " after leave")
            wait_text(b, "and bob after leave", "Bob's own typing")
            time.sleep(3)
            assert not any("after leave" in t for t in cell_texts(a)), cell_texts(a)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "share-failure.png"))
            (b if page is a else a).screenshot(path=str(ARTIFACTS / "share-failure-other.png"))
            raise
        finally:
            browser.close()
