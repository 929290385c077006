"""The page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright), server on loopback; also
behind an API key, which the page asks for."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "browser-test-key"


def need(ok: bool, why: str) -> None:
    """Skip when something is missing, except in CI, which installs it all: there a missing piece fails the run."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"browser test: {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)


need(CHROMIUM.is_file(), f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
need(importlib.util.find_spec("playwright") is not None, "Playwright is not installed (pip install -e '.[dev]')")
need(importlib.util.find_spec("fastapi") is not None, "the server needs the 'serve' extra (pip install -e '.[serve]')")

from playwright import sync_api  # noqa: E402

from nextstep.serve.routes import create_app  # noqa: E402
from nextstep.serve.runner import running_server  # noqa: E402
from nextstep.serve.security import Access  # noqa: E402


@pytest.fixture(scope="module")
def pipe(fixture_pipe):
    return fixture_pipe


@pytest.fixture(scope="module")
def server(pipe):
    with running_server(create_app(pipe, queue_size=2)) as url:
        yield url


@contextlib.contextmanager
def browser_page(url: str):
    """A fresh browser on ``url``; fails the test on any uncaught script error."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            yield page
            assert not errors, errors
        finally:
            browser.close()


@pytest.fixture
def page(server):
    with browser_page(server) as page:
        page.wait_for_function("document.getElementById('width').value !== ''")  # /health has been read
        yield page


def natural_sizes(page, selector: str) -> list[list[int]]:
    return page.eval_on_selector_all(selector, "els => els.map(e => [e.naturalWidth, e.naturalHeight])")


def test_generate_shows_previews_then_the_image(page, tmp_path):
    page.fill("#prompt", "a red circle on the left")
    page.fill("#width", "64")
    page.fill("#height", "48")
    page.fill("#steps", "2")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_selector("#gallery figure img")
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth > 0")
    assert int(page.get_attribute("#preview", "data-count")) >= 1  # at least one live preview arrived
    assert natural_sizes(page, "#gallery figure img") == [[64, 48]]
    assert natural_sizes(page, "#preview img") == [[64, 48]]
    link = page.locator("#gallery figcaption a")
    assert link.get_attribute("download") == "nextstep-7-0.png"
    assert link.get_attribute("href").startswith("data:image/png;base64,")
    assert "Done" in page.inner_text("#status") and page.is_hidden("#error")
    shot = tmp_path / "serve_generate.png"
    page.screenshot(path=str(shot), full_page=True)


def test_errors_are_shown_in_words(page):
    page.fill("#prompt", "a blue square")
    page.fill("#width", "72")
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "multiple of 16" in page.inner_text("#error")
    page.fill("#prompt", "")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('prompt')")


def test_edit_tab_uploads_and_edits(page, tmp_path):
    from PIL import Image

    src = tmp_path / "input.png"
    Image.new("RGB", (32, 32), (30, 120, 200)).save(src)
    page.click("#tab-edit")
    page.set_input_files("#image", str(src))
    page.wait_for_function("document.getElementById('image-thumb').naturalWidth === 32")
    assert page.input_value("#width") == "32" and page.input_value("#height") == "32"
    page.fill("#prompt", "make it red")
    page.fill("#n", "2")
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure img').length === 2 && "
                           "[...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth > 0)")
    assert natural_sizes(page, "#gallery figure img") == [[32, 32], [32, 32]]
    assert page.inner_text("#gallery figcaption").startswith("edit: make it red")
    page.screenshot(path=str(tmp_path / "serve_edit.png"), full_page=True)


def test_page_asks_for_the_api_key(pipe):
    """Behind a key the page's own files load; the page asks for the key and sends it with every call."""
    with running_server(create_app(pipe, queue_size=2, access=Access(api_key=KEY))) as url, browser_page(url) as page:
        page.wait_for_selector("#key-form:not([hidden])")
        assert "API key" in page.inner_text("#error")
        page.fill("#api-key", "wrong")
        page.click("#key-save")
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#api-key", KEY)
        page.click("#key-save")
        page.wait_for_function("document.getElementById('width').value !== ''")
        assert page.is_hidden("#key-form") and page.is_hidden("#error")
        page.fill("#prompt", "a red circle")
        page.fill("#width", "32")
        page.fill("#height", "32")
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#gallery img') && "
                               "document.querySelector('#gallery img').naturalWidth > 0")
        assert natural_sizes(page, "#gallery figure img") == [[32, 32]]
