"""The JupyterLab 4 and Notebook 7 interface in a real browser: Debian's chromium
driven by Playwright (no browser download) against a real `jupyter lab` server
process with jupyter-ckpt and its labextension.

Screenshots of the toolbar and the panel are saved under test-artifacts/ui/.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from .servers import TOKEN, Server, call

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui"

pytestmark = [
    pytest.mark.criu,
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make test installs it)"
    ),
]

EMPTY_NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [], "source": ""}],
    "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture
def lab(tmp_path):
    """A real `jupyter lab` server with the extension (built into the package)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "story.ipynb").write_text(json.dumps(EMPTY_NOTEBOOK))
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    server = Server(
        tmp_path,
        f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        app="jupyterlab",
    )
    yield server.port
    server.kill()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        yield page
        page.screenshot(path=str(ARTIFACTS / "last-page.png"))  # what the browser showed at the end
        browser.close()


def wait_for_kernel(lab: int, path: str) -> None:
    """Until the notebook's kernel is idle with the page connected to it: a cell
    run before that may be dropped."""
    for _ in range(600):
        sessions = [s for s in call(lab, "GET", "/api/sessions") if s["path"] == path]
        if sessions:
            kernel = call(lab, "GET", f"/api/kernels/{sessions[0]['kernel']['id']}")
            if kernel["connections"] >= 1 and kernel["execution_state"] == "idle":
                return
        time.sleep(0.1)
    raise TimeoutError(f"the kernel of {path} is not connected")


def open_notebook(page, lab: int, url: str, path: str = "story.ipynb") -> None:
    page.goto(f"http://127.0.0.1:{lab}/{url}?token={TOKEN}")
    page.locator(SNAPSHOT_BUTTON).wait_for()
    wait_for_kernel(lab, path)


SNAPSHOT_BUTTON = ".jp-NotebookPanel:visible .jp-ckpt-snapshot-button .jp-ToolbarButtonComponent"


def click_snapshot(page, outcome: str = "Snapshot saved"):
    """Click the notebook's Snapshot button; the notification that ends it."""
    page.locator(SNAPSHOT_BUTTON).click()
    toast = page.locator(".jp-toast-message", has_text=outcome).last
    toast.wait_for()
    return toast


def run_cell(page, code: str) -> None:
    """Type ``code`` into the last cell and run it (Shift+Enter adds a new one below)."""
    editor = page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content").last
    editor.click()
    page.keyboard.type(code)
    page.keyboard.press("Shift+Enter")


def last_output(page, text: str) -> None:
    page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output", has_text=text).last.wait_for()


def test_snapshot_and_restore_from_the_panel_in_jupyterlab(lab, page):
    open_notebook(page, lab, "lab/tree/story.ipynb")
    run_cell(page, "x = 'before'; print('x is', x)")
    last_output(page, "x is before")

    assert "kernel frozen" in click_snapshot(page).inner_text()
    page.locator(".jp-NotebookPanel:visible .jp-NotebookPanel-toolbar").screenshot(path=str(ARTIFACTS / "toolbar.png"))

    # The panel lists it, live (the event stream), with its facts.
    page.locator(".lm-TabBar-tab[data-id='jupyter-ckpt-panel']").click()
    row = page.locator(".jp-ckpt-row.jp-ckpt-status-complete").first
    row.wait_for()
    assert "manual" in row.inner_text() and "frozen" in row.inner_text()

    run_cell(page, "x = 'after'; print('x is', x)")
    last_output(page, "x is after")

    # Restore, saving the current state first (the dialog's default).
    row.locator(".jp-ToolbarButtonComponent[aria-label='Restore']").click()
    dialog = page.locator(".jp-Dialog")
    assert "Snapshot the current state first" in dialog.inner_text()
    dialog.locator("button.jp-mod-warn").click()
    page.locator(".jp-toast-message", has_text="Kernel restored").wait_for()

    run_cell(page, "print('x is now', x)")
    last_output(page, "x is now before")
    # Two snapshots now (the one taken before restoring), and the notebook and
    # the panel say which one the kernel runs from.
    page.locator(".jp-ckpt-row").nth(1).wait_for()
    assert page.locator(".jp-ckpt-row").count() == 2
    page.locator(".jp-ckpt-origin").wait_for()
    page.locator(".jp-NotebookPanel:visible .jp-ckpt-lineage-indicator", has_text="from").wait_for()
    box = page.locator(".jp-ckpt-panel").bounding_box()  # its top: notifications cover the bottom
    page.screenshot(path=str(ARTIFACTS / "panel.png"), clip={**box, "height": min(box["height"], 440)})
    page.screenshot(path=str(ARTIFACTS / "lab.png"))


def test_snapshot_and_restore_an_r_notebook(lab, page, tmp_path):
    """The toolbar and the panel on a notebook of another language (R)."""
    notebook = {**EMPTY_NOTEBOOK, "metadata": {"kernelspec": {"display_name": "R", "language": "R", "name": "ir"}}}
    (tmp_path / "root" / "analysis.ipynb").write_text(json.dumps(notebook))
    open_notebook(page, lab, "lab/tree/analysis.ipynb", path="analysis.ipynb")
    run_cell(page, 'x <- 41; cat("x is", x)')
    last_output(page, "x is 41")
    click_snapshot(page)
    run_cell(page, 'x <- 0; cat("x is", x)')
    last_output(page, "x is 0")
    page.locator(".lm-TabBar-tab[data-id='jupyter-ckpt-panel']").click()
    row = page.locator(".jp-ckpt-row.jp-ckpt-status-complete").first
    row.locator(".jp-ToolbarButtonComponent[aria-label='Restore']").click()
    page.locator(".jp-Dialog button.jp-mod-warn").click()
    page.locator(".jp-toast-message", has_text="Kernel restored").wait_for()
    run_cell(page, 'cat("x is now", x)')
    last_output(page, "x is now 41")
    snaps = call(lab, "GET", "/api/ckpt/snapshots")
    assert {(s["kernel_name"], s["path"]) for s in snaps} == {("ir", "analysis.ipynb")}


def test_fork_into_a_copy_from_the_panel(lab, page):
    open_notebook(page, lab, "lab/tree/story.ipynb")
    run_cell(page, "y = 'shared past'; print('y is', y)")
    last_output(page, "y is shared past")
    click_snapshot(page)
    page.locator(".lm-TabBar-tab[data-id='jupyter-ckpt-panel']").click()
    row = page.locator(".jp-ckpt-row.jp-ckpt-status-complete").first
    row.locator(".jp-ToolbarButtonComponent[aria-label='Fork']").click()
    page.locator(".jp-toast-message", has_text="New kernel from the snapshot").wait_for()
    # The copy opens, attached to the fork, which has the snapshot's state.
    page.locator(".lm-TabBar-tab", has_text="story-Copy1.ipynb").wait_for()
    wait_for_kernel(lab, "story-Copy1.ipynb")
    run_cell(page, "print('the fork has', y)")
    last_output(page, "the fork has shared past")
    sessions = call(lab, "GET", "/api/sessions")
    assert {s["path"] for s in sessions} == {"story.ipynb", "story-Copy1.ipynb"}


def test_snapshot_button_in_notebook_7(lab, page):
    open_notebook(page, lab, "notebooks/story.ipynb")
    run_cell(page, "z = 7; print('z is', z)")
    last_output(page, "z is 7")
    click_snapshot(page)
    page.screenshot(path=str(ARTIFACTS / "notebook7.png"))
    snaps = call(lab, "GET", "/api/ckpt/snapshots")
    assert [s["status"] for s in snaps] == ["complete"]
    assert snaps[0]["path"] == "story.ipynb"


def test_failure_reason_rename_and_delete_in_the_panel(lab, page, tmp_path):
    import socket

    # A connection to a process outside the kernel: CRIU refuses the snapshot.
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside.bind(str(tmp_path / "outside.sock"))
    outside.listen()
    open_notebook(page, lab, "lab/tree/story.ipynb")
    run_cell(
        page,
        f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(tmp_path / 'outside.sock')!r}); print('connected')",
    )
    last_output(page, "connected")
    peer, _ = outside.accept()
    assert "unix" in click_snapshot(page, "Snapshot failed").inner_text().lower()
    run_cell(page, "s.close(); print('closed')")  # the kernel runs on
    last_output(page, "closed")

    click_snapshot(page)
    page.locator(".lm-TabBar-tab[data-id='jupyter-ckpt-panel']").click()
    page.locator(".jp-ckpt-row.jp-ckpt-status-failed").wait_for()
    row = page.locator(".jp-ckpt-row.jp-ckpt-status-complete").first
    row.locator(".jp-ToolbarButtonComponent[aria-label='Rename']").click()
    page.locator(".jp-Dialog input").fill("clean state")
    page.locator(".jp-Dialog .jp-mod-accept").click()
    page.locator(".jp-ckpt-label", has_text="clean state").wait_for()
    assert [s["label"] for s in call(lab, "GET", "/api/ckpt/snapshots") if s["status"] == "complete"] == ["clean state"]

    page.locator(".jp-ckpt-row.jp-ckpt-status-complete .jp-ToolbarButtonComponent[aria-label='Delete']").click()
    page.locator(".jp-Dialog .jp-mod-warn").click()
    page.locator(".jp-ckpt-row.jp-ckpt-status-complete").wait_for(state="detached")
    assert [s["status"] for s in call(lab, "GET", "/api/ckpt/snapshots")] == ["failed"]
    peer.close()
    outside.close()


def test_notebook_with_the_snapshot_and_hibernation_in_jupyterlab(lab, page):
    open_notebook(page, lab, "lab/tree/story.ipynb")
    run_cell(page, "x = 'v1'; print('x is', x)")
    last_output(page, "x is v1")
    click_snapshot(page)  # the document as shown goes with it, unsaved as it is
    run_cell(page, "x = 'v2'; print('x is', x)")
    last_output(page, "x is v2")

    # The panel says how the snapshot's notebook differs from the open one, and shows it.
    page.locator(".lm-TabBar-tab[data-id='jupyter-ckpt-panel']").click()
    row = page.locator(".jp-ckpt-row.jp-ckpt-status-complete").first
    row.locator(".jp-ckpt-notebook-changes", has_text="cells since").wait_for()
    row.locator("[data-action='open-notebook']").click()
    view = page.locator(".jp-ckpt-notebook-view")
    view.wait_for()
    assert "x = 'v1'" in view.inner_text() and "x = 'v2'" not in view.inner_text()
    assert "x is v1" in view.inner_text()  # with its outputs
    page.locator(".lm-TabBar-tab.lm-mod-current .lm-TabBar-tabCloseIcon").last.click()

    # Restore kernel and notebook: the open notebook shows the snapshot's without a reload.
    row.locator(".jp-ToolbarButtonComponent[aria-label='Restore']").click()
    dialog = page.locator(".jp-Dialog")
    dialog.locator(".jp-ckpt-save-first input").uncheck()
    dialog.locator(".jp-ckpt-with-notebook input").check()
    dialog.locator("button.jp-mod-warn").click()
    page.locator(".jp-toast-message", has_text="Kernel and notebook restored").wait_for()
    cells = page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content", has_text="x = 'v2'")
    for _ in range(100):
        if cells.count() == 0:
            break
        time.sleep(0.1)
    assert cells.count() == 0
    run_cell(page, "print('x is now', x)")
    last_output(page, "x is now v1")

    # Hibernate from the command palette: the toolbar says so.
    page.keyboard.press("Control+Shift+c")
    page.keyboard.type("Hibernate Kernel")
    page.keyboard.press("Enter")
    page.locator(".jp-toast-message", has_text="Kernel hibernated").wait_for()
    page.locator(SNAPSHOT_BUTTON, has_text="Hibernated").wait_for()
    [session] = call(lab, "GET", "/api/sessions")
    kernel_id = session["kernel"]["id"]
    assert call(lab, "GET", f"/api/ckpt/kernels/{kernel_id}")["hibernated"] is True

    # A cell run wakes it: the toolbar says "Waking…", then is back to its usual state.
    page.locator(SNAPSHOT_BUTTON).evaluate(
        """node => {
            window.ckptLabels = [];
            new MutationObserver(() => window.ckptLabels.push(node.textContent)).observe(
                node, {subtree: true, childList: true, characterData: true});
        }"""
    )
    run_cell(page, "print('x after waking:', x)")
    last_output(page, "x after waking: v1")
    page.locator(SNAPSHOT_BUTTON, has_text="Snapshot").wait_for()
    assert "Waking…" in page.evaluate("window.ckptLabels")

    # Hibernated again (the panel's button), then woken by opening the notebook.
    page.locator(".jp-ckpt-hibernation .jp-ToolbarButtonComponent", has_text="Hibernate").click()
    page.locator(SNAPSHOT_BUTTON, has_text="Hibernated").wait_for()
    page.reload()
    page.locator(SNAPSHOT_BUTTON, has_text="Snapshot").wait_for()
    wait_for_kernel(lab, "story.ipynb")
    assert call(lab, "GET", f"/api/ckpt/kernels/{kernel_id}")["hibernated"] is False
    run_cell(page, "print('x after opening:', x)")
    last_output(page, "x after opening: v1")


def test_shortcut_palette_auto_backup_bundles_and_wake_in_jupyterlab(lab, page, tmp_path):
    """The keyboard shortcut and the palette entry snapshot; the panel's
    auto-backup switch and interval change the schedule; a bundle downloads,
    and one signed by another store uploads through the trust dialog; the
    panel's Wake button wakes a hibernated kernel."""
    from jupyter_ckpt.bundle import MAGIC, export_bundle
    from jupyter_ckpt.store import SnapshotStore

    from .test_store import commit

    open_notebook(page, lab, "lab/tree/story.ipynb")
    run_cell(page, "x = 'kept'; print('x is', x)")
    last_output(page, "x is kept")
    [session] = call(lab, "GET", "/api/sessions")
    kernel_id = session["kernel"]["id"]

    def snapshots() -> list[dict]:
        return call(lab, "GET", f"/api/ckpt/snapshots?kernel_id={kernel_id}")

    page.keyboard.press("Escape")  # command mode: the shortcut is the notebook's, not the editor's
    page.keyboard.press("Control+Alt+s")
    page.locator(".jp-toast-message", has_text="Snapshot saved").first.wait_for()
    assert len(snapshots()) == 1
    page.keyboard.press("Control+Shift+c")
    page.keyboard.type("Snapshot Kernel")
    page.keyboard.press("Enter")
    for _ in range(600):
        if len([s for s in snapshots() if s["status"] == "complete"]) == 2:
            break
        time.sleep(0.1)
    assert [s["trigger"] for s in snapshots()] == ["manual", "manual"]

    # Auto-backup: the switch and the interval (minutes) of this kernel.
    page.locator(".lm-TabBar-tab[data-id='jupyter-ckpt-panel']").click()
    switch = page.locator(".jp-ckpt-auto-backup")
    assert switch.is_checked()
    switch.click()  # a controlled input: it shows the schedule once the server changed it
    for _ in range(100):
        if not call(lab, "GET", f"/api/ckpt/kernels/{kernel_id}/schedule")["enabled"]:
            break
        time.sleep(0.1)
    for _ in range(100):  # the panel shows it (as the user sees it) before the next change
        if not switch.is_checked():
            break
        time.sleep(0.1)
    interval = page.locator(".jp-ckpt-interval")
    interval.fill("5")
    interval.blur()
    for _ in range(100):
        schedule = call(lab, "GET", f"/api/ckpt/kernels/{kernel_id}/schedule")
        if schedule["interval_seconds"] == 300:
            break
        time.sleep(0.1)
    assert schedule == {"enabled": False, "interval_seconds": 300.0, "keep": 10}

    # Download a snapshot as a bundle.
    row = page.locator(".jp-ckpt-row.jp-ckpt-status-complete").first
    with page.expect_download() as download:
        row.locator(".jp-ToolbarButtonComponent[title='Download as a bundle']").click()
    saved = tmp_path / "downloaded.jckpt"
    download.value.save_as(saved)
    assert saved.read_bytes().startswith(MAGIC) and download.value.suggested_filename.endswith(".jckpt")

    # Upload one signed by another store's key: the trust dialog, then imported.
    other = SnapshotStore(tmp_path / "other-store")
    foreign = commit(other, kernel_id="from-elsewhere")
    bundle = tmp_path / "foreign.jckpt"
    with open(bundle, "wb") as out:
        export_bundle(other, foreign.id, out)
    other.close()
    with page.expect_file_chooser() as chooser:
        page.locator(".jp-ckpt-header-actions .jp-ToolbarButtonComponent[title='Upload a bundle']").click()
    chooser.value.set_files(str(bundle))
    dialog = page.locator(".jp-Dialog", has_text="Trust this bundle?")
    dialog.wait_for()
    dialog.locator("button", has_text="Trust and import").click()
    page.locator(".jp-toast-message", has_text="Imported").wait_for()
    imported = call(lab, "GET", f"/api/ckpt/snapshots/{foreign.id}")
    assert imported["imported"]["verified"] is False and imported["status"] == "complete"

    # Hibernate (palette), then wake with the panel's button.
    page.keyboard.press("Control+Shift+c")
    page.keyboard.type("Hibernate Kernel")
    page.keyboard.press("Enter")
    page.locator(SNAPSHOT_BUTTON, has_text="Hibernated").wait_for()
    page.locator(".jp-ckpt-hibernation .jp-ToolbarButtonComponent", has_text="Wake").click()
    page.locator(".jp-toast-message", has_text="Kernel running again").wait_for()
    page.locator(SNAPSHOT_BUTTON, has_text="Snapshot").wait_for()
    assert call(lab, "GET", f"/api/ckpt/kernels/{kernel_id}")["hibernated"] is False
    run_cell(page, "print('x after waking:', x)")
    last_output(page, "x after waking: kept")
