"""report.html and compare.html in a real browser (Debian's Chromium driven by Playwright):
every figure decodes and has a size, nothing is fetched from anywhere, and the console stays
clean. The pages come from real runs' reports committed under experiments/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bulwark.contract.compare import write
from bulwark.workers.client.sweep import collect
from bulwark.workers.engine.html_report import render
from tests.test_api_docs import CHROMIUM, CHROMIUM_ARGS

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "experiments" / "mnist-co" / "runs"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def _look(path: Path, shot: Path) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        sizes = page.eval_on_selector_all(
            "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        tables = page.eval_on_selector_all(  # a table wider than its box hides columns
            "table", "ts => ts.map(t => [t.getBoundingClientRect().right, innerWidth])")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    return {"errors": errors, "sizes": sizes, "tables": tables,
            "remote": [u for u in requests if not u.startswith(("file:", "data:"))]}


def test_report_html_renders_its_figures_in_chromium(tmp_path):
    report = json.loads((RUNS / "n-aaer_seed=0" / "report.json").read_text())
    page = tmp_path / "report.html"
    page.write_text(render(report))
    seen = _look(page, tmp_path / "report.png")
    assert seen["errors"] == [] and seen["remote"] == []
    assert len(seen["sizes"]) == 3, "training, monitor, method traces (AAER)"
    assert all(ok and w > 300 and h > 100 for ok, w, h in seen["sizes"])
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_compare_html_renders_its_figures_in_chromium(tmp_path):
    _, html = write(collect(RUNS), tmp_path, title="mnist-co")
    seen = _look(html, tmp_path / "compare.png")
    assert seen["errors"] == [] and seen["remote"] == []
    assert len(seen["sizes"]) == 3 and all(ok and w > 300 for ok, w, _ in seen["sizes"])
    assert seen["tables"] and all(right <= width for right, width in seen["tables"]), \
        f"every column in the window: {seen['tables']}"
