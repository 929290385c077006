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


def fill(page, **fields) -> None:
    """Type into the form's fields by id (``fill(page, prompt="a red circle", steps=2)``), in the order given."""
    for name, value in fields.items():
        page.fill(f"#{name.replace('_', '-')}", str(value))


def natural_sizes(page, selector: str) -> list[list[int]]:
    return page.eval_on_selector_all(selector, "els => els.map(e => [e.naturalWidth, e.naturalHeight])")


def test_generate_shows_previews_then_the_image(page, tmp_path):
    fill(page, prompt="a red circle on the left", width=64, height=48, steps=2, seed=7)
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
    fill(page, prompt="a blue square", width=32, height=32, steps=2)  # (the model's native size: 39 s of tokens)
    page.click("#generate")
    page.wait_for_selector("#gallery figure img")
    assert page.locator("#preview img").count() == 1  # the result, shown in the preview
    # after an error the preview no longer shows the previous result (it looked like this request's)
    fill(page, width=72, steps=2)
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "multiple of 16" in page.inner_text("#error")
    assert page.locator("#preview img").count() == 0 and "appears here" in page.inner_text("#preview")
    assert page.locator("#gallery figure").count() == 1  # the history stays
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
    fill(page, prompt="make it red", n=2, steps=2)
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure img').length === 2 && "
                           "[...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth > 0)")
    assert natural_sizes(page, "#gallery figure img") == [[32, 32], [32, 32]]
    assert page.inner_text("#gallery figcaption").startswith("#1 · edit: make it red")
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
        fill(page, prompt="a red circle", width=32, height=32, steps=2)
        page.click("#generate")
        page.wait_for_function("document.querySelector('#gallery img') && "
                               "document.querySelector('#gallery img').naturalWidth > 0")
        assert natural_sizes(page, "#gallery figure img") == [[32, 32]]


def test_edit_a_result_again_and_step_back(page, tmp_path):
    """Multi-turn editing: "Edit this" on a result makes it the next edit's input; the results stay on the page, an
    edit's input can be stepped back to the result it was edited from, and any earlier result edited again."""
    fill(page, prompt="a red circle", width=64, height=64, steps=2, seed=1)
    page.click("#generate")
    page.wait_for_selector("#result-1 img")

    def edit(instruction: str, made: int) -> None:
        fill(page, prompt=instruction, steps=2)
        page.click("#generate")
        page.wait_for_selector(f"#result-{made} img")
        page.wait_for_function(f"document.querySelector('#result-{made} img').naturalWidth > 0")

    page.click("#result-1 .edit-this")
    assert page.get_attribute("#tab-edit", "aria-selected") == "true" and page.input_value("#prompt") == ""
    page.wait_for_function("document.getElementById('image-thumb').naturalWidth === 64")
    assert page.inner_text("#source-label") == "Editing result #1" and page.is_hidden("#source-back")
    assert page.get_attribute("#result-1", "class") == "source"
    edit("make the circle blue", 2)
    assert page.inner_text("#result-2 figcaption").startswith("#2 · edit of #1: make the circle blue · 64x64")
    page.click("#result-2 .edit-this")  # the last result, edited again
    assert page.inner_text("#source-label") == "Editing result #2" and page.inner_text("#source-back") == "Back to #1"
    edit("make the circle green", 3)
    assert page.inner_text("#result-3 figcaption").startswith("#3 · edit of #2: make the circle green")
    page.click("#result-3 .edit-this")
    page.click("#source-back")  # step back: #3 was made from #2
    assert page.inner_text("#source-label") == "Editing result #2"
    page.click("#source-back")
    assert page.inner_text("#source-label") == "Editing result #1" and page.is_hidden("#source-back")
    edit("make the circle yellow", 4)  # a branch from the first result
    assert page.inner_text("#result-4 figcaption").startswith("#4 · edit of #1: make the circle yellow")
    ids = page.eval_on_selector_all("#gallery figure", "els => els.map(e => e.id)")
    assert ids == ["result-4", "result-3", "result-2", "result-1"]  # every result kept, newest first
    assert natural_sizes(page, "#gallery figure img") == [[64, 64]] * 4
    page.screenshot(path=str(tmp_path / "serve_multi_turn.png"), full_page=True)


def test_a_size_the_model_was_not_trained_at_is_noted(bundled_pipe):
    with running_server(create_app(bundled_pipe, queue_size=2)) as url, browser_page(url) as page:
        page.wait_for_function("document.getElementById('width').value !== ''")
        assert page.input_value("#width") == "64" and page.is_hidden("#size-note")
        page.fill("#width", "128")
        page.wait_for_selector("#size-note:not([hidden])")
        assert page.inner_text("#size-note") == "This model was trained at 64x64 only: at 128x64 it may draw noise."
