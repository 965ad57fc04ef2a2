"""The docs site in a real headless Chromium: the home page, a reference page and the search box render, and
screenshots of them are written under ``site/`` (``make test-browser``; skipped where Chromium or MkDocs is missing).

The site is built strictly into ``site/`` and served by Python's own ``http.server`` on 127.0.0.1 (the search box
fetches its index over HTTP, which a ``file://`` page cannot do).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_browser import WebDriver, _free_port, _ready, _stop, browser_binaries, wait_for

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"


def _screenshot(browser: WebDriver, path: Path) -> None:
    path.write_bytes(base64.b64decode(browser.cmd("GET", "/screenshot")))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_docs_site_renders_and_searches_in_chromium(tmp_path):
    chromium, chromedriver = browser_binaries()
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("the [docs] extra (mkdocs) is not installed: make install")
    build = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(SITE)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stderr[-3000:]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = driver = browser = None
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(SITE)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for("the docs server", lambda: _ready(url, "/index.html"))
        driver_port = _free_port()
        with open(tmp_path / "chromedriver.log", "w") as log:
            driver = subprocess.Popen(
                [chromedriver, f"--port={driver_port}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        driver_url = f"http://127.0.0.1:{driver_port}"
        wait_for("chromedriver to listen", lambda: _ready(driver_url, "/status"))
        browser = WebDriver(driver_url, chromium, tmp_path / "chromium-profile")
        browser.cmd("POST", "/window/rect", {"width": 1280, "height": 900})

        browser.get(f"{url}/index.html")
        title = browser.text(browser.find("article h1"))
        assert title.startswith("mimi"), title
        assert len(browser.find_all("nav.md-nav a")) > 10  # the navigation rendered
        _screenshot(browser, SITE / "screenshot-home.png")

        browser.get(f"{url}/reference/api.html")
        article = browser.text(browser.find("article"))
        assert "AdapterBank" in article and "add_adapters" in article and "TrainConfig" in article
        _screenshot(browser, SITE / "screenshot-api.png")

        browser.get(f"{url}/index.html")
        browser.find("label.md-search__icon, label[for='__search']")  # the search toggle exists
        query = browser.find("input.md-search__input")
        browser.js("arguments[0].focus();", {"element-6066-11e4-a52e-4f735466cecf": query})
        browser.type(query, "budget")
        hits = wait_for("search results", lambda: browser.find_all(".md-search-result__item"), timeout=60)
        assert hits
        assert "budget" in browser.text(browser.find(".md-search-result__list")).lower()
        _screenshot(browser, SITE / "screenshot-search.png")
    finally:
        if browser is not None:
            browser.quit()
        for proc, group in ((driver, True), (server, False)):
            if proc is not None:
                _stop(proc, group=group)
