"""Real browser: ``moeca app`` on loopback, headless Debian chromium (Playwright), every page, no errors.

Screenshots of every page go to ``tests/artifacts/app/`` (gitignored), or ``$MOECA_TEST_ARTIFACTS/app``.
Needs ``/usr/bin/chromium`` and the ``playwright`` package (``app/ci_browser_setup.sh`` installs both);
skipped with the reason when either is missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from moeca.testing.explorer_root import SyntheticTraceConfig, write_example_root
from moeca.bench.pareto_synthetic import write_synthetic_pareto

CHROMIUM = os.environ.get("MOECA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
PAGES = {"overview": "", "traces": "traces", "token-vs-branch": "token-vs-branch", "schedule": "schedule",
         "replay": "replay", "benchmarks": "benchmarks"}
TITLES = {"overview": "moeca explorer", "traces": "Traces", "token-vs-branch": "Token vs branch",
          "schedule": "Schedule", "replay": "Replay", "benchmarks": "Benchmarks"}

if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"chromium is not installed at {CHROMIUM} (run app/ci_browser_setup.sh)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                             "(run app/ci_browser_setup.sh)")


def artifact_dir() -> Path:
    base = os.environ.get("MOECA_TEST_ARTIFACTS")
    out = (Path(base) if base else Path(__file__).resolve().parent / "artifacts") / "app"
    out.mkdir(parents=True, exist_ok=True)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moeca app exited with code {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"moeca app did not answer {url}/_stcore/health within {timeout:.0f} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_root")
    write_example_root(root, SyntheticTraceConfig(samples=2, samples_per_shard=2, steps=16, blocks=3, tokens=16,
                                                  experts=4, lags=2))
    write_synthetic_pareto(root / "bench" / "results")
    port = free_port()
    log = (tmp_path_factory.mktemp("log") / "app.log").open("w")
    moeca = shutil.which("moeca")
    cmd = [moeca] if moeca else [sys.executable, "-m", "moeca.cli.main"]
    proc = subprocess.Popen(cmd + ["app", "--root", str(root), "--port", str(port), "--host", "127.0.0.1"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    # `moeca app` is the server process itself: once it is gone, nothing answers on the port any more
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/_stcore/health", timeout=2)


def settle(page, title: str, timeout_ms: int = 60_000) -> None:
    """Wait until the page's title is shown and the script run has finished."""
    page.wait_for_selector(f'h1:has-text("{title}")', timeout=timeout_ms)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)
    page.wait_for_timeout(500)  # let charts finish drawing before the screenshot


def test_every_page_renders_without_errors(server):
    shots = artifact_dir()
    problems = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            console_errors: list[str] = []
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            for name, path in PAGES.items():
                start = time.monotonic()
                page.goto(f"{server}/{path}", wait_until="domcontentloaded")
                settle(page, TITLES[name])
                print(f"{name}: rendered in {time.monotonic() - start:.1f} s")
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
                exceptions = page.locator('[data-testid="stException"]').all_inner_texts()
                errors = page.locator('[data-testid="stAlertContentError"]').all_inner_texts()
                if exceptions or errors:
                    problems.append(f"{name}: exceptions={exceptions} errors={errors}")
            # navigate through the sidebar too (client-side page switch), and change a widget
            page.goto(server, wait_until="domcontentloaded")
            settle(page, TITLES["overview"])
            page.locator('[data-testid="stSidebarNav"] a', has_text="Traces").click()
            settle(page, TITLES["traces"])
            page.get_by_text("cosine", exact=True).click()
            page.wait_for_timeout(300)
            settle(page, TITLES["traces"])
            page.screenshot(path=str(shots / "traces-cosine.png"), full_page=True)
            if page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]').count():
                problems.append("traces after switching to cosine shows an error")
            assert page.locator('[data-testid="stVegaLiteChart"]').count() >= 3
            if console_errors:
                problems.append(f"JavaScript errors: {console_errors}")
        finally:
            browser.close()
    assert not problems, "\n".join(problems)
    assert {f"{n}.png" for n in PAGES} <= {p.name for p in shots.glob("*.png")}
