"""A real headless Chromium for the report tests: find it (Debian's `chromium` package, installed
here with apt-get where missing and allowed), load a page, and read back what the browser saw:
each <img>'s naturalWidth, the page's sections and any script or console error."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--hide-scrollbars", "--allow-file-access-from-files"]

# Runs first in the page's <head>: records errors and console.error calls, and after the load
# event writes the image sizes and section ids into a <pre> that --dump-dom prints.
PROBE = """<script>
window.__vzErrors = [];
window.addEventListener('error', function (e) {
  window.__vzErrors.push('error: ' + (e.message || (e.target && (e.target.src || e.target.href)) || 'unknown'));
}, true);
(function () { var ce = console.error; console.error = function () {
  window.__vzErrors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  ce.apply(console, arguments); }; })();
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {src: i.getAttribute('src'), naturalWidth: i.naturalWidth, complete: i.complete}; });
  var ids = Array.prototype.map.call(document.querySelectorAll('section'), function (s) { return s.id; });
  var pre = document.createElement('pre'); pre.id = 'vz-probe';
  pre.textContent = JSON.stringify({images: imgs, sections: ids, errors: window.__vzErrors});
  document.body.appendChild(pre);
});
</script>"""


def find_chromium() -> str | None:
    return next((shutil.which(n) for n in NAMES if shutil.which(n)), None)


def require_chromium() -> str:
    """The browser's path; installs Debian's chromium where it is missing and this process may
    (root, apt-get present); otherwise the test is skipped, saying why."""
    path = find_chromium()
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no headless browser: install Debian's chromium package (apt-get install -y chromium); "
                    "this process cannot (not root or no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=env,
                       capture_output=True, timeout=900, check=False)
        if not find_chromium():
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300, check=False)
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=env,
                           capture_output=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"no headless browser and installing chromium failed: {err}")
    path = find_chromium()
    if not path:
        pytest.skip("no headless browser: apt-get install chromium did not provide one (no package index?)")
    return path


def _run(browser: str, args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def inspect_page(browser: str, page: Path, profile: Path) -> dict:
    """Load ``page`` (with the probe injected, in a copy beside it so relative images resolve)
    and return {"images": [...], "sections": [...], "errors": [...]}."""
    probe_page = page.with_name(".probe-" + page.name)
    text = page.read_text()
    probe_page.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    try:
        done = _run(browser, ["--virtual-time-budget=15000", "--dump-dom", probe_page.resolve().as_uri()], profile)
    finally:
        probe_page.unlink()
    m = re.search(r'<pre id="vz-probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert m, f"the page did not finish loading in the browser (rc {done.returncode}): {done.stderr[-2000:]}"
    found = json.loads(html.unescape(m.group(1)))
    found["errors"] += [ln for ln in done.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    return found


def screenshot(browser: str, page: Path, out: Path, profile: Path, width: int = 1200, height: int = 3000) -> Path:
    """A PNG of ``page`` as the browser draws it."""
    done = _run(browser, [f"--window-size={width},{height}", f"--screenshot={out}", page.resolve().as_uri()], profile)
    assert out.is_file() and out.stat().st_size > 0, done.stderr[-2000:]
    return out
