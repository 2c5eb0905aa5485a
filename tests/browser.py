"""A real headless Chromium for the report tests, driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: JSON messages ending in a NUL byte, the browser reading fd 3 and writing fd 4), so
no driver or websocket library is needed. Chromium comes from Debian's packages; `install_chromium()` installs it
when it can, and otherwise says why not."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT = 120  # seconds without a word from the browser


def install_chromium() -> str | None:
    """Installs Chromium from the system packages when it is absent; returns why it is missing, or None."""
    if CHROMIUM.is_file():
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return f"{CHROMIUM} is absent and cannot be installed here (needs apt-get as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            return f"{CHROMIUM} is absent and `{' '.join(command)}` failed: {done.stderr.strip()[-300:]}"
    return None if CHROMIUM.is_file() else f"`apt-get install chromium` did not install {CHROMIUM}"


class Browser:
    def __init__(self) -> None:
        to_browser, from_browser = os.pipe(), os.pipe()
        # Far from 3 and 4, so that placing them there in the child cannot overwrite one with the other.
        read_end = fcntl.fcntl(to_browser[0], fcntl.F_DUPFD_CLOEXEC, 100)
        write_end = fcntl.fcntl(from_browser[1], fcntl.F_DUPFD_CLOEXEC, 100)
        os.close(to_browser[0])
        os.close(from_browser[1])

        def place_fds() -> None:  # in the child: dup2 leaves 3 and 4 open across exec
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.profile = tempfile.mkdtemp(prefix="prospect-chromium-")
        self.process = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            close_fds=False,  # the pipes above are close-on-exec; only 3 and 4 are passed on
            preexec_fn=place_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(read_end)
        os.close(write_end)
        self.commands = os.fdopen(to_browser[1], "wb")
        self.replies, self.buffer = from_browser[0], bytearray()
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.commands.write(json.dumps(message).encode() + b"\0")
        self.commands.flush()
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def receive(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            if not select.select([self.replies], [], [], TIMEOUT)[0]:
                raise RuntimeError(f"Chromium said nothing for {TIMEOUT} s")
            chunk = os.read(self.replies, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        message, _, rest = self.buffer.partition(b"\0")
        self.buffer = bytearray(rest)
        return json.loads(message)

    def wait_for(self, method: str, session: str) -> None:
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method and event.get("sessionId") == session:
                    del self.events[i]
                    return
            self.events.append(self.receive())

    def open(self, path: Path, expression: str) -> Any:
        """Loads `path` in a new tab, waits for its load event (every image decoded or failed) and returns
        the value of the JavaScript `expression`, which must return a JSON string."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session)
        self.send("Page.navigate", session, url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired", session)
        result = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True)
        self.send("Target.closeTarget", targetId=target)
        return json.loads(result["result"]["value"])

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):  # it may close the pipe before it answers
            self.send("Browser.close")
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.commands.close()
        os.close(self.replies)
        shutil.rmtree(self.profile, ignore_errors=True)
