"""The console in a real browser: Debian's Chromium driven by Playwright, on a real platform.

``serve_config.yaml`` (local runtime) is deployed on a separate ``ray start --head`` with a
token for every role. Chromium is ``/usr/bin/chromium`` (never
``playwright install``); without it or without the ``playwright`` package the tests skip,
unless ``ROCK_REQUIRE_BROWSER=1`` (CI) makes that an error. Screenshots go to
``artifacts/browser/`` (gitignored).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rock_serve.auth import generate_token, hash_token
from rock_serve.config import TokenEntry
from rock_serve.sdk import Client
from tests.contract.conftest import bwrap_unavailable, make_config
from tests.e2e._head import BIN, deploy, ray_head

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: name -> (namespace, role)
USERS = {
    "root": ("ops", "admin"),
    "alice": ("team-a", "tenant"),
    "bob": ("team-b", "tenant"),
    "vera": ("ops", "viewer"),
    "otto": ("ops", "operator"),
}


def _browser_unavailable() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _browser_unavailable()
    for item in items:
        if "tests/browser/" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.browser)
        item.add_marker(pytest.mark.ray)
        # The first test also pays for the Ray head and the deploy (minutes on a busy machine).
        item.add_marker(pytest.mark.timeout(600))
        if reason is not None:
            if os.environ.get("ROCK_REQUIRE_BROWSER") == "1":
                item.add_marker(pytest.mark.xfail(reason=reason, run=False, strict=True))
            else:
                item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class ConsoleApp:
    url: str
    tokens: dict[str, str]
    #: The Ray head's --temp-dir (its session's logs are under session_latest/logs).
    ray_temp: str = ""
    #: The same platform on bwrap (host tools) beside it, same tokens (pause/resume).
    bwrap: ConsoleApp | None = None

    def client(self, user: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def sdk(self, user: str) -> Client:
        return Client(self.url, token=self.tokens[user])

    @property
    def ui(self) -> str:
        return f"{self.url}/ui/"


# Module scope, not session: the platform's own Ray head and Playwright's sync API (which keeps
# an event loop running in the main thread while it lives) must be gone before later modules'
# asyncio tests run.
@pytest.fixture(scope="module")
def console_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleApp]:
    """serve_config.yaml deployed on its own `ray start --head` with a token per role.

    Its own head (own ports, process group), so it never shares a process with the e2e
    tests' in-process Ray.
    """
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed")
    tokens = {user: generate_token() for user in USERS}
    entries = [
        TokenEntry(name=user, namespace=ns, sha256=hash_token(tokens[user]), role=role)
        for user, (ns, role) in USERS.items()
    ]

    def edit(app: dict[str, Any]) -> None:
        app["args"]["auth"] = {"tokens": [e.model_dump() for e in entries]}
        app["args"]["max_sandboxes_per_node"] = 32
        app["args"]["reap_interval_seconds"] = 0.5
        app["args"]["console"] = {"sample_interval_seconds": 1.0, "events_interval_seconds": 0.25}

    tmp = tmp_path_factory.mktemp("console")

    def on_bwrap(app: dict[str, Any]) -> None:
        app["args"]["runtime"] = make_config("bwrap", str(tmp / "bwrap")).model_dump(mode="json")
        app["args"]["max_sandboxes_per_node"] = 4

    also = {} if bwrap_unavailable() else {"/bw": on_bwrap}
    with ray_head() as head:
        deploy(head, tmp, "rock-console", edit, also=also)
        app = ConsoleApp(url=head.url, tokens=tokens, ray_temp=head.temp)
        if also:
            app.bwrap = ConsoleApp(url=head.url + "/bw", tokens=tokens, ray_temp=head.temp)
        yield app
        for platform in (app, app.bwrap):
            if platform is None:
                continue
            with platform.client("root") as root:
                for item in root.get("/v1/sandboxes").json().get("items", []):
                    root.delete(f"/v1/sandboxes/{item['id']}")


@pytest.fixture
def cleanup(console_app: ConsoleApp) -> Iterator[None]:
    """Every test leaves no sandbox behind."""
    yield
    with console_app.client("root") as root:
        for item in root.get("/v1/sandboxes").json()["items"]:
            root.delete(f"/v1/sandboxes/{item['id']}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context (no cookies) and page; a screenshot is saved at the end."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-end.png"), full_page=True)
    context.close()
    assert problems == [], f"JavaScript errors on the page: {problems}"


def login(page: Any, app: ConsoleApp, user: str) -> None:
    """Log in through the form, as a person would."""
    page.goto(app.ui)
    page.get_by_label("Token").fill(app.tokens[user])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_selector("#who:not(:empty)")


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
