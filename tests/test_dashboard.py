"""The dashboard in a real headless browser (Debian's chromium driven by PyPI playwright): the page loads from
the worker with no failed request and no console error, shows a task with its versions, its live figures (execution
time and request -> result) and its last 15 minutes move after requests are sent, a task without an oracle says so,
and a suspended task is marked, in the table and on its chart."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.test_web import Served, call, execute, suspend_task
from tests.test_web import served as served  # the module's own worker, with HTTP on

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        # Loud on purpose: .ci/run installs it (Debian's chromium); only a machine without it gets here.
        pytest.skip(f"NO BROWSER TEST: {CHROMIUM} is missing (apt-get install chromium)")
    assert shutil.which(CHROMIUM)
    return CHROMIUM


def test_the_page_shows_a_task_and_follows_new_requests(served: Served, chromium: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert execute(served, {"task_id": "spam", "input": {"text": "warm up"}})[0] == 200
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            failed: list[str] = []  # requests answered 4xx/5xx, console errors, uncaught exceptions
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.on("console", lambda m: failed.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: failed.append(f"page error: {e}"))
            page.goto(served.url + "/")
            row = page.locator('tr[data-task="listed"]')
            row.wait_for(timeout=15_000)
            cells = row.locator("td").all_inner_texts()
            assert cells[:4] == ["listed", "v1", "v2 @ 25%", "v1 v2"], cells
            page.wait_for_function("document.getElementById('health').textContent === 'ready'", timeout=15_000)

            executed = int(page.locator("#worker").inner_text().split(" · ")[-1].split()[0])
            for i in range(5):
                assert execute(served, {"task_id": "metered", "input": {"text": f"FREE {i}"}})[0] == 200
            # The page polls every second: the worker's count and metered's rate come from the new requests.
            page.wait_for_function(
                "n => Number(document.getElementById('worker').textContent.split(' · ').pop().split(' ')[0]) >= n",
                arg=executed + 5, timeout=15_000)
            # The table is drawn anew on every poll: look the cell up each time.
            page.wait_for_function(
                "Number(document.querySelector('tr[data-task=\"metered\"] td.rate')?.textContent) > 0",
                timeout=15_000)

            # Beside the execution time, what a client waited: request -> result, milliseconds at least.
            waits = page.locator('tr[data-task="metered"] td.wait').all_inner_texts()
            assert len(waits) == 3 and all(w.endswith(" ms") for w in waits), waits
            assert float(waits[2].split()[0]) >= float(waits[0].split()[0]) > 0, waits
            assert page.locator('tr[data-task="slow"] td').last.inner_text() == "no oracle"

            page.select_option("#chart-task", "metered")
            page.wait_for_function("Number(document.getElementById('chart').dataset.days || 0) >= 1",
                                   timeout=30_000)
            page.wait_for_function("Number(document.getElementById('live-chart').dataset.points || 0) >= 1",
                                   timeout=30_000)
            assert page.locator("#live-note").inner_text().startswith("metered: this worker's results")
            assert page.locator("#chart-name").inner_text() == "metered"
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            # The icon a browser asks for whatever the page says: served, no 404 on any page load.
            icon = page.request.get(served.url + "/favicon.ico")
            assert icon.status == 200 and icon.headers["content-type"] == "image/x-icon"
            assert icon.body()[:4] == b"\x00\x00\x01\x00"
            assert failed == [], failed
        finally:
            browser.close()
    assert call(served.url + "/static/nothing.js")[0] == 404


def test_a_suspended_task_is_marked_with_until_when_and_why(served: Served, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    suspension = asyncio.run(suspend_task(served.settings, "stuck"))
    assert suspension.until is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(served.url + "/")
            badge = page.locator('tr.suspended[data-task="stuck"] .badge.suspended')
            badge.wait_for(timeout=15_000)
            assert badge.inner_text() == f"suspended until {suspension.until:%H:%M:%S} UTC"
            assert badge.get_attribute("title") == suspension.reason
            assert page.locator('tr[data-task="listed"]').get_attribute("class") in (None, "")
            page.select_option("#chart-task", "stuck")  # its chart says so too
            chart_badge = page.locator("#live-suspended")
            chart_badge.wait_for(state="visible", timeout=15_000)
            assert chart_badge.inner_text() == f"suspended until {suspension.until:%H:%M:%S} UTC"
        finally:
            browser.close()
