"""The HTML report opened in headless Chromium: every plot image decodes and the tables are there.

Chromium comes from Debian (scripts/bootstrap.sh installs it). Without the binary the test skips with the reason,
except under CI (CI=true), where a missing browser is a failure: the check must not silently stop running.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tieremu.runner.experiment import run_experiment
from tieremu.runner.spec import load_experiment

REPO = Path(__file__).resolve().parents[1]
TIERS = REPO / "configs" / "tiers" / "cxl-expander.yaml"
# Runs in the page after load: marks each image with the width it decoded to (0: broken), then the body.
MARKER = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
          "{ img.setAttribute('data-natural-width', String(img.naturalWidth)); } "
          "document.body.setAttribute('data-checked', String(document.images.length)); });</script>")


@pytest.fixture(scope="module")
def browser() -> str:
    return _chromium()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("headless Chromium is missing under CI: scripts/bootstrap.sh installs the Debian package chromium")
    pytest.skip("headless Chromium is not installed (Debian package chromium; scripts/bootstrap.sh installs it)")


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.captions: list[str] = []
        self.body: dict[str, str | None] = {}
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "body":
            self.body = dict(attrs)
        elif tag == "caption":
            self._in_caption = True
            self.captions.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "caption":
            self._in_caption = False

    def handle_data(self, data: str) -> None:
        if self._in_caption:
            self.captions[-1] += data


def _rendered(browser: str, page: Path, tmp_path: Path) -> _Dom:
    """The DOM as Chromium holds it after load, with the marker script's attributes."""
    checked = tmp_path / f"checked-{page.name}"
    checked.write_text(page.read_text().replace("</body>", MARKER + "</body>"))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    dom = _Dom()
    dom.feed(out.stdout)
    return dom


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("html")
    spec = root / "e.yaml"
    spec.write_text(f"name: htmlcheck\ntiers: {TIERS}\njobs:\n  - kind: synthetic\n    policies: [lru, lfu]\n"
                    "    tokens: 16\nsweep:\n  fast_capacity_mib: [256, 1024]\n")
    result = run_experiment(load_experiment(spec), root / "out")
    assert result.report is not None
    return result.report


def test_every_plot_decodes_and_the_tables_are_there(browser: str, report_page: Path, tmp_path: Path) -> None:
    dom = _rendered(browser, report_page, tmp_path)
    figures = report_page.read_text().count("<figure")
    assert figures >= 5 and dom.body.get("data-checked") == str(figures)
    widths = [int(img.get("data-natural-width") or 0) for img in dom.images]
    assert len(widths) == figures and all(w >= 400 for w in widths), widths
    assert "synthetic: summary per policy" in dom.captions and "synthetic: other figures" in dom.captions
    pngs = sorted(p.name for p in (report_page.parent / "plots").glob("*.png"))
    assert len(pngs) == figures  # the same plots as files beside the page


def test_the_check_sees_a_broken_image(browser: str, report_page: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    html = report_page.read_text()
    first = re.search(r'src="data:image/png;base64,([^"]{200})', html)
    assert first is not None
    broken.write_text(html.replace(first.group(1), "A" * 200, 1))  # corrupt the first plot's header
    widths = [int(img.get("data-natural-width") or 0) for img in _rendered(browser, broken, tmp_path).images]
    assert widths[0] == 0 and all(w >= 400 for w in widths[1:])
