"""Real-browser tests: a real JupyterLab 4, driven in Debian's Chromium by the PyPI ``playwright`` package.

``make test`` installs what they need (Chromium with apt-get when /usr/bin/chromium is missing; jupyterlab and
playwright from the ``dev`` extra). Without a Chromium (or $JL_CHROMIUM) they are skipped; everything else missing is
a failure. Run them alone with::

    .venv/bin/python -m pytest tests/browser -m browser -q

Fixtures
--------
``lab_server`` (session)
    A JupyterLab started from this interpreter (so its ``python3`` kernel is this venv's Python and imports
    ``jupyter_lora``) on a free loopback port with the token ``lab_helpers.TOKEN``. HOME, TMPDIR, JUPYTER_* and
    IPYTHONDIR point into a temp dir (nothing is written to the venv or the real home); the news/update toast is off
    (an ``overrides.json`` in a temp ``--LabApp.app_settings_dir``). Attributes: ``url``, ``root`` (the server's
    root dir: write notebooks there), ``log`` (the server's log file). Stopped, with its kernels, at the end.
``notebook_dir``
    ``lab_server.root``.
``browser`` (session)
    A headless Chromium (``/usr/bin/chromium``) started by Playwright.
``page``
    A new tab (1400×1000, its own context) whose relative URLs go to the server. When a test fails, a screenshot
    (its path), the browser console's errors and the end of the server log are printed with the test's output.

Helpers (``from lab_helpers import ...``)
-----------------------------------------
``write_notebook(dir, cells, name="test.ipynb")``
    code cells (strings) with python3 kernelspec metadata → path.
``open_notebook(page, name, n_cells=None)``
    opens it and waits for an idle kernel (accepting dialogs) and the rendered cells.
``run_cell(page, i)``
    clicks cell ``i``, its editor, presses Shift+Enter and waits for a new ``[n]`` prompt. Shift+Enter on the last
    cell adds an empty one below: earlier indices stay valid.
``output_area(page, i)`` / ``output_text(page, i)``
    the locator / text of cell ``i``'s outputs (look for widgets only in here).
``kernel_eval(page, expr)``
    appends a cell printing ``repr(expr)``, runs it and returns the value (``ast.literal_eval``, else the string).
``append_cell(page, source)``, ``cell(page, i)``, ``accept_dialogs(page)``.

Screenshots
-----------
Tests write screenshots only under their ``tmp_path``. ``keep_screenshot(path)`` (a fixture) also copies one into
the directory named by ``$JUPYTER_LORA_SCREENSHOTS`` when it is set, under the same file name: ``make screenshots``
runs the browser tests with ``JUPYTER_LORA_SCREENSHOTS=docs`` to refresh the README's images.

A test of a new widget (the panel, say) looks like::

    import pytest
    from lab_helpers import kernel_eval, open_notebook, output_area, run_cell, write_notebook
    from playwright.sync_api import expect

    pytestmark = pytest.mark.browser

    def test_panel(page, notebook_dir):
        write_notebook(notebook_dir, ["%load_ext jupyter_lora", "...", "%lora panel model"], "panel.ipynb")
        open_notebook(page, "panel.ipynb", n_cells=3)
        for i in range(3):
            run_cell(page, i)
        panel = output_area(page, 2)
        panel.locator("button.jupyter-button", has_text="Apply").click()   # widgets: ipywidgets' classes,
        expect(panel.locator(".jl-panel-status")).to_contain_text("...")  # anywidgets: your ESM's classes
        assert kernel_eval(page, "jl.status(model).active") == "default"

Use one notebook name per test (each opens its own kernel). Selectors that work: slider ``.widget-slider`` and
its ``.noUi-handle`` (focus, then ArrowRight), readout ``.widget-readout``, label ``.widget-label``, progress bar
``.widget-hprogress .progress-bar`` (``style.width`` is the percentage), buttons ``button.jupyter-button`` by text,
plotly ``.js-plotly-plot`` (lines ``.scatterlayer .trace path.js-line``, markers ``path.point``). A test that
stops the kernel's work half-way (a long training run) should stop it itself, as each notebook's kernel lives until
the server stops at the end of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("JL_CHROMIUM", "/usr/bin/chromium")
# A directory that keep_screenshot copies screenshots into (unset: none are copied; make screenshots sets docs).
SCREENSHOTS_ENV = "JUPYTER_LORA_SCREENSHOTS"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SERVER_START_TIMEOUT = 120.0
# JupyterLab's news and update checks: their toast covers the notebook's bottom-right corner.
SETTINGS_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}
}


def _chromium_or_skip() -> str:
    path = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if path is None:
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set JL_CHROMIUM)")
    return path


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"_report_{report.when}", report)
    return report


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    url: str
    root: Path
    log: Path
    process: subprocess.Popen

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _app_settings(settings: Path) -> None:
    """A copy of JupyterLab's app settings dir (page_config.json, overrides.json, ...) with the toast overrides
    added: the server reads overrides.json only from there (not from JUPYTER_DATA_DIR/lab/settings); a user
    settings file would do too. The venv's own dir is left untouched."""
    from jupyterlab.commands import get_app_dir

    default = Path(get_app_dir()) / "settings"
    if default.is_dir():
        shutil.copytree(default, settings, dirs_exist_ok=True)
    path = settings / "overrides.json"
    overrides = json.loads(path.read_text()) if path.exists() else {}
    for plugin, values in SETTINGS_OVERRIDES.items():
        overrides.setdefault(plugin, {}).update(values)
    path.write_text(json.dumps(overrides, indent=2))


def _wait_until_up(server: LabServer, token: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/api/status?token={token}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"JupyterLab did not answer in {SERVER_START_TIMEOUT:.0f} s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    # The server shuts its kernels down on SIGTERM; whatever is left of its process group is killed after.
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory):
    _chromium_or_skip()  # no browser: don't start a server either

    from lab_helpers import TOKEN

    base = tmp_path_factory.mktemp("jupyterlab")
    dirs = {
        name: base / name
        for name in (
            "home",
            "tmp",
            "config",
            "data",
            "runtime",
            "ipython",
            "settings",
            "workspaces",
            "notebooks",
        )
    }
    for path in dirs.values():
        path.mkdir()
    _app_settings(dirs["settings"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON", "PYTEST_"))}
    env.update(
        HOME=str(dirs["home"]),
        TMPDIR=str(dirs["tmp"]),
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        IPYTHONDIR=str(dirs["ipython"]),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONUNBUFFERED="1",
    )
    port = _free_port()
    log = base / "server.log"
    cmd = [
        # this interpreter: the kernelspec's "python" becomes sys.executable, so the kernel imports jupyter_lora
        sys.executable,
        "-m",
        "jupyterlab",
        "--allow-root",
        "--no-browser",
        f"--port={port}",
        "--port-retries=0",
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={dirs['notebooks']}",
        f"--LabApp.workspaces_dir={dirs['workspaces']}",
        f"--LabApp.app_settings_dir={dirs['settings']}",
        "--LabApp.news_url=None",
    ]
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            cmd,
            cwd=dirs["notebooks"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LabServer(url=f"http://127.0.0.1:{port}", root=dirs["notebooks"], log=log, process=process)
    try:
        _wait_until_up(server, TOKEN)
        yield server
    finally:
        _stop(process)


@pytest.fixture
def notebook_dir(lab_server) -> Path:
    return lab_server.root


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    chromium = _chromium_or_skip()
    from playwright.sync_api import sync_playwright  # missing: a failure, it is in the dev extra

    # Playwright's driver makes the browser profile under TMPDIR: keep it in pytest's temp dir.
    profile_tmp = tmp_path_factory.mktemp("chromium")
    old_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(profile_tmp)
    try:
        playwright = sync_playwright().start()
    finally:
        if old_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmpdir
    try:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


@pytest.fixture
def keep_screenshot():
    """``keep(path)``: copy the screenshot at ``path`` into ``$JUPYTER_LORA_SCREENSHOTS`` (created if needed) and
    return the copy's path; None, and nothing written, when the variable is unset or empty."""

    def keep(shot: Path) -> Path | None:
        directory = os.environ.get(SCREENSHOTS_ENV)
        if not directory:
            return None
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(shot, target / Path(shot).name))

    return keep


@pytest.fixture
def page(request, browser, lab_server, tmp_path):
    context = browser.new_context(base_url=lab_server.url + "/", viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    console: list[str] = []
    page.on(
        "console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
    )
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    try:
        yield page
    finally:
        report = getattr(request.node, "_report_call", None)
        if report is not None and report.failed:
            shot = tmp_path / "failure.png"
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of the failed test: {shot}")
            print("browser console (errors, warnings):\n" + "\n".join(console[-40:]))
            print("JupyterLab log (end):\n" + lab_server.log_tail())
        context.close()
