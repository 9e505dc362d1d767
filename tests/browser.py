"""Open an HTML page in a real headless Chromium and read back what it drew.

The report embeds its plots as PNGs; "the heatmap renders" means a browser decoded each one and
painted it. A copy of the page gets a small script that, once the page has loaded, draws every
image onto a canvas and records its decoded size and how many distinct colours it painted;
Chromium's ``--dump-dom`` prints the page after that script ran, and the test reads the record
back. The page itself is not changed.

CI installs Debian's ``chromium`` and sets BRANCHOUT_REQUIRE_BROWSER=1 (see .ci/run): there a
missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

MARK = "branchout-render-check"

# Runs after every image has loaded (the load event); each image is drawn onto a canvas at its
# natural size and its pixels counted. Data-URL images do not taint the canvas.
PROBE = """
<script>
window.addEventListener("load", () => {
  const out = [];
  for (const img of document.images) {
    const row = {alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
                 colours: 0, opaque: 0, non_white: 0};
    if (img.complete && img.naturalWidth > 0) {
      const canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      const seen = new Set();
      let opaque = 0, nonWhite = 0;
      for (let i = 0; i < px.length; i += 4) {
        if (px[i + 3] === 0) continue;  // never painted (a truncated image leaves rows empty)
        opaque++;
        seen.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
        if (px[i] < 240 || px[i + 1] < 240 || px[i + 2] < 240) nonWhite++;
      }
      row.colours = seen.size;
      row.opaque = opaque / (px.length / 4);
      row.non_white = nonWhite / (px.length / 4);
    }
    out.push(row);
  }
  const pre = document.createElement("pre");
  pre.id = "@MARK@";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
""".replace("@MARK@", MARK)


def chromium() -> str:
    """The browser's program, or skip (fail where CI requires it)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    message = "no Chromium on this machine (apt-get install chromium)"
    if os.environ.get("BRANCHOUT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message}, and BRANCHOUT_REQUIRE_BROWSER=1", pytrace=False)
    pytest.skip(message)


def rendered_images(page: Path, timeout: float = 60) -> list[dict]:
    """Every ``<img>`` of ``page`` as Chromium decoded and painted it: alt, complete, natural width
    and height, distinct colours, and the shares of pixels painted at all and painted non-white."""
    browser = chromium()
    work = Path(tempfile.mkdtemp(prefix="branchout-browser-"))
    try:
        text = page.read_text(encoding="utf-8")
        copy = work / page.name
        copy.write_text(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE,
                        encoding="utf-8")
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox; the page is our own
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={work / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
             copy.as_uri()],
            capture_output=True, text=True, timeout=timeout)
        dom = done.stdout
        start = dom.find(f'<pre id="{MARK}">')
        assert start >= 0, f"Chromium printed no render record (exit {done.returncode}): {done.stderr[-2000:]}"
        body = dom[start + len(f'<pre id="{MARK}">'):dom.index("</pre>", start)]
        return json.loads(html.unescape(body))
    finally:
        shutil.rmtree(work, ignore_errors=True)
