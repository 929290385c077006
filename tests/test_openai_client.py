"""The official ``openai`` client against the server on loopback: generations, edits, errors, the key, the queue."""

from __future__ import annotations

import base64
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

if not os.environ.get("CI"):  # CI installs everything: there a missing package fails the run
    pytest.importorskip("openai", reason="openai is not installed (pip install -e '.[dev]')")
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (pip install -e '.[serve]')")

import openai  # noqa: E402
from PIL import Image  # noqa: E402

from helpers import Gated  # noqa: E402
from nextstep.serve import limits  # noqa: E402
from nextstep.serve.routes import create_app  # noqa: E402
from nextstep.serve.runner import running_server  # noqa: E402
from nextstep.serve.security import Access  # noqa: E402

FAST = {"steps": 2}  # server fields beyond OpenAI's go in extra_body
KEY = "test-key"


@pytest.fixture(scope="module")
def pipe(fixture_pipe):
    return fixture_pipe


@pytest.fixture(scope="module")
def url(pipe):
    with running_server(create_app(pipe, queue_size=2, access=Access(api_key=KEY))) as base:
        yield base


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0, timeout=60)


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def size_of(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return im.size


def test_generate(url):
    r = client(url).images.generate(model="nextstep", prompt="a red circle", n=2, size="32x16",
                                    response_format="b64_json", quality="high", style="natural", user="u1",
                                    background="opaque", output_format="png", moderation="auto",
                                    output_compression=100, partial_images=0, extra_body={**FAST, "seed": 3})
    assert isinstance(r.created, int) and r.size == "32x16" and r.output_format == "png"
    assert [size_of(d.b64_json) for d in r.data] == [(32, 16), (32, 16)]
    assert r.usage.output_tokens == 2 * 2 and r.usage.input_tokens_details.image_tokens == 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_edit(url):
    c = client(url)
    r = c.images.edit(model="nextstep", image=("in.png", png(32, 32), "image/png"), prompt="make it red",
                      extra_body=FAST)
    assert [size_of(d.b64_json) for d in r.data] == [(32, 32)]
    assert r.usage.input_tokens_details.image_tokens == 4
    r = c.images.edit(model="nextstep", image=[("in.png", png(32, 32), "image/png")], prompt="make it red", n=2,
                      size="16x16", extra_body=FAST)  # a list of one image: sent as image[]
    assert [size_of(d.b64_json) for d in r.data] == [(16, 16), (16, 16)]


@pytest.mark.parametrize("call, param, words", [
    (lambda c: c.images.generate(prompt="a", response_format="url"), "response_format", "'url' is not supported"),
    (lambda c: c.images.generate(prompt="a", background="transparent"), "background", "opaque"),
    (lambda c: c.images.generate(prompt="a", output_format="webp"), "output_format", "PNG"),
    (lambda c: c.images.generate(prompt="a", size="1024x1024"), "size", "over the limit"),
    (lambda c: c.images.generate(prompt="a", stream=True), "stream", "/v1/images/generations/stream"),
    (lambda c: c.images.edit(image=("a.png", png(16, 16)), mask=("m.png", png(16, 16)), prompt="x"), "mask",
     "masks are not supported"),
    (lambda c: c.images.edit(image=[("a.png", png(16, 16)), ("b.png", png(16, 16))], prompt="x"), "image",
     "one image per request"),
])
def test_bad_requests_raise_bad_request_error(url, call, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        call(client(url))
    assert e.value.status_code == 400 and e.value.param == param and e.value.type == "invalid_request_error"
    assert words.lower() in e.value.message.lower()
    assert set(e.value.body) == {"message", "type", "param", "code"}


def test_wrong_key_raises_authentication_error(url):
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, key="wrong").images.generate(prompt="a", size="16x16")
    assert e.value.code == "invalid_api_key"


def test_full_queue_raises_rate_limit_error_with_retry_after(pipe):
    gated = Gated(pipe)
    app = create_app(gated, queue_size=1)
    worker = app.state.worker
    with running_server(app) as base, ThreadPoolExecutor(2) as pool:
        c = client(base, key="any")  # no key on this server: the header is ignored
        first = pool.submit(c.images.generate, prompt="a", size="16x16", extra_body=FAST)
        assert gated.started.wait(15)
        second = pool.submit(c.images.generate, prompt="a", size="16x16", extra_body=FAST)
        while worker.waiting < 1:
            threading.Event().wait(0.02)
        with pytest.raises(openai.RateLimitError) as e:
            c.images.generate(prompt="a", size="16x16", extra_body=FAST)
        assert e.value.response.headers["retry-after"] == str(limits.RETRY_AFTER_S)
        assert e.value.code == "queue_full"
        gated.release.set()
        assert len(first.result(30).data) == 1 and len(second.result(30).data) == 1
