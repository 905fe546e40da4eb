"""A small headless Chromium driver over the DevTools protocol, for tests where a person clicks
through Odoo and the sandbox's sign-in page (Odoo's own tour runner cannot follow a page to
another origin and back)."""

import base64
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import requests
import websocket
from cryptography import x509
from cryptography.hazmat.primitives import serialization


def spki_hash(certificate_file):
    """What --ignore-certificate-errors-spki-list wants: trust exactly this server key."""
    cert = x509.load_pem_x509_certificate(Path(certificate_file).read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _unlimited_address_space():
    # Odoo caps the server's address space (limit_memory_hard); Chromium reserves far more than it
    # uses and dies under that cap, as Odoo's own ChromeBrowser knows.
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def chromium_executable():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, trusted_certificate=None, screenshots=None, width=1366, height=900):
        self.profile = tempfile.mkdtemp(prefix="m365-chromium-")
        self.screenshots = Path(screenshots) if screenshots else None
        arguments = [
            chromium_executable(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "--disable-features=Translate,MediaRouter",
            "about:blank",
        ]
        if trusted_certificate:
            arguments.insert(1, f"--ignore-certificate-errors-spki-list={spki_hash(trusted_certificate)}")
        self.process = subprocess.Popen(
            arguments, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_unlimited_address_space
        )
        port = self._devtools_port()
        page = next(
            t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json() if t["type"] == "page"
        )
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self._id = 0
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _devtools_port(self):
        deadline = time.monotonic() + 30
        output = []
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            output.append(line)
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                return int(match[1])
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError("Chromium did not start its DevTools endpoint:\n" + "".join(output[-20:]))

    def call(self, method, **params):
        self._id += 1
        request_id = self._id
        self.socket.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def close(self):
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    # what a test does ----------------------------------------------------------------------------

    def open(self, url):
        self.call("Page.navigate", url=url)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    @property
    def url(self):
        return self.evaluate("location.href")

    def wait(self, condition, timeout=60, what=None):
        """Wait until the JavaScript `condition` is truthy; its value."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(condition)
                if value:
                    return value
            except RuntimeError as exc:  # page navigating
                last_error = exc
            time.sleep(0.2)
        self.screenshot("timeout")
        raise AssertionError(f"timed out waiting for {what or condition} (at {self._safe_url()}; {last_error})")

    def _safe_url(self):
        try:
            return self.url
        except Exception:  # noqa: BLE001 - only for the failure message
            return "?"

    def wait_for(self, selector, text=None, timeout=60):
        js_selector = json.dumps(selector)
        if text is None:
            condition = f"!!document.querySelector({js_selector})"
        else:
            condition = (
                f"[...document.querySelectorAll({js_selector})].some("
                f"e => e.offsetParent !== null && e.textContent.includes({json.dumps(text)}))"
            )
        return self.wait(condition, timeout, what=f"{selector} {text or ''}".strip())

    def click(self, selector, text=None, timeout=60):
        """Click the first visible element matching `selector` (and containing `text`)."""
        self.wait_for(selector, text, timeout)
        found = self.evaluate(f"""(() => {{
            const candidates = [...document.querySelectorAll({json.dumps(selector)})]
                .filter(e => e.offsetParent !== null || e.type === 'radio')
                .filter(e => {json.dumps(text)} === null || e.textContent.includes({json.dumps(text)}));
            if (!candidates.length) return false;
            candidates[0].scrollIntoView({{block: 'center'}});
            candidates[0].click();
            return true;
        }})()""")
        assert found, f"nothing to click for {selector} {text or ''}"

    def fill(self, selector, value):
        self.wait_for(selector)
        self.evaluate(f"""(() => {{
            const input = document.querySelector({json.dumps(selector)});
            input.focus();
            input.value = {json.dumps(value)};
            input.dispatchEvent(new Event('input', {{bubbles: true}}));
            input.dispatchEvent(new Event('change', {{bubbles: true}}));
        }})()""")

    def text(self, selector):
        return self.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''")

    def screenshot(self, name):
        if not self.screenshots:
            return None
        self.screenshots.mkdir(parents=True, exist_ok=True)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path = self.screenshots / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path


def screenshot_folder():
    """M365_SCREENSHOTS names a folder to keep the screenshots in (the README's come from there)."""
    return os.environ.get("M365_SCREENSHOTS") or tempfile.mkdtemp(prefix="m365-screenshots-")
