"""Refreshes the README's picture of the dashboard: runs `loopai dev` (embedded broker, sample tasks, traffic, a
canary), opens its dashboard in headless Chromium once the chart has a few minutes of points, and writes
docs/dashboard.png."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# Chromium is Debian's, driven by playwright, as tests/test_dashboard.py does. Run as
#     python -m devtools.screenshot [--minutes 3] [--rate 30] [--task spam-filter] [--out docs/dashboard.png]
# Then `loopai dev` is stopped as Ctrl-C stops it; its own output goes to stderr.

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="traffic before the picture (the chart's width "
                                                                    "is 15 minutes)")
    parser.add_argument("--rate", type=float, default=30.0, help="requests per second")
    parser.add_argument("--task", default="spam-filter", help="the task the charts show")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: sudo apt-get install -y chromium", file=sys.stderr)
        return 1
    seconds = args.minutes * 60
    dev = subprocess.Popen([sys.executable, "-m", "app.cli", "dev", "--duration", str(int(seconds + 120)),
                            "--rate", str(args.rate)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = _dashboard_url(dev)
        started = time.monotonic()
        _shoot(url, args.task, args.out, started + seconds)
        print(f"wrote {args.out}", file=sys.stderr)
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGINT)
            try:
                dev.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
    return 0


def _dashboard_url(dev: subprocess.Popen[str]) -> str:
    """The URL `loopai dev` prints, once its worker serves; its output goes on to stderr from then on."""
    assert dev.stdout is not None
    url = None
    for line in dev.stdout:
        sys.stderr.write(line)
        if line.startswith("dashboard on "):
            url = line.split()[-1]
        if url is not None and line.startswith("worker serving"):
            threading.Thread(target=_echo, args=(dev.stdout,), daemon=True).start()
            return url
    raise SystemExit(f"loopai dev ended (exit {dev.wait()}) before it served a dashboard")


def _echo(stream: object) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sys.stderr.write(line)


def _shoot(url: str, task: str, out: Path, not_before: float) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url, timeout=120_000)
            page.locator(f'tr[data-task="{task}"]').wait_for(timeout=120_000)
            page.select_option("#chart-task", task)
            time.sleep(max(0.0, not_before - time.monotonic()))  # let the chart fill: this is the picture's content
            page.wait_for_function("Number(document.getElementById('chart').dataset.days || 0) >= 1",
                                   timeout=60_000)
            page.wait_for_timeout(1500)  # one more poll, so both charts and the table are of one moment
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
