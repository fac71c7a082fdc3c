"""Benchmark: the web console in headless Chromium, each number beside a floor from the same run.

Usage: ``.venv/bin/python bench/console.py [--sandboxes 1000] [--keys 100] [--churn 20]``

Starts Ray + Serve with two rock-serve apps (auth disabled, so the page needs no login):
``/fake`` on the in-memory fake runtime (room for the big table without 1,000 processes) and
``/`` on the local runtime (a real shell for the terminal). Drives Debian's Chromium through
Playwright and prints, p50/p99 in ms where repeated:

- page load with N sandboxes listed: time to first render (every row received, the first
  200 in the DOM; "Show more" adds pages) and to
  interactive (a search keystroke has re-rendered the table), against the same page with an
  empty table (floor);
- live table updates per second: sandboxes created and deleted through the API for a few
  seconds while the page is open; rows changed as the page received them, dropped events
  (gaps in the feed's sequence numbers) and the ratio to the changes made (floor: 1.0);
- terminal keystroke echo: a key typed into xterm.js until its echo is drawn back, against
  the same echo over a bare WebSocket client in Python (floor).

Never a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _harness as harness

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _fill(url: str, n: int) -> list[str]:
    import httpx

    def one(i: int) -> str:
        body = {"owner": f"bench-{i % 17}", "labels": {"i": str(i)}}
        with httpx.Client(base_url=url, timeout=60) as api:
            return str(api.post("/v1/sandboxes", json=body).json()["id"])

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(n)))


def _load(page: Any, ui: str, rows: int) -> tuple[float, float]:
    """(first render, interactive) in ms from navigation start."""
    page.goto("about:blank")
    page.goto(ui + "#/sandboxes")
    # Every row received and the first page of them (at most 200) in the DOM.
    page.wait_for_function(
        "n => window.rockConsole.rows.size >= n && "
        "document.querySelectorAll('#rows tr').length >= Math.min(n, 200)",
        arg=rows,
        timeout=120_000,
    )
    first = page.evaluate("() => performance.now()")
    page.locator("#search").fill("zz-no-match")
    page.wait_for_function("() => document.querySelectorAll('#rows tr').length === 0")
    interactive = page.evaluate("() => performance.now()")
    return float(first), float(interactive)


def _churn(page: Any, url: str, seconds: float, rate: int) -> dict[str, float]:
    """Create and delete sandboxes for ``seconds``; what the page saw."""
    import httpx

    page.goto("about:blank")
    page.goto(url + "/ui/#/sandboxes")
    page.wait_for_selector("body[data-table-ready='1']")
    before = page.evaluate("() => [window.rockConsole.received, window.rockConsole.dropped]")
    made = 0
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as api:
        ids: list[str] = []
        while time.monotonic() - started < seconds:
            tick = time.monotonic()
            for _ in range(rate):
                ids.append(api.post("/v1/sandboxes", json={"owner": "churn"}).json()["id"])
                made += 1
                if len(ids) > rate:
                    api.delete(f"/v1/sandboxes/{ids.pop(0)}")
                    made += 1
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        for sandbox_id in ids:
            api.delete(f"/v1/sandboxes/{sandbox_id}")
            made += 1
    # Wait until the page has seen the last delete (the table is back to its size).
    page.wait_for_function(
        "() => !window.rockConsole.rows || "
        "[...window.rockConsole.rows.values()].every(r => r.owner !== 'churn')",
        timeout=60_000,
    )
    elapsed = time.monotonic() - started
    received, dropped = page.evaluate(
        "() => [window.rockConsole.received, window.rockConsole.dropped]"
    )
    seen = received - before[0]
    return {
        "changes": made,
        "seen": seen,
        "per_s": seen / elapsed,
        "dropped": dropped - before[1],
        "ratio": seen / max(made, 1),
    }


def _echo_browser(page: Any, url: str, keys: int) -> list[float]:
    """Key typed into xterm.js -> its echo drawn, in ms (measured in the page)."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as api:
        sandbox_id = api.post("/v1/sandboxes", json={"owner": "echo"}).json()["id"]
    page.goto("about:blank")
    page.goto(url + f"/ui/#/sandbox/{sandbox_id}")
    page.get_by_role("button", name="Open terminal").click()
    page.wait_for_selector("#terminal[data-connected='1']")
    page.keyboard.type("cat > /dev/null\n")  # echo by the tty only, no shell work
    time.sleep(0.5)
    samples = []
    for i in range(keys):
        char = "abcdefghij"[i % 10]
        page.evaluate(
            """() => { const ws = window.rockConsole.ws; window.__t0 = performance.now();
                 window.__echo = null;
                 ws.addEventListener('message', () => { window.__echo ??= performance.now(); },
                                     {once: true}); }"""
        )
        page.keyboard.type(char)
        page.wait_for_function("() => window.__echo !== null")
        samples.append(float(page.evaluate("() => window.__echo - window.__t0")))
    return samples


def _echo_raw(url: str, keys: int) -> list[float]:
    """The floor: the same echo over a bare WebSocket (no browser, no xterm.js)."""
    import httpx
    from websockets.sync.client import connect

    with httpx.Client(base_url=url, timeout=30) as api:
        sandbox_id = api.post("/v1/sandboxes", json={"owner": "echo-raw"}).json()["id"]
    ws_url = url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/pty"
    samples = []
    with connect(ws_url) as ws:
        ws.send(b"cat > /dev/null\n")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # drain the prompt and the command's echo
            try:
                ws.recv(timeout=0.3)
            except TimeoutError:
                break
        for i in range(keys):
            t0 = time.perf_counter()
            ws.send("abcdefghij"[i % 10].encode())
            ws.recv(timeout=10)
            samples.append((time.perf_counter() - t0) * 1000)
    return samples


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sandboxes", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--churn", type=int, default=20, help="creates per second")
    parser.add_argument("--churn-seconds", type=float, default=10.0)
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "artifacts" / "bench",
        help="where the screenshots go",
    )
    opts = parser.parse_args()
    opts.artifacts.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []

    def shot(page: Any, name: str) -> None:
        path = opts.artifacts / f"console-{name}.png"
        page.screenshot(path=str(path))
        shots.append(path)

    from playwright.sync_api import sync_playwright

    console = {"sample_interval_seconds": 5.0, "events_interval_seconds": 0.5}
    apps = {
        "/fake": {
            "runtime": {"type": "fake"},
            "namespace": "rock-bench-console-fake",
            "max_sandboxes_per_node": opts.sandboxes + 100,
            "console": console,
        },
        "/": {"runtime": "local", "namespace": "rock-bench-console", "console": console},
    }
    with harness.platform(apps) as urls, sync_playwright() as pw:
        fake, local = urls["/fake"], urls["/"]
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        empty = [_load(page, fake + "/ui/", 0) for _ in range(3)]
        t0 = time.monotonic()
        _fill(fake, opts.sandboxes)
        fill_s = time.monotonic() - t0
        full = [_load(page, fake + "/ui/", opts.sandboxes) for _ in range(5)]
        page.locator("#search").fill("")
        page.wait_for_function("() => document.querySelectorAll('#rows tr').length > 0")
        shot(page, f"{opts.sandboxes}-rows")
        churn = _churn(page, fake, opts.churn_seconds, opts.churn)
        browser_echo = _echo_browser(page, local, opts.keys)
        shot(page, "terminal-echo")
        page.goto(fake + "/ui/#/metrics")
        page.wait_for_selector("#charts figure")
        shot(page, "charts")
        raw_echo = _echo_raw(local, opts.keys)
        browser.close()

    def row(name: str, ours: list[float], floor: list[float]) -> None:
        p50, p99 = harness.pct(ours, 50), harness.pct(ours, 99)
        f50 = harness.pct(floor, 50)
        print(
            f"| {name} | {p50:.1f} / {p99:.1f} | {f50:.1f} / {harness.pct(floor, 99):.1f} "
            f"| {p50 / max(f50, 1e-9):.2f}x |"
        )

    print(f"\n{opts.sandboxes} sandboxes created in {fill_s:.1f} s (fake runtime)\n")
    print("| metric (ms) | ours p50 / p99 | floor p50 / p99 | ratio |")
    print("|---|---|---|---|")
    row(
        f"first render, {opts.sandboxes} rows (floor: empty table)",
        [f for f, _ in full],
        [f for f, _ in empty],
    )
    row(
        f"interactive, {opts.sandboxes} rows (floor: empty table)",
        [i for _, i in full],
        [i for _, i in empty],
    )
    row("keystroke echo, xterm.js (floor: bare WebSocket)", browser_echo, raw_echo)
    print(
        f"\nlive updates: {churn['changes']:.0f} changes made, {churn['seen']:.0f} seen by the "
        f"page ({churn['per_s']:.1f}/s), {churn['dropped']:.0f} dropped events, "
        f"seen/made {churn['ratio']:.2f} (floor 1.00)"
    )
    print(
        f"echo mean browser {statistics.mean(browser_echo):.1f} ms, raw "
        f"{statistics.mean(raw_echo):.1f} ms"
    )
    print("screenshots: " + ", ".join(str(p) for p in shots))


if __name__ == "__main__":
    main()
