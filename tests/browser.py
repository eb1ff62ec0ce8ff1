"""A real headless Chromium for tests, driven through the Chrome DevTools protocol over a pipe (no websocket, no
driver, no download): the distribution's `chromium` package is all it needs.

    with HeadlessChromium.start(tmp_path) as browser:
        page = browser.open(path)            # waits for the load event (every image loaded or failed)
        page.evaluate("document.title")
        page.errors                          # console errors, uncaught exceptions, failed resource loads

Chromium reads protocol messages from its fd 3 and writes to its fd 4, each a JSON object ended by a NUL byte.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The Debian package's wrapper script (/usr/bin/chromium) and the binary it starts.
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "/usr/lib/chromium/chromium")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
    "--remote-debugging-pipe",
)


def find_chromium() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Page:
    browser: HeadlessChromium
    session: str
    errors: list[str] = field(default_factory=list)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable results only)."""
        reply = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                       "awaitPromise": True}, self.session)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")


class HeadlessChromium:
    def __init__(self, process: subprocess.Popen, commands: int, replies: int):
        self.process, self.commands, self.replies = process, commands, replies
        self.buffer = b""
        self.next_id = 0
        self.pages: dict[str, Page] = {}

    @classmethod
    def start(cls, profile: Path) -> HeadlessChromium:
        executable = find_chromium()
        if executable is None:
            raise FileNotFoundError("no chromium executable")
        commands_read, commands_write = os.pipe()
        replies_read, replies_write = os.pipe()
        # Above fd 10, so that the child's dup2 onto 3 and 4 cannot overwrite one of them.
        child_read = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)
        child_write = fcntl.fcntl(replies_write, fcntl.F_DUPFD, 10)
        for fd in (commands_read, replies_write):
            os.close(fd)

        def plumb() -> None:
            os.dup2(child_read, 3)
            os.dup2(child_write, 4)

        process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"], preexec_fn=plumb, pass_fds=(3, 4),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(child_read)
        os.close(child_write)
        return cls(process, commands_write, replies_read)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        return self.next_id

    def receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.replies], [], [], remaining)[0]:
                raise TimeoutError(f"no message from chromium within {timeout} s")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise ConnectionError(f"chromium closed the pipe (exit code {self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        data = json.loads(message)
        self._record(data)
        return data

    def _record(self, message: dict) -> None:
        """Keep what the page reports as an error: console.error, uncaught exceptions, failed loads."""
        page = self.pages.get(message.get("sessionId", ""))
        method, params = message.get("method"), message.get("params", {})
        if page is None or method is None:
            return
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            page.errors.append("console: " + " ".join(str(arg.get("value", arg.get("description")))
                                                      for arg in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            page.errors.append(f"exception: {params['exceptionDetails']}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            page.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        number = self.send(method, params, session)
        while True:
            message = self.receive(timeout)
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_for(self, method: str, session: str, timeout: float = 30) -> dict:
        while True:
            message = self.receive(timeout)
            if message.get("method") == method and message.get("sessionId") == session:
                return message.get("params", {})

    def open(self, path: Path, timeout: float = 60) -> Page:
        """Load a file in a new tab and wait for its load event."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = self.pages[session] = Page(self, session)
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
        self.wait_for("Page.loadEventFired", session, timeout)
        return page
