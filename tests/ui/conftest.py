"""Fixtures for the ``/ui`` browser tests: Debian's ``chromium`` driven headless by Playwright, in front of a real
gateway (its own process, its own SQLite gallery) and the real tritonserver serving SFace.

The browser is the system one (``make chromium`` installs it, as ``make postgres`` installs PostgreSQL); Playwright
never downloads a browser of its own. One browser for the session; each test module gets its own page.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The serving tests' fixtures: the wrapped SFace model, its Triton model repository, the real tritonserver.
from tests.serving.conftest import Gateway, model_repo, sface_export, start_gateway, triton  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
# Where the README's screenshots are written when asked (CDFACE_UI_SCREENSHOTS=docs/img); else a temp folder.
SCREENSHOTS_ENV = "CDFACE_UI_SCREENSHOTS"
ACTION_TIMEOUT_MS = 60_000  # an identify on a loaded 2-core machine can take seconds, never a minute


@pytest.fixture(scope="session")
def ui_gateway(triton, model_repo, tmp_path_factory):  # noqa: F811 (the fixtures imported above)
    """A gateway of its own: the page tests create and delete identities, so no other test shares its gallery."""
    gw = start_gateway(tmp_path_factory.mktemp("ui-gateway"), triton.grpc_url, model_repo)
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        # A failure, not a skip: the README's test command installs chromium first, so a skip would hide a gap.
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (Debian's chromium package) first")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory) -> Path:
    wanted = os.environ.get(SCREENSHOTS_ENV)
    folder = Path(wanted) if wanted else tmp_path_factory.mktemp("ui-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class GalleryPage:
    """The page in a browser tab, plus what its console reported."""

    page: object  # playwright.sync_api.Page
    gateway: Gateway
    console_errors: list[str] = field(default_factory=list)

    def open(self) -> None:
        self.page.goto(self.gateway.url + "/ui/")
        self.page.wait_for_load_state("load")

    def use_key(self, key: str, remember: bool = False) -> str:
        self.page.fill("#api-key", key)
        self.page.set_checked("#remember-key", remember)
        return self.act("#use-key")

    def act(self, selector: str) -> str:
        """Click a control that starts an action and return the status line once the action has finished."""
        from playwright.sync_api import expect

        self.page.click(selector)
        # The click handler marks the status "busy" before its first await; done means "ok" or "error".
        status = self.page.locator("#status")
        expect(status).to_have_class(re.compile(r"^(ok|error)$"), timeout=ACTION_TIMEOUT_MS)
        return status.inner_text()

    def ok(self, selector: str) -> str:
        text = self.act(selector)
        assert self.page.get_attribute("#status", "class") == "ok", text
        return text


def open_gallery_page(browser, gateway: Gateway) -> GalleryPage:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    page = context.new_page()
    gallery = GalleryPage(page, gateway)
    page.on("console", lambda message: gallery.console_errors.append(f"{message.text} [{message.location.get('url')}]")
            if message.type == "error" else None)
    page.on("pageerror", lambda error: gallery.console_errors.append(f"uncaught: {error}"))
    gallery.open()
    return gallery
