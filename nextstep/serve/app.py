"""The HTTP server: one model in memory, one worker thread, a bounded queue, an OpenAI-style images API.

Endpoints
    GET  /                                   the single-page UI (static files held in memory)
    GET  /health                             status, model info, queue depth, limits, counters
    POST /v1/images/generations              JSON in, ``{"created", "seed", "data": [{"b64_json": PNG}]}`` out
    POST /v1/images/edits                    multipart/form-data: ``image`` file + the same fields as text
    POST /v1/images/generations/stream       same input; Server-Sent Events out (see below)
    POST /v1/images/edits/stream             same input as edits; Server-Sent Events out

Request fields (JSON types; multipart sends them as text): ``prompt`` (str, required), ``n`` (int, 1..MAX_N),
``size`` ("WxH", multiples of the model's 16-pixel token, at most MAX_SIZE a side; default: the model's native
size capped at MAX_SIZE, or for edits the input image's size), ``response_format`` ("b64_json" only),
``negative_prompt`` (str), ``steps`` (int, 1..MAX_STEPS; the "sde" sampler needs >= 2), ``guidance_scale``
(0..MAX_GUIDANCE), ``seed`` (int 0..MAX_SEED; omitted: drawn at random and returned), ``sampler``
("sde" | "ode" | "heun"), ``time_shift`` (0 < s <= MAX_TIME_SHIFT); edits add ``image_guidance_scale``.
Sampling settings left out take the model's defaults (``GET /health`` lists them). Unknown fields are rejected.

Stream events, in order: ``queued`` {position: jobs ahead}, ``started`` {total}, then per image token
``progress`` {step, total} and every few tokens ``preview`` {step, total, images: [b64 PNG]} (tokens not yet
generated are zeros, the mean of the normalised latent space: a plain area in the preview), then exactly one of
``final`` (the same object as the non-streaming response) or ``error`` {error: {message, type}}; then the stream
ends. Closing the connection cancels the generation (it stops at the next image token, the worker moves on).

Errors are ``{"error": {"message": ..., "type": ...}}`` with:
    400 invalid_request_error  body is not valid JSON / not an object / not valid multipart; a value outside the
                               limits or not supported (size, n, steps, prompt, response_format "url", ...); the
                               upload is not a readable image
    413 request_too_large      body over MAX_JSON_BYTES, or upload over MAX_UPLOAD_BYTES
    422 validation_error       a required field is missing, a field is unknown, or a value has the wrong type
    429 queue_full             QUEUE_SIZE requests are already waiting; retry later
    404 not_found, 405 method_not_allowed
    500 server_error           the generation itself failed (the message says how)
    503 cancelled              the server shut down before the request finished (or the client left)
No field names a path: nothing a request sends is read from or written to disk (uploads stay in memory).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import logging
import queue
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import torch
from PIL import Image, UnidentifiedImageError

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, ValidationError
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"the server needs the 'serve' extra: pip install 'nextstep[serve]' ({e})") from None

from ..images import to_pil, to_unit
from ..pipeline import NextStepPipeline
from ..prompt import IMAGE_TAG
from ..sampling.flow import SAMPLERS

# ---- limits (every one is enforced with a 4xx JSON error that names it) -----------------------------------------
MAX_SIZE = 512  # pixels per side
MAX_N = 4  # images per request
MAX_STEPS = 100  # flow steps per image token
MAX_GUIDANCE = 30.0  # text and image guidance scales, each in [0, MAX_GUIDANCE]
MAX_TIME_SHIFT = 20.0
MAX_SEED = 2**32 - 1  # exact in JavaScript numbers
MAX_PROMPT_CHARS = 2000  # prompt and negative prompt, each
MAX_JSON_BYTES = 64 * 1024  # JSON request bodies
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # the edit input image file
MAX_FORM_BYTES = MAX_UPLOAD_BYTES + 64 * 1024  # whole multipart body: the image plus the text fields
MAX_INPUT_PIXELS = 4096 * 4096  # decoded input image (checked from the header, before decoding)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # decoders allowed for uploads (no EPS/PDF helpers)
QUEUE_SIZE = 8  # requests waiting behind the running one; more get 429
PREVIEWS_PER_IMAGE = 16  # stream previews spread over the image tokens (each costs one VAE decode)
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there

ERROR_TYPES = {400: "invalid_request_error", 413: "request_too_large", 422: "validation_error", 429: "queue_full",
               404: "not_found", 405: "method_not_allowed", 500: "server_error", 503: "cancelled"}
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/app.css": ("app.css", "text/css; charset=utf-8")}

log = logging.getLogger("nextstep.serve")


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind or ERROR_TYPES.get(status, "error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- request schema ----------------------------------------------------------------------------------------------
class GenerationRequest(BaseModel):
    """Text to image. Types are checked strictly for JSON (``"2"`` is not an int); multipart text is converted.
    Sampling settings left out take the model's defaults (``pipe.defaults``, edit settings for edits)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None
    time_shift: float | None = None


class EditRequest(GenerationRequest):
    """Image editing: adds the image guidance scale."""

    image_guidance_scale: float | None = None


def _validation_message(err: ValidationError, schema: type[BaseModel]) -> str:
    msgs = []
    for e in err.errors():
        name = ".".join(str(p) for p in e["loc"]) or "body"
        if e["type"] == "missing":
            msgs.append(f"missing required field '{name}'")
        elif e["type"] == "extra_forbidden":
            msgs.append(f"unknown field '{name}' (accepted: {', '.join(schema.model_fields)})")
        else:
            got = repr(e.get("input"))
            msgs.append(f"field '{name}': {e['msg']} (got {got[:60] + '...' if len(got) > 60 else got})")
    return "; ".join(msgs)


def _parse_size(text: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", text)
    if not m:
        raise ApiError(400, f"{what} must look like WIDTHxHEIGHT (e.g. 512x512), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _check_size(w: int, h: int, multiple: int, what: str) -> None:
    for name, v in (("width", w), ("height", h)):
        if v < multiple or v % multiple:
            raise ApiError(400, f"{what} {w}x{h}: {name} must be a positive multiple of {multiple}")
        if v > MAX_SIZE:
            raise ApiError(400, f"{what} {w}x{h}: {name} {v} is over the limit of {MAX_SIZE} pixels per side")


def _check_text(name: str, text: str | None, tags_allowed: int, required: bool) -> None:
    if text is None:
        return
    if required and not text.strip():
        raise ApiError(400, f"{name} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"{name} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if text.count(IMAGE_TAG) > tags_allowed:
        raise ApiError(400, f"{name} may contain {IMAGE_TAG} at most {tags_allowed} time(s) (it marks the input "
                            f"image of an edit)")


def _check_range(name: str, v: float, lo: float, hi: float, lo_open: bool = False) -> None:
    if v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")


def build_job_kwargs(req: GenerationRequest, pipe: NextStepPipeline, default_size: tuple[int, int],
                     image: Image.Image | None = None) -> tuple[dict[str, Any], int]:
    """Check a parsed request against the limits; returns the pipeline keyword arguments and the seed used.
    Settings the request leaves out stay None, so the pipeline applies the model's defaults."""
    edit, multiple = image is not None, pipe.size_multiple
    _check_text("prompt", req.prompt, 1 if edit else 0, required=True)
    _check_text("negative_prompt", req.negative_prompt, 0, required=False)
    if req.response_format != "b64_json":
        raise ApiError(400, f"response_format {req.response_format!r} is not supported: this server keeps no "
                            f"files to link to; use 'b64_json'")
    _check_range("n", req.n, 1, MAX_N)
    if req.sampler is not None and req.sampler not in SAMPLERS:
        raise ApiError(400, f"sampler must be one of {sorted(SAMPLERS)}, got {req.sampler!r}")
    if req.steps is not None:
        _check_range("steps", req.steps, 1, MAX_STEPS)
        if (req.sampler or pipe.defaults.sampler) == "sde" and req.steps < 2:
            raise ApiError(400, "steps must be >= 2 with the 'sde' sampler (use 'ode' for a single step)")
    for name in ("guidance_scale", "image_guidance_scale"):
        if getattr(req, name, None) is not None:
            _check_range(name, getattr(req, name), 0, MAX_GUIDANCE)
    if req.time_shift is not None:
        _check_range("time_shift", req.time_shift, 0, MAX_TIME_SHIFT, lo_open=True)
    if req.seed is not None:
        _check_range("seed", req.seed, 0, MAX_SEED)
    seed = secrets.randbelow(MAX_SEED + 1) if req.seed is None else req.seed
    if req.size is not None:
        (w, h), what = _parse_size(req.size, "size"), "size"
    elif edit:
        (w, h), what = image.size, "the input image is"
        if w % multiple or h % multiple or w > MAX_SIZE or h > MAX_SIZE:
            raise ApiError(400, f"the input image is {w}x{h}: pass size (multiples of {multiple}, at most "
                                f"{MAX_SIZE} per side); the image is then resized to cover it and center-cropped")
    else:
        (w, h), what = default_size, "size"
    _check_size(w, h, multiple, what)
    kwargs: dict[str, Any] = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, height=h, width=w,
                                  num_images_per_prompt=req.n, num_inference_steps=req.steps,
                                  guidance_scale=req.guidance_scale, time_shift=req.time_shift, sampler=req.sampler,
                                  generator=torch.Generator().manual_seed(seed))
    if edit:
        kwargs.update(image=image, image_guidance_scale=req.image_guidance_scale)
    return kwargs, seed


# ---- reading requests (bounded, in memory) -----------------------------------------------------------------------
async def _read_body(request: Request, limit: int, what: str) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"{what} is {int(length)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json_request(request: Request, schema: type[GenerationRequest]) -> GenerationRequest:
    body = await _read_body(request, MAX_JSON_BYTES, "the request body")
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object such as "
                            f'{{"prompt": "a red circle", "size": "256x256"}}') from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(obj).__name__}")
    try:
        return schema.model_validate(obj, strict=True)
    except ValidationError as e:
        raise ApiError(422, _validation_message(e, schema)) from None


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """multipart/form-data -> (text fields, file fields), all in memory. A field given twice is an error."""
    ctype, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(400, f"send multipart/form-data with an 'image' file and a 'prompt' field, got content type "
                            f"{content_type or 'none'!r}")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header: list[bytes] = [b"", b""]

    def on_part_begin():
        parts.append(({}, bytearray()))

    def on_header_field(data, start, end):
        header[0] += data[start:end]

    def on_header_value(data, start, end):
        header[1] += data[start:end]

    def on_header_end():
        parts[-1][0][header[0].lower()] = header[1]
        header[0], header[1] = b"", b""

    def on_part_data(data, start, end):
        parts[-1][1].extend(data[start:end])

    callbacks = dict(on_part_begin=on_part_begin, on_header_field=on_header_field, on_header_value=on_header_value,
                     on_header_end=on_header_end, on_part_data=on_part_data)
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise ApiError(400, f"malformed multipart body: {e}") from None
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for headers, data in parts:
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise ApiError(400, "malformed multipart body: a part has no name")
        if name in fields or name in files:
            raise ApiError(400, f"field '{name}' is given more than once")
        if b"filename" in disp:
            files[name] = bytes(data)
        else:
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"field '{name}' is not UTF-8 text") from None
    return fields, files


def read_image(data: bytes) -> Image.Image:
    """Uploaded bytes -> RGB PIL image; the pixel count is checked from the header before decoding."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"the image file is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
    if not data:
        raise ApiError(400, "the image file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > MAX_INPUT_PIXELS:
                raise ApiError(400, f"the image is {w}x{h} pixels; the limit is {MAX_INPUT_PIXELS} pixels")
            return im.convert("RGB")
    except ApiError:
        raise
    except Exception as e:  # PIL raises many types for corrupt or foreign files; all mean "not an image we read"
        why = "" if isinstance(e, UnidentifiedImageError) else f" ({type(e).__name__}: {e})"
        raise ApiError(400, f"the uploaded file is not a readable image; send {', '.join(IMAGE_FORMATS)}{why}") \
            from None


async def read_edit_request(request: Request) -> tuple[EditRequest, Image.Image]:
    body = await _read_body(request, MAX_FORM_BYTES, f"the request body (the image may be at most {MAX_UPLOAD_BYTES} "
                                                     f"bytes)")
    fields, files = parse_multipart(body, request.headers.get("content-type", ""))
    for name in files:
        if name != "image":
            raise ApiError(422, f"unknown file field '{name}' (only 'image' is accepted)")
    if "image" in fields:
        raise ApiError(400, "'image' must be a file upload, not a text field")
    if "image" not in files:
        raise ApiError(422, "missing required field 'image' (the image file to edit)")
    try:
        req = EditRequest.model_validate(fields)
    except ValidationError as e:
        raise ApiError(422, _validation_message(e, EditRequest)) from None
    return req, read_image(files["image"])


# ---- the worker --------------------------------------------------------------------------------------------------
class Cancelled(Exception):
    """Raised from the pipeline callback when the client has gone or the server is stopping."""


@dataclass(eq=False)
class Job:
    kwargs: dict[str, Any]
    seed: int
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, name: str, data: Any = None) -> None:
        """Thread-safe: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (name, data))
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """Runs jobs one at a time on its own thread, so torch never blocks the event loop."""

    def __init__(self, pipe: NextStepPipeline, queue_size: int, preview_every: int | None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.pipe, self.capacity, self.preview_every = pipe, queue_size, preview_every
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # bounded by submit(), so stop() can always add None
        self.current: Job | None = None
        self.stats = {"completed": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="nextstep-worker", daemon=True)
        self.thread.start()

    def cancel_all(self) -> None:
        """Cancel what is queued and running: each request ends at once with a 'cancelled' error."""
        jobs = list(self.jobs.queue)  # one C-level copy under the GIL, no lock: this runs in a signal handler
        for job in [*jobs, self.current]:
            if job is not None:
                job.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything, then end the thread."""
        self.cancel_all()
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join(timeout)
            self.thread = None

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    @property
    def depth(self) -> int:
        """Jobs queued plus the one running."""
        return self.waiting + (self.current is not None)

    def submit(self, job: Job) -> int:
        """Queue a job; returns how many jobs are ahead of it. Raises ApiError(429) when the queue is full."""
        with self._lock:
            ahead = self.depth
            if self.waiting >= self.capacity:
                self.stats["rejected"] += 1
                raise ApiError(429, f"the server is busy: {self.waiting} request(s) waiting, the queue holds "
                                    f"{self.capacity}; retry later")
            self.jobs.put_nowait(job)
            return ahead

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.current = job
            try:
                name, data = self._run(job)
            finally:
                self.current = None  # before the answer goes out, so a client never sees its own job still running
            job.emit(name, data)

    def _cancelled(self, job: Job) -> tuple[str, ApiError]:
        job.cancel()
        self.stats["cancelled"] += 1
        return "error", ApiError(503, "the generation was cancelled (the client left or the server is stopping)",
                                 "cancelled")

    def _run(self, job: Job) -> tuple[str, Any]:
        """Generate; returns the terminal event: ("final", response) or ("error", ApiError)."""
        if job.cancelled.is_set():
            return self._cancelled(job)
        m = self.pipe.size_multiple
        grid = (job.kwargs["height"] // m, job.kwargs["width"] // m)
        total = grid[0] * grid[1]
        every = self.preview_every or max(1, total // PREVIEWS_PER_IMAGE)
        job.emit("started", {"total": total})

        def on_token(step: int, total: int, partial: torch.Tensor) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            if job.stream:
                job.emit("progress", {"step": step, "total": total})
                if step < total and step % every == 0:
                    job.emit("preview", {"step": step, "total": total, "images": self._preview(partial, grid)})

        try:
            out = self.pipe(**job.kwargs, progress=False, callback=on_token)
            result = {"created": int(time.time()), "seed": job.seed,
                      "data": [{"b64_json": png_b64(im)} for im in out.images]}
        except Cancelled:
            return self._cancelled(job)
        except ValueError as e:  # the pipeline's verdict on input the limits let through (e.g. prompt too long)
            self.stats["failed"] += 1
            return "error", ApiError(400, str(e))
        except Exception as e:
            log.exception("generation failed")
            self.stats["failed"] += 1
            return "error", ApiError(500, f"generation failed: {type(e).__name__}: {e}")
        self.stats["completed"] += 1
        return "final", result

    def _preview(self, partial: torch.Tensor, grid: tuple[int, int]) -> list[str]:
        """(B, k, D) tokens so far -> PNGs, the missing tokens zero (plain where nothing is drawn yet)."""
        b, k, d = partial.shape
        tokens = torch.zeros(b, grid[0] * grid[1], d, dtype=partial.dtype, device=partial.device)
        tokens[:, :k] = partial
        with torch.no_grad():
            images = to_pil(to_unit(self.pipe.decode(tokens, grid)))
        return [png_b64(im, fast=True) for im in images]


def png_b64(image: Image.Image, fast: bool = False) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1 if fast else 6)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- responses ---------------------------------------------------------------------------------------------------
def sse(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _EventStream(StreamingResponse):
    """An SSE response that runs ``on_close`` however it ends (finished, client gone, server stopping)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _next_event(job: Job, request: Request | None) -> tuple[str, Any] | None:
    """The job's next event; None when ``request`` (if given) has disconnected, after cancelling the job."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S if request is not None else None)
            if done:
                return getter.result()
            if await request.is_disconnected():
                job.cancel()
                return None
    finally:
        if not getter.done():
            getter.cancel()


async def _result(job: Job, request: Request) -> Response:
    try:
        while True:
            event = await _next_event(job, request)
            if event is None:
                return ApiError(503, "client disconnected", "cancelled").response()
            name, data = event
            if name == "final":
                return JSONResponse(data)
            if name == "error":
                return data.response()
    finally:
        job.cancel()  # a no-op when finished; frees the worker when this request is abandoned


def _stream(job: Job, ahead: int) -> _EventStream:
    async def events() -> AsyncIterator[bytes]:
        yield sse("queued", {"position": ahead})
        while True:
            name, data = await _next_event(job, None)
            if name == "error":
                yield sse("error", data.body())
                return
            yield sse(name, data)
            if name == "final":
                return

    return _EventStream(events(), on_close=job.cancel)


# ---- the app -----------------------------------------------------------------------------------------------------
def create_app(pipe: NextStepPipeline, *, queue_size: int = QUEUE_SIZE, preview_every: int | None = None,
               model_name: str = "nextstep") -> FastAPI:
    """The ASGI app around one loaded pipeline. ``queue_size`` requests may wait behind the running one;
    ``preview_every`` image tokens between stream previews (default: PREVIEWS_PER_IMAGE per image). The worker
    thread starts and stops with the app's lifespan."""
    multiple = pipe.size_multiple
    native = multiple * pipe.model.config.base_image_grid_size
    default_side = max(multiple, min(native, MAX_SIZE) // multiple * multiple)
    default_size = (default_side, default_side)
    worker = Worker(pipe, queue_size, preview_every)
    model_info = {"name": model_name, "device": str(pipe.device), "dtype": str(pipe.model.dtype).removeprefix("torch."),
                  "parameters": sum(p.numel() for p in pipe.model.parameters()), "size_multiple": multiple,
                  "native_size": native}
    d = pipe.defaults
    defaults = {"generation": {"steps": d.num_inference_steps, "guidance_scale": d.guidance_scale,
                               "time_shift": d.time_shift, "sampler": d.sampler, "negative_prompt": None},
                "edit": {"steps": d.num_inference_steps, "guidance_scale": d.edit_guidance_scale,
                         "image_guidance_scale": d.edit_image_guidance_scale, "time_shift": d.edit_time_shift,
                         "sampler": d.sampler, "negative_prompt": d.edit_negative_prompt}}
    static = {route: ((STATIC_DIR / name).read_bytes(), mime) for route, (name, mime) in STATIC_FILES.items()}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="NextStep", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail)).response()

    for route, (content, mime) in static.items():
        app.add_api_route(route, _static_handler(content, mime), methods=["GET"], include_in_schema=False)

    @app.get("/health")
    async def health():
        return {"status": "ok",
                "model": model_info,
                "queue": {"depth": worker.depth, "waiting": worker.waiting, "running": worker.current is not None,
                          "capacity": worker.capacity},
                "defaults": {"size": f"{default_size[0]}x{default_size[1]}", **defaults},
                "limits": {"max_size": MAX_SIZE, "max_n": MAX_N, "max_steps": MAX_STEPS,
                           "max_guidance": MAX_GUIDANCE, "max_time_shift": MAX_TIME_SHIFT, "max_seed": MAX_SEED,
                           "max_prompt_chars": MAX_PROMPT_CHARS, "max_upload_bytes": MAX_UPLOAD_BYTES,
                           "max_input_pixels": MAX_INPUT_PIXELS, "queue_size": worker.capacity,
                           "samplers": sorted(SAMPLERS)},
                "stats": dict(worker.stats)}

    def submit(req: GenerationRequest, image: Image.Image | None, stream: bool) -> tuple[Job, int]:
        kwargs, seed = build_job_kwargs(req, pipe, default_size, image)
        job = Job(kwargs, seed, stream, asyncio.get_running_loop())
        return job, worker.submit(job)

    json_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerationRequest.model_json_schema()}}}}
    form_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "prompt"],
        "properties": {"image": {"type": "string", "format": "binary"},
                       **EditRequest.model_json_schema()["properties"]}}}}}}

    @app.post("/v1/images/generations", openapi_extra=json_body)
    async def generations(request: Request):
        job, _ = submit(await read_json_request(request, GenerationRequest), None, stream=False)
        return await _result(job, request)

    @app.post("/v1/images/generations/stream", openapi_extra=json_body)
    async def generations_stream(request: Request):
        job, ahead = submit(await read_json_request(request, GenerationRequest), None, stream=True)
        return _stream(job, ahead)

    @app.post("/v1/images/edits", openapi_extra=form_body)
    async def edits(request: Request):
        req, image = await read_edit_request(request)
        job, _ = submit(req, image, stream=False)
        return await _result(job, request)

    @app.post("/v1/images/edits/stream", openapi_extra=form_body)
    async def edits_stream(request: Request):
        req, image = await read_edit_request(request)
        job, ahead = submit(req, image, stream=True)
        return _stream(job, ahead)

    return app


def _static_handler(content: bytes, mime: str):
    async def handler():
        return Response(content, media_type=mime, headers={"Cache-Control": "no-cache"})

    return handler


# ---- running -----------------------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model_dir=None, vae_dir=None, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          dtype: torch.dtype | str | None = None, queue_size: int = QUEUE_SIZE) -> None:
    """Load a model (default: the bundled one) and serve it until interrupted. ``device`` defaults to CUDA when
    available; ``dtype`` to bfloat16 on GPU, float32 on CPU. Binds to loopback unless told otherwise: the server
    has no authentication."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    pipe = NextStepPipeline.from_pretrained(model_dir, vae_dir, dtype=dtype, device=device)
    name = Path(model_dir).name if model_dir is not None else "bundled"
    app = create_app(pipe, queue_size=queue_size, model_name=name)
    if not _is_loopback(host):
        log.warning("serving on %s: the server has no authentication; anyone who can reach it can use it", host)
    print(f"nextstep: serving {name} on http://{host if ':' not in host else f'[{host}]'}:{port}/ ({device}, {dtype})")
    try:
        _Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)).run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass


class _Server(uvicorn.Server):
    """uvicorn, cancelling the app's generations as soon as shutdown begins, so open streams end with an 'error'
    event right away instead of being cut when the graceful-shutdown timeout runs out."""

    def handle_exit(self, sig, frame) -> None:
        self.cancel_jobs()
        super().handle_exit(sig, frame)

    def cancel_jobs(self) -> None:
        worker = getattr(getattr(self.config.app, "state", None), "worker", None)
        if worker is not None:
            worker.cancel_all()


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread (port 0: a free one); yields its base URL and stops it on
    exit. For tests and notebooks."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    finally:
        server.cancel_jobs()
        server.should_exit = True
        thread.join(30)
        sock.close()
