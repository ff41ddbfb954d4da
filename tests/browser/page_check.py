#!/usr/bin/env python3
"""Drives headless Chromium over the DevTools protocol (on a pipe: no port, no extra package).

    page_check.py CHROMIUM URL --expect TEXT... [--then TEXT] [--screenshot PNG] [--width W --height H]

Opens URL, waits until the page's text contains every --expect, prints READY, then (with --then)
waits until it also contains that text (the caller publishes it after READY). Exits 0 when all
appeared, 1 on timeout (printing the page's text), 2 when Chromium cannot start.
"""
import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

TIMEOUT = 30.0


class Browser:
    def __init__(self, chromium, width, height):
        self.profile = tempfile.TemporaryDirectory(
            prefix="sensorhub-chromium-", ignore_cleanup_errors=True)
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def fds():
            # Chromium reads commands on fd 3 and writes replies on fd 4. dup2 onto the same
            # number keeps close-on-exec, hence the explicit set_inheritable.
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
             f"--window-size={width},{height}", f"--user-data-dir={self.profile.name}",
             "--remote-debugging-pipe", "about:blank"],
            preexec_fn=fds, close_fds=False, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.next_id = 0
        self.buffer = b""
        self.session = None

    def send(self, method, params=None, session=True):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise RuntimeError(f"{method}: no answer")

    def open(self, url):
        target = self.send("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True}, session=False)["sessionId"]

    def text(self):
        result = self.send("Runtime.evaluate",
                           {"expression": "document.body ? document.body.innerText : ''",
                            "returnByValue": True})
        return result.get("result", {}).get("value", "")

    def wait_for(self, texts):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            page = self.text()
            if all(t in page for t in texts):
                return True
            time.sleep(0.1)
        print(f"TIMEOUT waiting for {texts!r}; the page says:\n{self.text()}", flush=True)
        return False

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        # Chromium's own helper processes share its session: end them all.
        try:
            self.send("Browser.close", session=False)
            self.proc.wait(timeout=5)
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.profile.cleanup()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("chromium")
    parser.add_argument("url")
    parser.add_argument("--expect", nargs="+", default=[])
    parser.add_argument("--then")
    parser.add_argument("--screenshot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args()
    try:
        browser = Browser(args.chromium, args.width, args.height)
    except OSError as e:
        print(f"cannot start chromium: {e}", flush=True)
        return 2
    try:
        browser.open(args.url)
        if not browser.wait_for(args.expect):
            return 1
        print("READY", flush=True)
        if args.then and not browser.wait_for([args.then]):
            return 1
        if args.screenshot:
            time.sleep(1.0)  # let the last chart transition settle for the picture
            browser.screenshot(args.screenshot)
        print("SEEN", flush=True)
        return 0
    finally:
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
