"""report.html in a real browser: headless Chromium (Debian's) driven by Playwright.

The report must render with no console error and no failed request, every plot must be an
image that decoded, every table must have rows, a table must sort by the column whose header
is clicked, and it must work offline: the page is opened from a file with every other request
refused, so anything it fetched would fail here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# one xdist worker runs all of group "short_demo": the tests share one short demo run
pytestmark = pytest.mark.xdist_group("short_demo")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(short_demo) -> Path:
    path = short_demo.run / "eval" / "report.html"
    assert path.is_file()
    return path


def _playwright():
    if CHROMIUM is None:
        if os.environ.get("VLP_CI"):
            pytest.fail("the browser test must run in CI: chromium not installed (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def _numbers(texts: list[str]) -> list[float]:
    return [float(t) for t in texts if t.replace(".", "", 1).lstrip("-").isdigit()]


def test_the_report_renders_offline_with_every_plot_and_sortable_tables(report):
    with _playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-background-networking"])
        page = browser.new_page()
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"failed request {r.url}"))

        def offline(route):  # the report is self-contained: any request but the file itself is a defect
            requests.append(route.request.url)
            route.abort()

        page.route(lambda url: not url.startswith("file:"), offline)
        page.goto(report.as_uri(), wait_until="load")
        assert errors == [] and requests == [], (errors, requests)
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        assert images and all(done and width > 0 for done, width in images), images
        rows = page.eval_on_selector_all("table", "els => els.map(t => t.querySelectorAll('tbody tr').length)")
        assert rows and all(n >= 1 for n in rows), rows
        text = page.inner_text("body")
        for task in ("shape_zeroshot", "colour_zeroshot", "retrieval"):
            assert task in text
        # the first table whose last column holds two or more numbers sorts by it, and back
        tables = page.locator("table")
        table = next(tables.nth(i) for i in range(tables.count())
                     if len(_numbers(tables.nth(i).locator("tbody tr td:last-child").all_inner_texts())) > 1)
        cells = table.locator("tbody tr td:last-child")
        before = cells.all_inner_texts()
        table.locator("thead th").last.click()
        ascending = cells.all_inner_texts()
        table.locator("thead th").last.click()
        descending = cells.all_inner_texts()
        assert sorted(before) == sorted(ascending) == sorted(descending)
        assert _numbers(ascending) == sorted(_numbers(before))
        assert _numbers(descending) == sorted(_numbers(before))[::-1]
        browser.close()
