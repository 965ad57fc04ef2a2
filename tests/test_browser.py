"""The page `mimi serve` serves at `/`, in a real headless Chromium: it lists the tasks, sends a chosen file to
/predict and shows the top-k rows the API answers, and shows the server's message for a file that is not an image.

Chromium is driven through ChromeDriver's W3C WebDriver HTTP protocol with urllib (no selenium). Debian's packages
`chromium` and `chromium-driver` provide the binaries (`make test-browser` installs them); where either is missing
the test is skipped. MIMI_CHROMIUM and MIMI_CHROMEDRIVER point the test at other binaries.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_serve import _cli_task, _png, _post

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
CHROMIUM_FLAGS = [  # what works as root on a machine with a closed network
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def browser_binaries() -> tuple[str, str]:
    """The Chromium and ChromeDriver to use; skips the test where either is missing."""
    chromium = os.environ.get("MIMI_CHROMIUM", "/usr/bin/chromium")
    driver = os.environ.get("MIMI_CHROMEDRIVER", "/usr/bin/chromedriver")
    for path, package in ((chromium, "chromium"), (driver, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"no executable {path} (Debian package {package}; `make test-browser` installs it)")
    return chromium, driver


def wait_for(what: str, check, timeout: float = 30.0, every: float = 0.1):
    """Polls ``check()`` until it returns something truthy, at most ``timeout`` seconds; returns that."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last saw {got!r}")
        time.sleep(every)


class WebDriver:
    """The few W3C WebDriver commands the test needs, over plain HTTP to a ChromeDriver."""

    def __init__(self, url: str, chromium: str, profile: Path) -> None:
        self.url = url
        options = {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}
        caps = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        self.session = self._call("POST", "/session", {"capabilities": caps})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            value = json.loads(e.read()).get("value", {})
            raise AssertionError(f"WebDriver {method} {path}: {value.get('error')}: {value.get('message')}") from None

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.cmd("POST", "/elements", {"using": "css selector", "value": css})]

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def text(self, element: str) -> str:
        return self.cmd("GET", f"/element/{element}/text")

    def prop(self, element: str, name: str):
        return self.cmd("GET", f"/element/{element}/property/{name}")

    def type(self, element: str, text: str) -> None:
        """Sends keys; on a file input (hidden or not) ``text`` is the file's path."""
        self.cmd("POST", f"/element/{element}/value", {"text": text})

    def clear(self, element: str) -> None:
        self.cmd("POST", f"/element/{element}/clear", {})

    def js(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def quit(self) -> None:
        self.cmd("DELETE", "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(stream) -> queue.Queue:
    """The lines of ``stream``, read by a thread, so that each can be waited for with a timeout."""
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in stream], daemon=True).start()
    return q


def _signal(proc: subprocess.Popen, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after 30 s; ``group``: the whole process group the command leads (its session)."""
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM, group)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL, group)
            proc.wait(timeout=30)
    if group:  # the driver is gone; a browser it started in its group may not be
        _signal(proc, signal.SIGKILL, group)


def _rows(browser: WebDriver, k: int) -> list[dict] | None:
    """The shown `.prediction` rows (label, score text, the bar's rendered width, the page's rem in px) once
    there are ``k`` of them; None before."""
    rows = browser.js(
        """const rem = parseFloat(getComputedStyle(document.documentElement).fontSize);
        return [...document.querySelectorAll('.prediction')].map((r) => ({
          label: r.querySelector('.label').textContent,
          score: r.querySelector('.score').textContent,
          bar: r.querySelector('.bar').getBoundingClientRect().width,
          rem: rem,
        }));"""
    )
    return rows if len(rows) == k else None


def _check_rows(rows: list[dict], answer: dict, k: int) -> None:
    assert len(rows) == k, rows
    assert [r["score"][-1] for r in rows] == ["%"] * k, rows
    pcts = [float(r["score"][:-1]) for r in rows]
    assert all(0 <= p <= 100 for p in pcts) and sum(pcts) <= 100.05, pcts
    assert pcts == sorted(pcts, reverse=True), pcts
    assert rows[0]["label"] == answer["predictions"][0]["label"], (rows, answer)
    assert [r["label"] for r in rows] == [p["label"] for p in answer["predictions"]], (rows, answer)
    assert pcts == pytest.approx([100 * p["score"] for p in answer["predictions"]], abs=0.051)
    for r, p in zip(rows, pcts):  # the bar is 0.2 rem per percent, at least 0.2 rem
        want = max(1.0, p) * 0.2 * r["rem"]
        assert abs(r["bar"] - want) <= 0.05 * 0.2 * r["rem"] + 0.5, (r, want)


def test_page_predicts_and_shows_errors_in_chromium(tmp_path):
    chromium, chromedriver = browser_binaries()
    task = _cli_task(tmp_path)
    image = tmp_path / "picture.png"
    image.write_bytes(_png(1))
    other = tmp_path / "picture-2.png"
    other.write_bytes(_png(5))
    not_image = tmp_path / "notes.txt"
    not_image.write_bytes(b"these are notes, not an image\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "mimi", "serve", "--task", f"t={task}", "--port", "0", "--device", "cpu"]
    driver_log = tmp_path / "chromedriver.log"
    server = driver = browser = None
    try:
        with open(tmp_path / "server.err", "w") as err:
            server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = _lines(server.stdout)
        lines = [out.get(timeout=120), out.get(timeout=120)]
        assert " at http://127.0.0.1:" in lines[1], lines
        url = lines[1].split(" at ")[1].split()[0]
        wait_for("the server to be ready", lambda: _ready(url))

        port = _free_port()
        with open(driver_log, "w") as log:
            driver = subprocess.Popen(
                [chromedriver, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        driver_url = f"http://127.0.0.1:{port}"
        wait_for("chromedriver to listen", lambda: _ready(driver_url, "/status"))
        browser = WebDriver(driver_url, chromium, tmp_path / "chromium-profile")

        browser.get(url + "/")
        select = browser.find("#task")
        wait_for("the task list", lambda: browser.prop(select, "value") == "t")
        topk = browser.find("#topk")
        browser.clear(topk)
        browser.type(topk, "3")
        assert browser.prop(topk, "value") == "3"
        file_input = browser.find("#file")
        browser.type(file_input, str(image))
        rows = wait_for("3 prediction rows", lambda: _rows(browser, 3))
        status, answer = _post(f"{url}/predict?task=t&topk=3", image.read_bytes())
        assert status == 200, answer
        _check_rows(rows, answer, 3)
        assert browser.text(browser.find("#error")) == ""

        browser.clear(topk)  # the page sends what the box holds
        browser.type(topk, "2")
        browser.type(file_input, str(other))
        rows = wait_for("2 prediction rows", lambda: _rows(browser, 2))
        status, answer = _post(f"{url}/predict?task=t&topk=2", other.read_bytes())
        assert status == 200, answer
        _check_rows(rows, answer, 2)

        browser.type(file_input, str(not_image))
        error = browser.find("#error")
        shown = wait_for("the error message", lambda: browser.text(error))
        status, refusal = _post(f"{url}/predict?task=t&topk=2", not_image.read_bytes())
        assert status == 400 and shown == refusal["error"], (shown, refusal)
        assert "not an image file" in shown
        assert browser.find_all(".prediction") == []
    except BaseException:
        if driver_log.exists():
            print("chromedriver log (tail):\n" + driver_log.read_text()[-4000:])
        if (tmp_path / "server.err").exists():
            print("server stderr (tail):\n" + (tmp_path / "server.err").read_text()[-4000:])
        raise
    finally:
        try:
            if browser is not None:
                browser.quit()  # closes Chromium
        finally:
            if driver is not None:
                _stop(driver, group=True)
            if server is not None:
                _stop(server)
    assert server.returncode == 0, (tmp_path / "server.err").read_text()[-4000:]


def _ready(url: str, path: str = "/ready") -> bool:
    try:
        with urllib.request.urlopen(url + path, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_missing_browser_skips_with_a_reason(monkeypatch):
    monkeypatch.setenv("MIMI_CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(pytest.skip.Exception, match="no executable /nonexistent/chromium .Debian package chromium;"):
        browser_binaries()
    monkeypatch.setenv("MIMI_CHROMIUM", sys.executable)  # present, so the missing driver is the reason
    monkeypatch.setenv("MIMI_CHROMEDRIVER", "/nonexistent/chromedriver")
    with pytest.raises(
        pytest.skip.Exception, match="no executable /nonexistent/chromedriver .Debian package chromium-driver;"
    ):
        browser_binaries()
