"""The official ``openai`` client against the server on loopback: generations, edits, streaming (partial images),
errors, the key, the queue."""

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

import httpx  # noqa: E402
import openai  # noqa: E402
from openai.types import (  # noqa: E402
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
)
from PIL import Image  # noqa: E402

from helpers import AtToken, Gated, events  # noqa: E402
from nextstep.serve import limits  # noqa: E402
from nextstep.serve.routes import create_app  # noqa: E402
from nextstep.serve.runner import running_server  # noqa: E402
from nextstep.serve.security import Access  # noqa: E402
from nextstep.serve.worker import partial_steps  # noqa: E402

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


def stream_previews(url: str, body: dict) -> dict[int, str]:
    """The /stream route's previews of a request by image token (step), each image as b64 PNG."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http, \
            http.stream("POST", "/v1/images/generations/stream", json=body) as r:
        return {d["step"]: d["images"][0] for name, d in events(r.iter_lines()) if name == "preview"}


def test_stream_generate_sends_partial_images_then_the_image(url):
    """stream=True, partial_images=2 through the SDK's streaming API: two partial images (the tokens drawn so far,
    decoded at evenly spaced tokens: the /stream route's previews at those steps), then the completed image, the
    same bytes as without streaming."""
    c = client(url)
    args = dict(model="nextstep", prompt="a red circle", size="64x32", extra_body={**FAST, "seed": 3})
    got = list(c.images.generate(**args, stream=True, partial_images=2))
    assert [type(e) for e in got] == [ImageGenPartialImageEvent, ImageGenPartialImageEvent, ImageGenCompletedEvent]
    *partials, done = got
    assert [e.partial_image_index for e in partials] == [0, 1]
    for e in got:
        assert (e.size, e.quality, e.background, e.output_format) == ("64x32", "auto", "opaque", "png")
        assert isinstance(e.created_at, int) and size_of(e.b64_json) == (64, 32)
    plain = c.images.generate(**args)
    assert done.b64_json == plain.data[0].b64_json  # streaming changes nothing about the image
    assert done.usage.to_dict() == plain.usage.to_dict() and done.seed == 3  # seed: the server's field
    steps = sorted(partial_steps(4 * 2, 2))  # 8 image tokens: partial images after tokens 3 and 5
    assert steps == [3, 5]
    previews = stream_previews(url, {"prompt": "a red circle", "size": "64x32", "seed": 3, **FAST})
    assert [e.b64_json for e in partials] == [previews[s] for s in steps]
    assert len({e.b64_json for e in got}) == 3  # the picture fills in


@pytest.mark.parametrize("partial_images", [0, None])
def test_stream_without_partial_images_sends_only_the_completed_event(url, partial_images):
    kwargs = {} if partial_images is None else {"partial_images": partial_images}
    got = list(client(url).images.generate(prompt="a", size="32x32", stream=True, extra_body=FAST, **kwargs))
    assert [e.type for e in got] == ["image_generation.completed"]


def test_stream_sends_fewer_partial_images_than_asked_when_the_image_has_fewer_tokens(url):
    got = list(client(url).images.generate(prompt="a", size="32x16", stream=True, partial_images=3, extra_body=FAST))
    assert [e.type for e in got] == ["image_generation.partial_image", "image_generation.completed"]  # 2 tokens


def test_stream_edit(url):
    c = client(url)
    args = dict(model="nextstep", image=("in.png", png(32, 32), "image/png"), prompt="make it red",
                extra_body={**FAST, "seed": 5})
    got = list(c.images.edit(**args, stream=True, partial_images=3))
    assert [type(e) for e in got] == [ImageEditPartialImageEvent] * 3 + [ImageEditCompletedEvent]  # 4 tokens
    assert [e.partial_image_index for e in got[:3]] == [0, 1, 2]
    assert got[-1].usage.input_tokens_details.image_tokens == 4
    assert got[-1].b64_json == c.images.edit(**args).data[0].b64_json


class FailingMidStream(AtToken):
    """The pipeline, failing after its fifth image token (as a CUDA out-of-memory would)."""

    def at(self, step: int) -> None:
        if step == 5:
            raise RuntimeError("out of memory")


def test_stream_error_mid_stream_raises_api_error(pipe):
    with running_server(create_app(FailingMidStream(pipe))) as base:
        stream = client(base).images.generate(prompt="a", size="64x64", stream=True, partial_images=3,
                                              extra_body=FAST)
        got = []
        with pytest.raises(openai.APIError) as e:
            got.extend(stream)
    assert [e.partial_image_index for e in got] == [0]  # after token 4 of 16; the next one was due after token 8
    assert e.value.type == "server_error" and "RuntimeError" in e.value.message and "server log" in e.value.message


@pytest.mark.parametrize("call, param, words", [
    (lambda c: c.images.generate(prompt="a", response_format="url"), "response_format", "'url' is not supported"),
    (lambda c: c.images.generate(prompt="a", background="transparent"), "background", "opaque"),
    (lambda c: c.images.generate(prompt="a", output_format="webp"), "output_format", "PNG"),
    (lambda c: c.images.generate(prompt="a", size="1024x1024"), "size", "over the limit"),
    (lambda c: c.images.generate(prompt="a", stream=True, n=2), "n", "one image per request"),
    (lambda c: c.images.generate(prompt="a", stream=True, partial_images=4), "partial_images", "[0, 3]"),
    (lambda c: c.images.edit(image=("a.png", png(16, 16)), mask=("m.png", png(16, 16)), prompt="x"), "mask",
     "no alpha channel"),
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
