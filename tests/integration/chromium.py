"""Headless Chromium for the viewer's tests, driven over the DevTools protocol (a websocket,
no driver): start it, load a page, evaluate JavaScript, wait for a condition, screenshot.

The browser is Debian's ``chromium`` (or ``$CXRTREK_CHROMIUM``); :func:`find_chromium` says
where it is or why there is none.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio",
         "--hide-scrollbars", "--window-size=1400,1000")


def find_chromium() -> tuple[str | None, str]:
    """The browser's path, or None and the reason."""
    override = os.environ.get("CXRTREK_CHROMIUM")
    if override:
        if Path(override).is_file():
            return override, ""
        return None, f"$CXRTREK_CHROMIUM={override} is not a file"
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found, ""
    return None, ("no Chromium found (looked for " + ", ".join(CANDIDATES) + "); install "
                  "Debian's chromium package (apt-get install -y chromium)")


class JavaScriptError(AssertionError):
    """A script evaluated in the page threw."""


class Browser:
    """One headless Chromium with one page; every wait is bounded."""

    def __init__(self, executable: str, profile: Path, *, start_timeout_s: float = 30.0) -> None:
        self.profile = profile
        profile.mkdir(parents=True, exist_ok=True)
        self.log = (profile.parent / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "about:blank"], stdout=self.log, stderr=subprocess.STDOUT)
        self.errors: list[str] = []
        self._next_id = 0
        self.ws: ClientConnection | None = None
        self._stack = ExitStack()
        try:
            self.ws = self._stack.enter_context(connect(
                self._page_websocket(start_timeout_s), max_size=64 * 1024 * 1024,
                open_timeout=10))
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _page_websocket(self, timeout_s: float) -> str:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} while "
                                   "starting; see chromium.log")
            if port_file.is_file():
                lines = port_file.read_text().split()
                if lines:
                    try:
                        targets = httpx.get(f"http://127.0.0.1:{lines[0]}/json/list",
                                            timeout=2).json()
                    except (httpx.HTTPError, ValueError):
                        targets = []
                    pages = [t for t in targets if t.get("type") == "page"]
                    if pages:
                        return str(pages[0]["webSocketDebuggerUrl"])
            if time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port in {timeout_s} s")
            time.sleep(0.05)

    def call(self, method: str, timeout_s: float = 20.0, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events meanwhile are looked at for errors)."""
        assert self.ws is not None
        self._next_id += 1
        ident = self._next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method} in {timeout_s} s")
            message = json.loads(self.ws.recv(timeout=left))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self._event(message)

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(str(details.get("exception", {}).get("description")
                                   or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                        for a in params.get("args", [])))

    def eval(self, expression: str, *, await_promise: bool = False) -> Any:
        """The value of a JavaScript expression in the page (JSON-like values)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=await_promise)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise JavaScriptError(str(details.get("exception", {}).get("description")
                                      or details.get("text")))
        return result.get("result", {}).get("value")

    def open(self, url: str, timeout_s: float = 20.0) -> None:
        """Load ``url`` afresh (by way of a blank page, so that a change of the fragment
        alone reloads too) and wait until the document is complete."""
        self.call("Page.navigate", url="about:blank")
        self.wait_for("location.href === 'about:blank' && document.readyState === 'complete'",
                      timeout_s, "a blank page")
        self.call("Page.navigate", url=url)
        self.wait_for("location.href !== 'about:blank' && document.readyState === 'complete'",
                      timeout_s, f"{url} to load")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> None:
        """Poll ``expression`` until it is truthy (in JavaScript's sense); AssertionError at
        the deadline, with the page's script errors, if any."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.eval(f"!!({expression})") is True:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout_s} s for {what}; page errors: "
                                     f"{self.errors or 'none'}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with suppress(OSError):
            self._stack.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
