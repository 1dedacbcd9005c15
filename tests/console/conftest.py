"""Fixtures for the console tests: two real `lmserve serve demo` servers behind a real gateway, and
Debian's Chromium driven by Playwright (installed by scripts/install-test-deps.sh and the dev extra).

Every page a test opens records the browser's console errors and uncaught exceptions; the test fails
on any it did not declare (`ConsolePage.allow`), and a screenshot of the page is saved under
`test-artifacts/console/` (gitignored) whatever the outcome.
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.gateway.conftest import ADMIN_KEY, base_config
from tests.services import REPO_ROOT, Process, free_port, python_module, start_process

MODEL = "lmserve-demo"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "console"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Stack:
    """The gateway and its two demo servers (`servers[1]` is the one a test may kill)."""

    def __init__(self, gateway: Process, servers: list[Process]) -> None:
        self.gateway = gateway
        self.url = gateway.url
        self.servers = servers

    def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                             timeout=10, **kwargs)  # type: ignore[arg-type]

    def create_key(self, name: str, **fields: object) -> dict[str, object]:
        response = self.admin("POST", "/admin/keys", json={"name": name, **fields})
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    def serve(name: str) -> Process:
        port = free_port()
        log = tmp_path_factory.mktemp(name) / "server.log"
        return start_process(python_module("lmserve.cli", "serve", "demo", "--port", str(port)), port, log,
                             ready_path="/ready", timeout=240)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(serve, ["demo-a", "demo-b"]))
    tmp = tmp_path_factory.mktemp("console-gateway")
    port = free_port()
    config = base_config(tmp, [{"name": MODEL, "backends": [{"url": s.url} for s in servers]}], port=port)
    config_path = tmp / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    gateway = start_process(python_module("lmserve.cli", "gateway", "--config", str(config_path)), port,
                            tmp / "gateway.log")
    yield Stack(gateway, servers)
    gateway.stop()
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Module-scoped: Playwright's sync API runs an event loop in this thread while it is open, and
    later tests that call asyncio.run() in the same session fail until it is closed."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-test-deps.sh (installs Debian's chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class ConsolePage:
    """A browser page on the console that records console errors and uncaught exceptions."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.errors: list[str] = []
        self.allowed: list[re.Pattern[str]] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def allow(self, pattern: str) -> None:
        """Declares a console error the test causes on purpose (e.g. the 401 of a wrong key)."""
        self.allowed.append(re.compile(pattern))

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]

    def open(self) -> Page:
        self.page.goto(self.base_url + "/ui")
        return self.page

    def sign_in(self, key: str, role: str = "user") -> None:
        page = self.open()
        page.get_by_label("the administrator" if role == "admin" else "a user", exact=False).check()
        page.get_by_label("Key", exact=True).fill(key)
        page.get_by_label("Key", exact=True).press("Enter")  # the keyboard path, as a person would
        page.locator("#nav").wait_for(state="visible")


def _open_page(browser: Browser, stack: Stack, request: pytest.FixtureRequest,
               viewport: dict[str, int]) -> Iterator[ConsolePage]:
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    console = ConsolePage(context.new_page(), stack.url)
    yield console
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    console.page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert console.unexpected_errors() == [], "the browser logged errors"


@pytest.fixture
def console(browser: Browser, stack: Stack, request: pytest.FixtureRequest) -> Iterator[ConsolePage]:
    yield from _open_page(browser, stack, request, {"width": 1280, "height": 900})


@pytest.fixture
def phone(browser: Browser, stack: Stack, request: pytest.FixtureRequest) -> Iterator[ConsolePage]:
    yield from _open_page(browser, stack, request, {"width": 390, "height": 844})


def screenshot(page: Page, name: str) -> Path:
    """Saves a named screenshot of the page's current state (for the docs and for people)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
