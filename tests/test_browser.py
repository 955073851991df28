"""End to end in a real browser: JupyterLab + Playwright + Debian's Chromium.

Starts a private JupyterLab on 127.0.0.1 (free port, random token, temporary config,
runtime, IPython and workspace directories; the "news" pop-up disabled through
``labconfig/page_config.json``), makes sure the server answering is the one it started,
copies a notebook with a vtlab dashboard into a temporary directory and opens it in
headless Chromium (``/usr/bin/chromium`` - never ``playwright install``).  Then: Run ->
Run All Cells, wait for the kernel to be idle, flip the dashboard's HLT-exiting
checkbox, press its run button (``.vtlab-run``) and wait until the rendered exit total
(``.vtlab-exit-total``) changes.  Screenshots go to browser.png in the test artifacts
folder outside the repository (``~/.cache/vtlab/test-artifacts``, see tests/conftest.py);
with ``VTLAB_UPDATE_SCREENSHOT=1`` also to docs/screenshot-dashboard.png for the README.

The notebook is ``notebooks/04_exits.ipynb`` when it exists and builds a Dashboard,
otherwise ``tests/fixtures/browser_dashboard.ipynb``.

Everything is bounded: each wait has a timeout, a watchdog kills the server, its
kernels and the browser after HARD_TIMEOUT seconds, and the server's process group
is always killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ARTIFACTS_DIR

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK_04 = REPO / "notebooks" / "04_exits.ipynb"
FIXTURE = REPO / "tests" / "fixtures" / "browser_dashboard.ipynb"
ARTIFACTS = ARTIFACTS_DIR   # outside the repository (tests/conftest.py)
SCREENSHOT = ARTIFACTS / "browser.png"
FAILURE_SCREENSHOT = ARTIFACTS / "browser-failure.png"
SERVER_LOG = ARTIFACTS / "browser-jupyter.log"
DOCS_SCREENSHOT = REPO / "docs" / "screenshot-dashboard.png"

HARD_TIMEOUT = 300        # seconds for the whole test, whatever happens
SERVER_START_TIMEOUT = 90
PAGE_TIMEOUT = 90         # JupyterLab loads, kernel starts
RUN_ALL_TIMEOUT = 180     # every cell of the notebook executes
UPDATE_TIMEOUT = 60       # a control flip + run re-renders the counts

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]

# The dashboard (vtlab.widgets.Dashboard, or the fixture's stand-in) and its parts.
DASHBOARD = ".vtlab-dashboard"
TOTAL = f"{DASHBOARD} .vtlab-exit-total"
CONTROL = f"{DASHBOARD} .vtlab-dash-HLT_EXITING input[type='checkbox']"
RUN_BUTTON = f"{DASHBOARD} button.vtlab-run"
IDLE = ".jp-Notebook-ExecutionIndicator[data-status='idle']"


def _requirements_or_skip():
    """Skip (outside CI only) when the browser or Playwright is missing."""
    problems = []
    if not (CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"{CHROMIUM} is missing (install it with `make browser`, "
                        "i.e. `apt-get install chromium`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright Python package is not installed (`make venv`)")
    if shutil.which("jupyter", path=str(Path(sys.executable).parent)) is None:
        problems.append(f"jupyter is not installed next to {sys.executable} (`make venv`)")
    if problems:
        message = "browser test cannot run: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is a failure, not a skip)", pytrace=False)
        pytest.skip(message)


def pick_notebook() -> Path:
    """04_exits.ipynb once it exists and builds a Dashboard; the fixture until then."""
    if NOTEBOOK_04.exists():
        import nbformat

        nb = nbformat.read(NOTEBOOK_04, as_version=4)
        if any(c.cell_type == "code" and "Dashboard(" in c.source for c in nb.cells):
            return NOTEBOOK_04
    return FIXTURE


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def ms(self, cap: float) -> float:
        """A Playwright timeout (ms): ``cap`` seconds or what is left, at least 1 s."""
        return max(1.0, min(cap, self.left())) * 1000


class JupyterLab:
    """A private JupyterLab server in its own process group."""

    def __init__(self, root: Path, base: Path, log_path: Path):
        self.root, self.base, self.log_path = root, base, log_path
        self.token = secrets.token_hex(24)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = None
        self.descendants: set[int] = set()
        self._lock = threading.Lock()  # stop() may race with the watchdog thread
        config = base / "config"
        (config / "labconfig").mkdir(parents=True, exist_ok=True)
        (config / "labconfig" / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        self.env = dict(os.environ)
        self.env.update({
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
            "IPYTHONDIR": str(base / "ipython"),
            "JUPYTERLAB_SETTINGS_DIR": str(base / "lab-settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(base / "lab-workspaces"),
            "PYTHONUNBUFFERED": "1",
        })
        # The kernel gets the learner's default (inline) matplotlib backend, not the Agg
        # that conftest.py forces for the nbclient-run notebook tests.
        self.env.pop("MPLBACKEND", None)
        self.env.pop("JUPYTER_TOKEN", None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        deadline = Deadline(timeout)
        attempts = []
        for _ in range(3):  # the free port can be taken between probe and bind: retry
            self.port = _free_port()
            self.log = open(self.log_path, "ab")
            cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser",
                   "--ip=127.0.0.1", f"--port={self.port}", "--port-retries=0", "--allow-root",
                   f"--IdentityProvider.token={self.token}", f"--notebook-dir={self.root}",
                   "--LabApp.news_url=None",
                   "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_until_ours(deadline):
                return
            attempts.append(f"port {self.port}: exit code {self.proc.poll()}")
            self.stop()
            if deadline.left() <= 0:
                break
        raise RuntimeError(f"JupyterLab did not come up ({'; '.join(attempts)}); log:\n{self.log_tail()}")

    def _wait_until_ours(self, deadline: Deadline) -> bool:
        """True once /api/status answers our token and the runtime file names our pid and port."""
        runtime = Path(self.env["JUPYTER_RUNTIME_DIR"])
        while deadline.left() > 0:
            if self.proc.poll() is not None:
                return False
            try:
                status = self.api("GET", "/api/status", timeout=5)
                info = json.loads((runtime / f"jpserver-{self.proc.pid}.json").read_text())
                if info.get("port") == self.port and info.get("pid") == self.proc.pid \
                        and "started" in status:
                    return True
            except (OSError, ValueError):
                pass  # not up yet, someone else's server (403), or runtime file half-written
            time.sleep(0.5)
        return False

    def api(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def _remember_descendants(self) -> None:
        try:
            import psutil

            self.descendants |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except Exception:
            pass

    def stop(self) -> None:
        """Shut down cleanly, then kill the process group and any kernel still alive."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self._remember_descendants()
        if proc.poll() is None:
            try:
                self.api("POST", "/api/shutdown", timeout=5)
                proc.wait(timeout=15)
            except Exception:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:  # kernels run in their own sessions: kill the ones this server started
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _kill_pids(self.descendants)
        self.proc = None
        if self.log:
            self.log.close()
            self.log = None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _kill_pids(pids) -> None:
    try:
        import psutil
    except ImportError:
        psutil = None
    for pid in pids:
        try:
            if psutil is not None and psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                continue
            os.kill(pid, signal.SIGKILL)
        except Exception:
            pass


def _own_children() -> set[int]:
    try:
        import psutil

        return {p.pid for p in psutil.Process().children(recursive=True)}
    except Exception:
        return set()


def _expect(page, selector: str, timeout_ms: float, what: str) -> None:
    """wait_for_selector with a message that says what was missing and why it may be."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_selector(selector, timeout=timeout_ms)
    except PlaywrightTimeout:
        raise AssertionError(f"{what}: no {selector!r} within {timeout_ms / 1000:.0f} s") from None


def _total(page) -> int:
    # textContent, not innerText: innerText is '' while JupyterLab skips drawing an
    # off-screen cell (content-visibility), which made the read racy.
    text = page.locator(TOTAL).first.text_content(timeout=5000) or ""
    return int(re.sub(r"[^\d]", "", text))


def _run_all_cells(page, deadline: Deadline) -> None:
    """Run -> Run All Cells from the menu bar (command palette as a fall-back)."""
    try:
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click(timeout=deadline.ms(20))
        page.locator(".lm-Menu-item[data-command='notebook:run-all-cells']").first.click(timeout=deadline.ms(20))
        return
    except Exception:
        page.keyboard.press("Escape")
    page.keyboard.press("Control+Shift+C")
    page.locator(".lm-CommandPalette-input").fill("Run All Cells", timeout=deadline.ms(20))
    page.keyboard.press("Enter")


def _wait_all_executed(page, deadline: Deadline, cap: float) -> None:
    """Kernel idle and no cell still waiting (``[*]``) or unexecuted (``[ ]``)."""
    page.wait_for_function(
        """() => {
            const ind = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator')
                     || document.querySelector('.jp-Notebook-ExecutionIndicator');
            if (!ind || ind.getAttribute('data-status') !== 'idle') return false;
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
            return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
        }""",
        timeout=deadline.ms(cap), polling=250)


def _tidy_for_screenshot(page, dashboard) -> None:
    """Close the file browser and scroll the dashboard's cell to the top (cosmetic only)."""
    try:
        tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
        if tab.count():
            tab.first.click(timeout=5000)
        dashboard.evaluate("e => (e.closest('.jp-Cell') || e).scrollIntoView({block: 'start'})")
        page.wait_for_timeout(300)
    except Exception:
        dashboard.scroll_into_view_if_needed()


def test_dashboard_in_jupyterlab(artifacts_dir):
    _requirements_or_skip()
    from playwright.sync_api import sync_playwright

    notebook = pick_notebook()
    deadline = Deadline(HARD_TIMEOUT)
    before_children = _own_children()
    base = Path(tempfile.mkdtemp(prefix="vtlab-browser-"))
    root = base / "notebooks"
    root.mkdir()
    shutil.copy(notebook, root / notebook.name)
    server = JupyterLab(root, base, base / "jupyter.log")
    timed_out = threading.Event()

    def watchdog():  # last resort: never let CI hang on a wedged server or browser
        timed_out.set()
        server.stop()
        _kill_pids(_own_children() - before_children)

    timer = threading.Timer(HARD_TIMEOUT + 30, watchdog)
    timer.daemon = True
    timer.start()
    page = None
    failure = None
    try:
        server.start(SERVER_START_TIMEOUT)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                                         timeout=deadline.ms(60))
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1050})
                page.set_default_timeout(deadline.ms(60))
                page.goto(f"{server.url}/lab/tree/{notebook.name}?token={server.token}",
                          timeout=deadline.ms(PAGE_TIMEOUT), wait_until="domcontentloaded")
                _expect(page, ".jp-NotebookPanel .jp-Cell", deadline.ms(PAGE_TIMEOUT),
                        "JupyterLab did not show the notebook")
                _expect(page, IDLE, deadline.ms(PAGE_TIMEOUT), "the kernel did not start")

                _run_all_cells(page, deadline)
                _expect(page, TOTAL, deadline.ms(RUN_ALL_TIMEOUT),
                        "Run All Cells rendered no dashboard exit total (a cell failed, or the "
                        "widget manager did not render the Dashboard)")
                _wait_all_executed(page, deadline, RUN_ALL_TIMEOUT)
                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] "
                                      ":text('Traceback')")
                assert errors.count() == 0, "a cell raised:\n" + errors.first.inner_text()

                dashboard = page.locator(DASHBOARD).first
                dashboard.scroll_into_view_if_needed()
                before = _total(page)
                _expect(page, CONTROL, deadline.ms(10), "the dashboard has no HLT_EXITING checkbox "
                        "(Dashboard(controls=...) must include ProcBased.HLT_EXITING)")
                checkbox = page.locator(CONTROL).first
                was_checked = checkbox.is_checked()
                checkbox.click()
                page.wait_for_function(  # the click reached the kernel's model and came back
                    "([sel, old]) => { const c = document.querySelector(sel); return c && c.checked !== old; }",
                    arg=[CONTROL, was_checked], timeout=deadline.ms(UPDATE_TIMEOUT))
                page.locator(RUN_BUTTON).first.click()
                page.wait_for_function(
                    "([sel, old]) => { const e = document.querySelector(sel);"
                    " return e && e.textContent.replace(/\\D/g, '') !== String(old); }",
                    arg=[TOTAL, before], timeout=deadline.ms(UPDATE_TIMEOUT))
                _wait_all_executed(page, deadline, UPDATE_TIMEOUT)
                after = _total(page)
                assert after != before, f"exit total stayed {before} after toggling HLT exiting and pressing run"
                assert checkbox.is_checked() != was_checked

                page.wait_for_timeout(500)  # let the plot re-render before the picture
                _tidy_for_screenshot(page, dashboard)
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT))
                if os.environ.get("VTLAB_UPDATE_SCREENSHOT"):  # a test run leaves the tree clean
                    DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(SCREENSHOT, DOCS_SCREENSHOT)
            except Exception as exc:
                failure = exc
                if page is not None and not timed_out.is_set():
                    try:
                        page.screenshot(path=str(FAILURE_SCREENSHOT), timeout=10_000)
                    except Exception:
                        pass
            finally:
                try:
                    browser.close()
                except Exception:
                    pass
    finally:
        timer.cancel()
        server.stop()
        _kill_pids(_own_children() - before_children)
        log_tail = server.log_tail()
        try:
            shutil.copyfile(server.log_path, SERVER_LOG)
        except OSError:
            pass
        shutil.rmtree(base, ignore_errors=True)
    if failure is not None or timed_out.is_set():
        why = f"hard timeout of {HARD_TIMEOUT + 30} s hit; " if timed_out.is_set() else ""
        pytest.fail(f"{why}browser test on {notebook.relative_to(REPO)} failed: {failure!r}\n"
                    f"screenshot: {FAILURE_SCREENSHOT}\nlog: {SERVER_LOG}\n--- JupyterLab log (tail) ---\n{log_tail}",
                    pytrace=False)
