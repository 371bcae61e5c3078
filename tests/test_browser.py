"""The trajectory viewer in a real browser: JupyterLab on localhost, Debian's Chromium driven by Playwright.

Not part of `make test` (a JupyterLab server, a browser and a guided run take a minute or two): run it with
`make test-browser`. Needs `apt-get install chromium` and `pip install playwright` (no browser download: the
system Chromium is used). The screenshots go to `outputs/browser/`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("TFG_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = ROOT / "outputs" / "browser"
TOKEN = "tfg-browser-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server whose root holds 03_guided_sampling with this test's parameters."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from tfg_core.experiment import open_cohort

    if not CHROMIUM.is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set TFG_CHROMIUM)")
    open_cohort("phantom", tmp_path / "phantom")  # written before the browser waits on the notebook
    root = tmp_path / "lab"
    root.mkdir()
    nb = load_notebook_node(str(ROOT / "notebooks" / "03_guided_sampling.ipynb"))  # with papermill's metadata
    nb = parameterize_notebook(nb, {"data_root": str(tmp_path / "phantom"), "out_dir": str(tmp_path / "out"),
                                    "fold": 2, "baselines": [], "interactive": True, "progress": False})
    nbformat.write(nb, root / "03_guided_sampling.ipynb")
    port = _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter_config"), "OMP_NUM_THREADS": "2"}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         *(["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2) as reply:
                    json.load(reply)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log = server.stdout.read().decode(errors="replace") if server.stdout else ""
                    pytest.fail(f"JupyterLab did not start:\n{log[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def _settled(page, canvas, timeout_s: float = 60) -> bytes:
    """The canvas once the kernel is idle and two screenshots half a second apart agree (ipympl draws async)."""
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=timeout_s * 1000)
    deadline, last = time.monotonic() + timeout_s, canvas.screenshot()
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        shot = canvas.screenshot()
        if shot == last:
            return shot
        last = shot
    return last


def test_slice_slider_redraws_the_ipympl_canvas(lab):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("03_guided_sampling_*"):
        old.unlink()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{lab}/lab/tree/03_guided_sampling.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            select_kernel = page.get_by_role("button", name="Select", exact=True)  # JupyterLab may ask which kernel
            try:
                select_kernel.click(timeout=20_000)
            except playwright.Error:
                pass  # it started the notebook's kernel without asking
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
            # Run > Run All Cells, through the menu a user would use
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            news = page.get_by_role("button", name="No", exact=True)  # "notified about Jupyter news?" toast
            canvas = page.locator(".jupyter-matplotlib-canvas-div canvas").first
            canvas.wait_for(state="visible", timeout=180_000)
            if news.count():
                news.first.click()
            slider = page.locator(".widget-slider", has=page.locator("label", has_text="slice z")).first
            readout = slider.locator(".widget-readout")
            before_z = int(readout.inner_text())
            before = _settled(page, canvas)
            page.screenshot(path=str(SCREENSHOTS / "03_guided_sampling_before.png"), full_page=False)

            handle = slider.locator(".noUi-handle").first
            handle.focus()
            for _ in range(3):  # three slices up, with the keyboard, as a user would
                handle.press("ArrowRight")
            after = _settled(page, canvas)
            page.screenshot(path=str(SCREENSHOTS / "03_guided_sampling_after.png"), full_page=False)
            assert int(readout.inner_text()) == before_z + 3
            assert after != before, "the canvas did not change after moving the slice slider"
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert not any("Error" in t for t in errors.all_inner_texts())
        except Exception:
            page.screenshot(path=str(SCREENSHOTS / "03_guided_sampling_failure.png"), full_page=True)
            (SCREENSHOTS / "03_guided_sampling_failure.html").write_text(page.content())
            raise
        finally:
            browser.close()
