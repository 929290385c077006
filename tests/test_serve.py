"""The HTTP server on the tiny fixture model: responses, stream events, every limit, the queue, cancellation, load,
who may call it (Host, Origin, content type, API key)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import AtToken, Gated, Wrapped, events, local, need, png_bytes, png_size, wait_until

need("fastapi", "pip install -e '.[serve]'")
httpx = need("httpx", "pip install -e '.[dev]'")

from fastapi.testclient import TestClient  # noqa: E402

from nextstep.config import ConfigError  # noqa: E402
from nextstep.errors import InputError  # noqa: E402
from nextstep.serve import limits, parsing  # noqa: E402
from nextstep.serve.routes import create_app  # noqa: E402
from nextstep.serve.runner import running_server, serve  # noqa: E402
from nextstep.serve.security import Access, normalize_origin  # noqa: E402
from nextstep.settings import MAX_GUIDANCE_SCALE, MAX_TIME_SHIFT  # noqa: E402

FAST = {"steps": 2}  # two flow steps per token: the fixture model draws noise anyway


@pytest.fixture(scope="module")
def pipe(fixture_pipe):
    return fixture_pipe


@pytest.fixture(scope="module")
def client(pipe):
    with local(create_app(pipe, queue_size=4)) as c:
        yield c


def assert_error(r, status: int, *words: str):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == limits.ERROR_TYPES[status]
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err["message"])


# ---- happy paths -------------------------------------------------------------------------------------------------
def test_health(client):
    h = client.get("/health").json()
    assert h["status"] == "ok"
    assert h["queue"] == {"depth": 0, "waiting": 0, "running": False, "batch": 0, "capacity": 4}
    assert h["model"]["size_multiple"] == 16
    assert h["limits"]["max_size"] == limits.MAX_SIZE and h["limits"]["max_n"] == limits.MAX_N
    assert h["limits"]["max_batch"] == limits.MAX_BATCH
    assert h["defaults"]["edit"]["negative_prompt"] == "Copy original image."
    assert h["defaults"]["generation"]["noise_level"] == 0.8 and "flow_sde" in h["limits"]["samplers"]


def test_generation_returns_n_pngs_of_the_requested_size(client):
    body = {"prompt": "a red circle", "n": 2, "size": "48x32", "seed": 5, **FAST}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seed"] == 5 and isinstance(out["created"], int)
    assert [png_size(d["b64_json"]) for d in out["data"]] == [(48, 32), (48, 32)]
    again = client.post("/v1/images/generations", json=body).json()  # same seed, same images
    assert [d["b64_json"] for d in again["data"]] == [d["b64_json"] for d in out["data"]]


def test_generation_without_seed_reports_the_one_drawn(client):
    out = client.post("/v1/images/generations", json={"prompt": "a square", "size": "16x16", **FAST}).json()
    assert 0 <= out["seed"] <= limits.MAX_SEED and len(out["data"]) == 1


def test_edit_keeps_the_input_size_or_takes_the_requested_one(client):
    files = {"image": ("in.png", png_bytes(48, 32), "image/png")}
    r = client.post("/v1/images/edits", files=files, data={"prompt": "make it blue", "steps": "2", "seed": "1"})
    assert r.status_code == 200, r.text
    assert [png_size(d["b64_json"]) for d in r.json()["data"]] == [(48, 32)]
    files = {"image": ("in.jpg", png_bytes(50, 30, "JPEG"), "image/jpeg")}
    data = {"prompt": "make it blue", "steps": "2", "size": "32x32", "n": "2", "image_guidance_scale": "1.5"}
    r = client.post("/v1/images/edits", files=files, data=data)
    assert r.status_code == 200, r.text
    assert [png_size(d["b64_json"]) for d in r.json()["data"]] == [(32, 32), (32, 32)]


def test_stream_sends_progress_previews_then_the_final_image(client):
    with client.stream("POST", "/v1/images/generations/stream",
                       json={"prompt": "a red circle", "size": "64x32", "seed": 3, **FAST}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev = events(r.iter_lines())
    names = [n for n, _ in ev]
    assert names[:2] == ["queued", "started"] and names[-1] == "final"
    assert names.count("final") == 1 and "error" not in names
    total = 4 * 2
    assert ev[1][1] == {"total": total}
    steps = [d["step"] for n, d in ev if n == "progress"]
    assert steps == list(range(1, total + 1))
    previews = [(i, d) for i, (n, d) in enumerate(ev) if n == "preview"]
    assert previews, "no preview event"
    for i, d in previews:
        assert ev[i - 1] == ("progress", {"step": d["step"], "total": total})  # each preview follows its progress
        assert d["step"] < total and [png_size(b) for b in d["images"]] == [(64, 32)]
    assert previews[0][1]["images"] != previews[-1][1]["images"]  # the picture fills in
    final = ev[-1][1]
    assert final["seed"] == 3 and [png_size(d["b64_json"]) for d in final["data"]] == [(64, 32)]
    plain = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": "64x32", "seed": 3, **FAST})
    assert plain.json()["data"] == final["data"]  # streaming changes nothing about the result


def test_edit_stream(client):
    files = {"image": ("in.png", png_bytes(32, 32), "image/png")}
    data = {"prompt": "make it blue", "steps": "2"}
    with client.stream("POST", "/v1/images/edits/stream", files=files, data=data) as r:
        assert r.status_code == 200
        ev = events(r.iter_lines())
    assert [n for n, _ in ev][-1] == "final" and any(n == "preview" for n, _ in ev)
    assert [png_size(d["b64_json"]) for d in ev[-1][1]["data"]] == [(32, 32)]


def test_page_and_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/app.js" in r.text and "/app.css" in r.text
    assert "/v1/images/generations/stream" in client.get("/app.js").text
    assert client.get("/app.css").headers["content-type"].startswith("text/css")


# ---- limits and bad input ----------------------------------------------------------------------------------------
LONG = "x" * (limits.MAX_PROMPT_CHARS + 1)


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 400, ["prompt is empty"]),
    ({"prompt": "   "}, 400, ["prompt is empty"]),
    ({"prompt": LONG}, 400, ["prompt", "characters", str(limits.MAX_PROMPT_CHARS)]),
    ({"prompt": "a", "negative_prompt": LONG}, 400, ["negative_prompt", "characters"]),
    ({"prompt": "a <image> b"}, 400, ["<image>"]),
    ({"prompt": "a", "size": "65x64"}, 400, ["multiple of 16"]),
    ({"prompt": "a", "size": "0x64"}, 400, ["multiple of 16"]),
    ({"prompt": "a", "size": "65x64", "stream": True}, 400, ["multiple of 16"]),  # before a stream starts: JSON
    ({"prompt": " ", "stream": True, "partial_images": 2}, 400, ["prompt is empty"]),
    ({"prompt": "a", "size": "1024x512"}, 400, ["1024", f"limit of {limits.MAX_SIZE}"]),
    ({"prompt": "a", "size": "512"}, 400, ["WIDTHxHEIGHT"]),
    ({"prompt": "a", "size": "-16x16"}, 400, ["WIDTHxHEIGHT"]),
    ({"prompt": "a", "n": 0}, 400, ["n must be in [1, 4]"]),
    ({"prompt": "a", "n": limits.MAX_N + 1}, 400, ["n must be in"]),
    ({"prompt": "a", "steps": 0}, 400, ["steps must be in"]),
    ({"prompt": "a", "steps": limits.MAX_STEPS + 1}, 400, ["steps must be in"]),
    ({"prompt": "a", "steps": 1}, 400, ["sde", ">= 2"]),
    ({"prompt": "a", "guidance_scale": -1}, 400, ["guidance_scale"]),
    ({"prompt": "a", "guidance_scale": 1e6}, 400, ["guidance_scale"]),
    ({"prompt": "a", "time_shift": 0}, 400, [f"time_shift must be in (0, {MAX_TIME_SHIFT:g}]"]),
    ({"prompt": "a", "seed": -1}, 400, ["seed"]),
    ({"prompt": "a", "seed": 2**40}, 400, ["seed"]),
    ({"prompt": "a", "n": 0, "steps": 0}, 400, ["n must be in", "steps must be in"]),  # every bound, at once
    ({"prompt": "a", "n": "2", "steps": 0}, 422, ["'n'", "integer"]),  # a wrong type first, alone
    ({"prompt": "a", "sampler": "euler"}, 400, ["sampler must be one of"]),
    ({"prompt": "a", "noise_level": 1.5}, 400, ["noise_level must be in"]),
    ({"prompt": "a", "parallel": 0}, 400, ["parallel must be in"]),
    ({"prompt": "a", "parallel": 2}, 400, ["parallel must be at most 1 for this model"]),  # the model's trained limit
    ({"prompt": "a", "response_format": "url"}, 400, ["'url' is not supported", "b64_json"]),
    ({"prompt": "a", "output_format": "jpeg"}, 400, ["output_format 'jpeg' is not supported", "png"]),
    ({"prompt": "a", "background": "transparent"}, 400, ["background 'transparent'", "opaque"]),
    ({"prompt": "a", "output_compression": 101}, 400, ["output_compression must be in [0, 100]"]),
    ({"prompt": "a", "partial_images": 4}, 400, [f"partial_images must be in [0, {limits.MAX_PARTIAL_IMAGES}]"]),
    ({"prompt": "a", "model": "m" * (limits.MAX_LABEL_CHARS + 1)}, 400, ["model is", "characters"]),
    ({"prompt": "a", "stream": "yes"}, 422, ["'stream'", "boolean"]),
    ({}, 422, ["missing required field 'prompt'"]),
    ({"prompt": 5}, 422, ["'prompt'", "string"]),
    ({"prompt": "a", "n": "2"}, 422, ["'n'", "integer"]),
    ({"prompt": "a", "n": 1.5}, 422, ["'n'", "integer"]),
    ({"prompt": "a", "n": True}, 422, ["'n'", "integer"]),
    ({"prompt": "a", "guidance_scale": "high"}, 422, ["'guidance_scale'"]),
    ({"prompt": "a", "size": [64, 64]}, 422, ["'size'"]),
    ({"prompt": "a", "frame_count": 2}, 422, ["unknown field 'frame_count'"]),
    ({"prompt": "a", "image_guidance_scale": 2}, 422, ["unknown field 'image_guidance_scale'"]),
    ({"prompt": "a", "image": "/etc/passwd"}, 422, ["unknown field 'image'"]),
])
def test_generation_limits(client, body, status, words):
    assert_error(client.post("/v1/images/generations", json=body), status, *words)
    assert_error(client.post("/v1/images/generations/stream", json=body), status, *words)


@pytest.mark.parametrize("content, words", [
    (b"{not json", ["not valid JSON"]),
    (b"", ["not valid JSON"]),
    (b'{"prompt": "a", "guidance_scale": NaN}', ["not valid JSON"]),
    (b"[1, 2]", ["must be a JSON object"]),
    (b'"a red circle"', ["must be a JSON object"]),
    (b"\xff\xfe", ["not valid JSON"]),
])
def test_malformed_json(client, content, words):
    r = client.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400, *words)


def test_json_body_too_large(client):
    r = client.post("/v1/images/generations", content=b" " * (limits.MAX_JSON_BYTES + 1),
                    headers={"content-type": "application/json"})
    assert_error(r, 413, str(limits.MAX_JSON_BYTES))


def test_edit_upload_limits(client, monkeypatch):
    def edit(files=None, data=None, **kw):
        return client.post("/v1/images/edits", files=files, data=data or {"prompt": "make it blue", **FAST}, **kw)

    huge = b"\x89PNG" + b"\0" * limits.MAX_UPLOAD_BYTES
    assert_error(edit({"image": ("big.png", huge, "image/png")}), 413, "limit")
    assert_error(edit({"image": ("a.txt", b"hello, not an image", "text/plain")}), 400, "not a readable image")
    assert_error(edit({"image": ("a.png", png_bytes(32, 32)[:40], "image/png")}), 400, "not a readable image")
    assert_error(edit({"image": ("a.png", b"", "image/png")}), 400, "empty")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # a decoder we do not allow (runs Ghostscript)
    assert_error(edit({"image": ("a.eps", eps, "application/postscript")}), 400, "not a readable image")
    assert_error(edit({"other": ("a.png", png_bytes(32, 32), "image/png")}), 422, "unknown file field 'other'")
    assert_error(edit({"image": (None, "/etc/hosts")}), 400, "must be a file upload")
    assert_error(client.post("/v1/images/edits", data={"prompt": "x"}), 415, "multipart/form-data")
    assert_error(client.post("/v1/images/edits", json={"prompt": "x"}), 415, "multipart/form-data")
    files = {"image": ("a.png", png_bytes(32, 32), "image/png")}
    assert_error(edit(files, {"steps": "2"}), 422, "missing required field 'prompt'")
    assert_error(edit(files, {"prompt": "x", "steps": "two"}), 422, "'steps'", "integer")
    assert_error(edit(files, {"prompt": "x", "image_guidance_scale": "-1"}), 400, "image_guidance_scale")
    assert_error(edit(files, {"prompt": "x", "n": "0"}), 400, f"n must be in [1, {limits.MAX_N}], got 0")
    assert_error(edit(files, {"prompt": "x", "guidance_scale": "nan"}), 422, "guidance_scale")
    assert_error(edit(files, {"prompt": "x <image> <image>"}), 400, "<image>")
    odd = {"image": ("a.png", png_bytes(40, 30), "image/png")}
    assert_error(edit(odd), 400, "input image is 40x30", "pass size")
    monkeypatch.setattr(parsing, "MAX_INPUT_PIXELS", 32 * 32 - 1)
    assert_error(edit(files), 400, "32x32 pixels")


def test_deeply_nested_json_is_a_400_not_a_crash(client):
    """Nesting past the parser's stack used to escape as a RecursionError: a 500 text page."""
    deep = b"[" * 20000 + b"]" * 20000  # within MAX_JSON_BYTES, deeper than json's recursion limit
    inside = b'{"prompt": ' + b"[" * 100 + b"]" * 100 + b"}"  # parses, but no request field nests
    for content in (deep, inside):
        for path in ("/v1/images/generations", "/v1/images/generations/stream"):
            r = client.post(path, content=content, headers={"content-type": "application/json"})
            assert_error(r, 400, f"more than {limits.MAX_JSON_DEPTH} deep")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_json_routes_take_only_json(client, content_type):
    """A web page may send these content types to any site without a CORS preflight, so they start nothing."""
    before = client.get("/health").json()["stats"]
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/images/generations", "/v1/images/generations/stream"):
        r = client.post(path, content=b'{"prompt": "a", "size": "16x16", "steps": 2}', headers=headers)
        assert_error(r, 415, "application/json")
        assert r.json()["error"]["code"] == "unsupported_media_type"
    assert client.get("/health").json()["stats"] == before


def test_edit_takes_one_image_and_a_mask_with_alpha(client):
    one = png_bytes(32, 32)
    data = {"prompt": "make it blue", "steps": "2", "size": "16x16"}
    r = client.post("/v1/images/edits", files=[("image[]", ("a.png", one, "image/png"))], data=data)
    assert r.status_code == 200, r.text  # OpenAI's clients send a list of images as "image[]"
    for two in ([("image[]", ("a.png", one, "image/png")), ("image[]", ("b.png", one, "image/png"))],
                [("image", ("a.png", one, "image/png")), ("image[]", ("b.png", one, "image/png"))],
                [("image", ("a.png", one, "image/png")), ("image", ("b.png", one, "image/png"))]):
        r = client.post("/v1/images/edits", files=two, data=data)
        assert_error(r, 400, "got 2 images", "one image per request")
        assert r.json()["error"]["param"] == "image"
    mask = [("image", ("a.png", one, "image/png")), ("mask", ("m.png", one, "image/png"))]
    r = client.post("/v1/images/edits", files=mask, data=data)  # an RGB mask: OpenAI's masks mark edits with alpha
    assert_error(r, 400, "no alpha channel", "alpha 0")
    assert r.json()["error"]["param"] == "mask"


def test_openai_fields_are_accepted(client):
    """What OpenAI's clients send: read and ignored, or checked (schemas.OpenAIFields)."""
    body = {"prompt": "a red circle", "size": "32x16", "seed": 4, **FAST}
    openai = {"model": "gpt-image-1", "quality": "hd", "style": "vivid", "user": "u1", "safety_identifier": "s",
              "moderation": "low", "complexity": "low", "background": "opaque", "output_format": "png",
              "output_compression": 80, "partial_images": 2, "stream": False, "response_format": "b64_json", "n": 1}
    plain = client.post("/v1/images/generations", json=body).json()
    r = client.post("/v1/images/generations", json={**body, **openai})
    assert r.status_code == 200, r.text
    assert r.json()["data"] == plain["data"]  # none of them changes the image
    auto = client.post("/v1/images/generations", json={"prompt": "a", "size": "auto", "n": None, **FAST}).json()
    default = client.get("/health").json()["defaults"]["size"]
    assert auto["size"] == default and png_size(auto["data"][0]["b64_json"]) == tuple(map(int, default.split("x")))
    with client.stream("POST", "/v1/images/generations/stream", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and events(r.iter_lines())[-1][0] == "final"


def test_openai_stream_on_the_wire(client):
    """stream=true on the plain routes: OpenAI's events, each named by its type, nothing else (no queued, started,
    progress or [DONE]); the completed event carries the plain answer's image, usage and seed."""
    body = {"prompt": "a red circle", "size": "64x32", "seed": 3, **FAST}
    with client.stream("POST", "/v1/images/generations", json={**body, "stream": True, "partial_images": 3}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    ev = events(lines)
    assert all(line.startswith(("event: ", "data: ")) or not line for line in lines)
    assert [n for n, _ in ev] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert all(d["type"] == n for n, d in ev)
    common = {"size": "64x32", "quality": "auto", "background": "opaque", "output_format": "png"}
    for i, (_, d) in enumerate(ev[:3]):
        assert set(d) == {"type", "b64_json", "created_at", "partial_image_index", *common}
        assert d["partial_image_index"] == i and d.items() >= common.items() and png_size(d["b64_json"]) == (64, 32)
    plain = client.post("/v1/images/generations", json=body).json()
    done = ev[-1][1]
    assert set(done) == {"type", "b64_json", "created_at", "usage", "seed", *common} and done.items() >= common.items()
    assert (done["b64_json"], done["usage"], done["seed"]) == (plain["data"][0]["b64_json"], plain["usage"], 3)
    files = {"image": ("in.png", png_bytes(32, 32), "image/png")}
    with client.stream("POST", "/v1/images/edits", files=files,
                       data={"prompt": "make it blue", "stream": "true", "partial_images": "1", **FAST}) as r:
        assert [n for n, _ in events(r.iter_lines())] == ["image_edit.partial_image", "image_edit.completed"]


def test_partial_steps_are_evenly_spaced_and_never_the_last_token():
    from nextstep.serve.worker import partial_steps

    assert partial_steps(1024, 3) == {256, 512, 768} and partial_steps(8, 2) == {3, 5}
    assert partial_steps(4, 3) == {1, 2, 3} and partial_steps(2, 3) == {1} and partial_steps(1, 3) == set()
    assert partial_steps(16, 0) == set()


def test_response_has_created_size_and_usage(client, pipe):
    out = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "size": "48x32", **FAST}).json()
    assert isinstance(out["created"], int) and out["size"] == "48x32" and out["output_format"] == "png"
    prompt = parsing._prompt_rows(pipe, parsing.GenerationRequest(prompt="a red circle"),
                                  pipe.defaults.resolve(False), (48, 32), edit=False)[0]
    tokens = 2 * 3 * 2  # n * (32/16) * (48/16)
    assert out["usage"] == {"input_tokens": len(prompt), "output_tokens": tokens, "total_tokens": len(prompt) + tokens,
                            "input_tokens_details": {"text_tokens": len(prompt), "image_tokens": 0},
                            "output_tokens_details": {"text_tokens": 0, "image_tokens": tokens}}
    files = {"image": ("in.png", png_bytes(32, 32), "image/png")}
    edit = client.post("/v1/images/edits", files=files, data={"prompt": "make it blue", "steps": "2"}).json()
    assert edit["usage"]["input_tokens_details"]["image_tokens"] == 4  # the input image, at the output size
    assert edit["usage"]["output_tokens"] == 4


def test_size_beyond_the_context_is_refused_at_request_time(pipe, monkeypatch):
    """The model's positions must hold the prompt and the image: refused before queueing, with the largest size that
    fits, which then works; the worker sees no failure."""
    monkeypatch.setattr(pipe.model.config.transformer, "max_position_embeddings", 100)
    with local(create_app(pipe, queue_size=2)) as c:
        body = {"prompt": "a red circle", "size": "256x256", **FAST}
        r = c.post("/v1/images/generations", json=body)
        assert_error(r, 400, "size 256x256 needs", "model holds 100", "the largest square size for this prompt is")
        assert r.json()["error"]["param"] == "size" and r.json()["error"]["code"] == "context_length_exceeded"
        side = int(r.json()["error"]["message"].split("is ")[-1].split("x")[0])
        assert side % 16 == 0 and side > 0
        assert c.post("/v1/images/generations", json={**body, "size": f"{side}x{side}"}).status_code == 200
        assert_error(c.post("/v1/images/generations", json={**body, "size": f"{side + 16}x{side + 16}"}), 400, "needs")
        files = {"image": ("in.png", png_bytes(128, 128), "image/png")}  # an edit's input image counts too
        assert_error(c.post("/v1/images/edits", files=files, data={"prompt": "make it blue"}), 400, "size 128x128")
        long_prompt = "a red circle left of a blue square " * 20
        r = c.post("/v1/images/generations", json={**body, "prompt": long_prompt, "size": "16x16"})
        assert_error(r, 400, "no size fits", "shorten the prompt")
        assert c.get("/health").json()["stats"] == {"completed": 1, "failed": 0, "cancelled": 0, "rejected": 0}


def test_openapi_schema_is_served_and_docs_are_not(client):
    """The schema is the API's reference (README links it); no /docs page, whose Swagger UI loads from a CDN."""
    schema = client.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/images/edits", "/health"} <= set(schema["paths"])
    assert_error(client.get("/docs"), 404)


def test_unexpected_errors_answer_json(pipe, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("nextstep.serve.routes.build_job_kwargs", broken)
    with TestClient(create_app(pipe), base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a"})
    assert_error(r, 500, "RuntimeError", "server log")


# ---- who may call the server -------------------------------------------------------------------------------------
@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("LOCALHOST", True), ("[::1]:8000", True),
    ("127.0.0.2", True), ("gpu-box:8000", True), ("studio.example:443", True),  # bound host; an allowed origin's
    ("evil.example:8000", False), ("0.0.0.0:8000", False), ("", False), ("a@127.0.0.1", False),
    ("127.0.0.1:notaport", False), ("127.0.0.1/x", False),
])
def test_host_header_is_checked(pipe, host, ok):
    """DNS rebinding: a page on evil.example that re-points its name at 127.0.0.1 still sends its own name."""
    access = Access(allow_origins=("https://studio.example",), bound_host="gpu-box")
    with local(create_app(pipe, access=access)) as c:
        r = c.get("/health", headers={"host": host})
        if ok:
            assert r.status_code == 200, r.text
        else:
            assert_error(r, 403, "is not one of this server's names", "--allow-origin")
            assert r.json()["error"]["code"] == "host_not_allowed"
            assert_error(c.post("/v1/images/generations", json={"prompt": "a"}, headers={"host": host}), 403)


@pytest.mark.parametrize("origin, ok", [
    ("http://127.0.0.1:8000", True),  # the page this server serves
    ("http://127.0.0.1:8000/", True),
    ("https://studio.example", True), ("https://studio.example:443", True),  # allowed explicitly
    ("http://127.0.0.1:3000", False),  # another local web app
    ("http://localhost:8000", False),  # another name: another origin, even on this machine
    ("https://127.0.0.1:8000", True),  # same host and port behind TLS
    ("http://evil.example", False), ("null", False), ("", False), ("https://studio.example:8443", False),
])
def test_origin_is_checked(pipe, origin, ok):
    app = create_app(pipe, queue_size=2, access=Access(allow_origins=("https://studio.example",)))
    with local(app) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a", "size": "16x16", **FAST}, headers={"origin": origin})
        if ok:
            assert r.status_code == 200, r.text
        else:
            assert_error(r, 403, "not allowed", "--allow-origin")
            assert r.json()["error"]["code"] == "origin_not_allowed"
            assert app.state.worker.stats["completed"] == 0


def test_allowed_origin_gets_cors(pipe):
    """A page on an allowed origin can call the API from the browser: preflight answered, responses readable."""
    with local(create_app(pipe, access=Access(allow_origins=("https://studio.example",), api_key="k"))) as c:
        pre = c.options("/v1/images/generations", headers={
            "origin": "https://studio.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://studio.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = c.get("/health", headers={"origin": "https://studio.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://studio.example"
        r = c.get("/health", headers={"origin": "http://127.0.0.1:8000", "authorization": "Bearer k"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # same origin needs none


def test_api_key(pipe):
    key = "s3cret-key"
    with local(create_app(pipe, queue_size=2, access=Access(api_key=key))) as c:
        body = {"prompt": "a", "size": "16x16", **FAST}
        for auth in (None, "Bearer wrong", f"Basic {key}", key, "Bearer ", f"Bearer {key}x"):
            headers = {"authorization": auth} if auth is not None else {}
            for r in (c.get("/health", headers=headers),
                      c.post("/v1/images/generations", json=body, headers=headers),
                      c.post("/v1/images/generations/stream", json=body, headers=headers),
                      c.post("/v1/images/edits", files={"image": ("a.png", png_bytes(16, 16), "image/png")},
                             data={"prompt": "x"}, headers=headers)):
                assert_error(r, 401, "API key", "Authorization: Bearer")
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        good = {"authorization": f"Bearer {key}"}
        assert c.get("/health", headers=good).status_code == 200
        assert c.post("/v1/images/generations", json=body, headers=good).status_code == 200
        assert c.get("/").status_code == 200 and c.get("/app.js").status_code == 200  # the page asks for the key
        schema = c.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert c.get("/health").json()["error"]["type"] == "authentication_error"


def test_access_settings_are_checked():
    assert normalize_origin("HTTP://Studio.Example:80/") == "http://studio.example"
    assert normalize_origin("https://[::1]:8443") == "https://[::1]:8443"
    for bad in ("studio.example", "ftp://studio.example", "http://studio.example/app", "http://", "null",
                "http://a@studio.example", "http://studio.example:99999"):
        with pytest.raises(ValueError, match="allowed origin"):
            Access(allow_origins=(bad,))
    with pytest.raises(ValueError, match="empty"):
        Access(api_key=" ")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "gpu-box"])
def test_serve_refuses_a_public_address_without_a_key(tmp_path, host):
    """Checked before the model loads (a missing model would otherwise be the error)."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="without an API key.*--public-without-key"):
        serve(missing, host=host, port=0)
    with pytest.raises(FileNotFoundError):
        serve(missing, host=host, port=0, api_key="k")
    with pytest.raises(FileNotFoundError):
        serve(missing, host=host, port=0, public_without_key=True)
    with pytest.raises(FileNotFoundError):
        serve(missing, host="::1", port=0)


def test_cli_serve_flags(monkeypatch, capsys):
    """The key comes from --api-key or NEXTSTEP_API_KEY (read by the CLI only); a public bind without one fails."""
    from nextstep import cli
    from nextstep.serve import runner

    calls = []
    monkeypatch.setattr(runner, "serve", lambda *a, **kw: calls.append(kw))
    monkeypatch.setenv("NEXTSTEP_API_KEY", "from-env")
    assert cli.main(["serve", "--allow-origin", "https://a.example", "--allow-origin", "http://b.example:8080"]) == 0
    assert calls[-1]["api_key"] == "from-env" and calls[-1]["public_without_key"] is False
    assert calls[-1]["allow_origins"] == ["https://a.example", "http://b.example:8080"]
    assert cli.main(["serve", "--api-key", "from-flag", "--host", "0.0.0.0", "--public-without-key"]) == 0
    assert calls[-1]["api_key"] == "from-flag" and calls[-1]["public_without_key"] is True
    monkeypatch.undo()
    monkeypatch.delenv("NEXTSTEP_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_malformed_multipart(client):
    r = client.post("/v1/images/edits", content=b"--xyz\r\nnonsense",
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_routes_answer_json(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/v1/images/generations"), 405)


# ---- the queue ---------------------------------------------------------------------------------------------------
def test_full_queue_answers_429(pipe):
    gated = Gated(pipe)
    body = {"prompt": "a", "size": "16x16", **FAST}
    with local(create_app(gated, queue_size=1)) as c, ThreadPoolExecutor(2) as pool:
        running = pool.submit(c.post, "/v1/images/generations", json=body)
        assert gated.started.wait(15)
        waiting = pool.submit(c.post, "/v1/images/generations", json=body)
        wait_until(lambda: c.get("/health").json()["queue"]["waiting"] == 1, what="the second job to queue")
        assert c.get("/health").json()["queue"] == {"depth": 2, "waiting": 1, "running": True, "batch": 1,
                                                    "capacity": 1}
        busy = c.post("/v1/images/generations", json=body)
        assert_error(busy, 429, "busy", "retry")
        assert busy.headers["retry-after"] == str(limits.RETRY_AFTER_S)
        assert_error(c.post("/v1/images/generations/stream", json=body), 429, "busy")
        files = {"image": ("a.png", png_bytes(16, 16), "image/png")}
        assert_error(c.post("/v1/images/edits", files=files, data={"prompt": "x"}), 429)
        gated.release.set()
        assert running.result(30).status_code == 200 and waiting.result(30).status_code == 200
        h = c.get("/health").json()
        assert h["stats"] == {"completed": 2, "failed": 0, "cancelled": 0, "rejected": 3}
        assert h["queue"]["depth"] == 0


class HoldAtFirstToken(AtToken):
    """The pipeline, held after its first image token (progress already sent) until released."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.held, self.release = threading.Event(), threading.Event()

    def at(self, step: int) -> None:
        if step == 1:
            self.held.set()
            assert self.release.wait(30), "test never released the hold"


def test_disconnect_cancels_and_frees_the_worker(pipe):
    held = HoldAtFirstToken(pipe)
    app = create_app(held, queue_size=2)
    worker = app.state.worker
    body = {"prompt": "a", "size": "64x64", **FAST}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        # streaming: read up to the first progress event, then hang up
        with http.stream("POST", "/v1/images/generations/stream", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("event: progress"):
                    break
        assert held.held.wait(15)
        wait_until(lambda: worker.running and worker.running[0].cancelled.is_set(), what="stream cancel")
        held.release.set()
        wait_until(lambda: worker.stats["cancelled"] == 1 and not worker.running, what="the worker to free up")
        # non-streaming: the client gives up before the answer
        held.held.clear()
        held.release.clear()
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/images/generations", json=body, timeout=httpx.Timeout(30, read=1.0))
        assert held.held.wait(15)
        wait_until(lambda: worker.running and worker.running[0].cancelled.is_set(), what="plain cancel")
        held.release.set()
        wait_until(lambda: worker.stats["cancelled"] == 2 and not worker.running, what="the worker to free up")
        r = http.post("/v1/images/generations", json={**body, "size": "32x32"})
        assert r.status_code == 200 and png_size(r.json()["data"][0]["b64_json"]) == (32, 32)
        h = http.get("/health").json()
        assert h["stats"] == {"completed": 1, "failed": 0, "cancelled": 2, "rejected": 0}
        assert h["queue"]["depth"] == 0


def test_openai_stream_disconnect_cancels_and_frees_the_worker(pipe):
    held = HoldAtFirstToken(pipe)
    app = create_app(held, queue_size=2)
    worker = app.state.worker
    body = {"prompt": "a", "size": "64x64", "stream": True, "partial_images": 2, **FAST}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/images/generations", json=body) as r:  # hang up once it has started
            assert r.status_code == 200 and held.held.wait(15)
        wait_until(lambda: worker.running and worker.running[0].cancelled.is_set(), what="stream cancel")
        held.release.set()
        wait_until(lambda: worker.stats["cancelled"] == 1 and not worker.running, what="the worker to free up")
        assert http.get("/health").json()["queue"]["depth"] == 0


def test_load_20_concurrent_requests(pipe):
    """20 clients at once on a real server (loopback only): each gets its images or a 429; none is lost."""
    app = create_app(pipe, queue_size=4)

    def one(i: int):
        body = {"prompt": f"shape {i}", "size": "32x16", "seed": i, **FAST}
        with httpx.Client(base_url=url, timeout=60) as http:
            if i % 4:
                r = http.post("/v1/images/generations", json=body)
                return r.status_code, r.json()
            with http.stream("POST", "/v1/images/generations/stream", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return r.status_code, r.json()
                return 200, events(r.iter_lines())[-1][1]

    with running_server(app) as url, ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20), timeout=120))
        health = httpx.get(f"{url}/health", timeout=10).json()
    assert len(results) == 20
    ok = [body for status, body in results if status == 200]
    busy = [body for status, body in results if status == 429]
    assert len(ok) + len(busy) == 20, [s for s, _ in results]
    assert len(ok) >= 5  # the running job and a full queue at least
    for body in ok:
        assert [png_size(d["b64_json"]) for d in body["data"]] == [(32, 16)]
    for body in busy:
        assert body["error"]["type"] == "queue_full"
    assert health["status"] == "ok" and health["queue"]["depth"] == 0
    assert health["stats"] == {"completed": len(ok), "failed": 0, "cancelled": 0, "rejected": len(busy)}


class Failing(Wrapped):
    """The pipeline, failing once it has started (as a CUDA out-of-memory would)."""

    def __init__(self, pipe, error: Exception):
        super().__init__(pipe)
        self.error = error

    def _generate(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("error, status", [
    (InputError("bad"), 400),  # the pipeline's verdict on the request: the client reads what to fix
    (ValueError("internal"), 500),  # any other error is the server's, whatever its type
    (ConfigError("internal: the model config is broken"), 500),
    (RuntimeError("out of memory"), 500),
])
def test_generation_failures_are_reported(pipe, caplog, error, status):
    caplog.set_level(logging.ERROR, logger="nextstep.serve")
    body = {"prompt": "a", "size": "16x16", **FAST}
    with local(create_app(Failing(pipe, error), queue_size=1)) as c:
        plain = c.post("/v1/images/generations", json=body)
        with c.stream("POST", "/v1/images/generations/stream", json=body) as r:
            assert r.status_code == 200
            ev = events(r.iter_lines())
        with c.stream("POST", "/v1/images/generations", json={**body, "stream": True, "partial_images": 1}) as r:
            assert r.status_code == 200
            openai_ev = events(r.iter_lines())
        assert [n for n, _ in ev] == ["queued", "started", "error"]
        assert c.get("/health").json()["stats"]["failed"] == 3
        assert c.get("/health").json()["queue"]["depth"] == 0
    if status == 400:
        assert_error(plain, 400, str(error))
    else:  # the type says what kind of failure; the details (paths, internals) stay in the log
        assert_error(plain, 500, type(error).__name__, "server log")
        assert str(error) not in plain.json()["error"]["message"]
    assert ev[-1][1] == plain.json()  # the stream ends with the same error
    assert openai_ev == [("error", {"type": "error", **plain.json()})]  # OpenAI's clients raise it as APIError
    logged = [rec for rec in caplog.records if rec.name == "nextstep.serve" and rec.exc_info]
    assert [rec.exc_info[1] for rec in logged] == ([error] * 3 if status == 500 else [])


def test_openapi_schema_shows_the_limits(client):
    """The bounds live in the request schemas, so API clients see them without reading the docs."""
    paths = client.app.openapi()["paths"]

    def fields(path: str, content: str) -> dict[str, dict]:
        """Each field's schema, the non-null alternative of an optional one."""
        props = paths[path]["post"]["requestBody"]["content"][content]["schema"]["properties"]
        return {k: next(a for a in p.get("anyOf", [p]) if a.get("type") != "null") for k, p in props.items()}

    for path in ("/v1/images/generations", "/v1/images/generations/stream"):
        gen = fields(path, "application/json")
        assert gen["n"] | {"minimum": 1, "maximum": limits.MAX_N} == gen["n"]
        assert gen["steps"] | {"minimum": 1, "maximum": limits.MAX_STEPS} == gen["steps"]
        assert gen["guidance_scale"] | {"minimum": 0, "maximum": MAX_GUIDANCE_SCALE} == gen["guidance_scale"]
        assert gen["time_shift"] | {"exclusiveMinimum": 0, "maximum": MAX_TIME_SHIFT} == gen["time_shift"]
        assert gen["seed"] | {"minimum": 0, "maximum": limits.MAX_SEED} == gen["seed"]
        assert gen["prompt"] | {"minLength": 1, "maxLength": limits.MAX_PROMPT_CHARS} == gen["prompt"]
        assert gen["negative_prompt"]["maxLength"] == limits.MAX_PROMPT_CHARS
    edit = fields("/v1/images/edits", "multipart/form-data")
    assert edit["image_guidance_scale"] | {"minimum": 0, "maximum": MAX_GUIDANCE_SCALE} == edit["image_guidance_scale"]
    assert edit["n"]["maximum"] == limits.MAX_N and edit["image"]["format"] == "binary"


def test_serve_refuses_a_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        serve(tmp_path / "no-such-model", port=0)


# ---- what a new user met --------------------------------------------------------------------------------------
def test_health_keys_are_the_documented_ones(client):
    """docs/server.md's /health row names every key /health answers with (it said "counters" for ``stats``)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `GET /health`"))
    h = client.get("/health").json()
    assert [k for k in h if f"`{k}`" not in row] == []
    assert h["model"]["trained_sizes"] == [] and "`trained_sizes`" in row  # the fixture model's are not known


def test_health_lists_the_sizes_the_model_was_trained_at_and_size_advice_is_the_pipelines(bundled_pipe):
    """The bundled model was trained at 64x64; its 512 positions hold no 512x512 image: the 400 names
    ``pipe.largest_square`` (the CLI's advice too)."""
    settings = bundled_pipe.resolve_settings(False)
    side = bundled_pipe.largest_square("a red circle", settings, edit=False, max_side=limits.MAX_SIZE)
    with local(create_app(bundled_pipe)) as c:
        assert c.get("/health").json()["model"]["trained_sizes"] == ["64x64"]
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": "512x512"})
    assert_error(r, 400, f"the largest square size for this prompt is {side}x{side}")


def test_favicon_is_served(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert 'rel="icon"' in client.get("/").text


def test_blank_prompts_get_the_pipelines_words(client, pipe):
    """One rule for the CLI, the Python API and the server (``prompt.require_prompt``)."""
    with pytest.raises(InputError) as e:
        pipe(" ", progress=False)
    r = client.post("/v1/images/generations", json={"prompt": " "})
    assert r.status_code == 400 and r.json()["error"]["message"] == str(e.value)
