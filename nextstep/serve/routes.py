"""The HTTP API around one loaded model (``create_app``): one worker thread, a bounded queue, OpenAI-style routes.

Endpoints
    GET  /                                   the single-page UI (static files held in memory)
    GET  /health                             status, model info, queue depth, defaults, limits, stats (counters)
    GET  /openapi.json                       the OpenAPI schema (no /docs page: Swagger UI would load from a CDN)
    POST /v1/images/generations              JSON in, ``{"created", "seed", "size", "usage", "data": [{"b64_json"}]}``;
                                             with ``"stream": true`` OpenAI's image stream (see below)
    POST /v1/images/edits                    multipart/form-data: ``image`` file + the same fields as text
    POST /v1/images/generations/stream       same input; Server-Sent Events out (see below)
    POST /v1/images/edits/stream             same input as edits; Server-Sent Events out

Request fields (JSON types; multipart sends them as text): ``prompt`` (str, required), ``n`` (int, 1..MAX_N),
``size`` ("WxH", multiples of the model's 16-pixel token, at most MAX_SIZE a side, and within the model's positions
with the prompt; "auto" or left out: the model's native size capped at MAX_SIZE, or for edits the input image's
size), ``response_format`` ("b64_json" only), ``seed`` (int 0..MAX_SEED; omitted: drawn at random and returned),
and the sampling settings under their request names (``nextstep.settings``: ``steps``, at most MAX_STEPS here,
``guidance_scale``, ``time_shift``, ``sampler``, ``noise_level``, ``negative_prompt``; edits add
``image_guidance_scale``). OpenAI's other fields are accepted (``schemas.OpenAIFields`` says which are ignored and
which checked); edits take OpenAI's ``image[]`` for the image (one image per request) and its ``mask`` (a PNG of
the image's size, fully transparent where to edit: outside it the output is the input image's pixels).
Sampling settings left out take the model's defaults (``GET /health`` lists them). Unknown fields are rejected.
The bounds are in the request schemas (``nextstep.serve.schemas``), so the OpenAPI schema shows them.

Stream events, in order: ``queued`` {position: jobs ahead}, ``started`` {total}, then per image token
``progress`` {step, total} and every few tokens ``preview`` {step, total, images: [b64 PNG]} (tokens not yet
generated are zeros, the mean of the normalised latent space: a plain area in the preview), then exactly one of
``final`` (the same object as the non-streaming response) or ``error`` {error: {...}}; then the stream ends.
Closing the connection cancels the generation (it stops at the next image token, the worker moves on; in a batch
the request is answered at once and the others carry on).

OpenAI's streaming (``"stream": true`` on the plain routes; one image per request, n > 1 is a 400):
``partial_images`` (0..3, 0 when left out) events ``image_generation.partial_image`` (``image_edit.*`` for edits) at
evenly spaced image tokens (``worker.partial_steps``; the preview machinery above), then one
``image_generation.completed`` with the image and ``usage``, or an ``error`` event
``{"type": "error", "error": {...}}``; the fields are those of the SDK's ``ImageGen*Event`` types
(``responses.openai_stream``). The request is queued and batched like any other; closing the stream cancels it.

Batching: the worker merges queued text-to-image requests that differ only in prompt and seed (same size, ``n`` and
sampling settings) into one pipeline call of up to MAX_BATCH images, one generator per request (``worker``).

Access (``security.Access``): the ``Host`` and ``Origin`` checks apply to every request; with an API key every
route but the page's files and ``/openapi.json`` needs ``Authorization: Bearer KEY``.

Errors are ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) with:
    400 invalid_request_error  body is not valid JSON / not an object / nested too deeply / not valid multipart; a
                               value outside the limits or not supported (size, n, steps, prompt, response_format
                               "url", a mask without alpha, of another size or with nothing to edit, several
                               images, ...); a size the model's positions cannot hold with the prompt (code
                               context_length_exceeded); the upload is not a readable image; the model refuses the
                               input (an ``InputError``)
    401 authentication_error   the API key is missing or wrong (code invalid_api_key)
    403 permission_error       the Host or Origin is not allowed (code host_not_allowed / origin_not_allowed)
    413 request_too_large      body over MAX_JSON_BYTES, or upload over MAX_UPLOAD_BYTES
    415 unsupported_media_type a JSON route sent anything but application/json, an edit anything but multipart
    422 validation_error       a required field is missing, a field is unknown, or a value has the wrong type
    429 queue_full             QUEUE_SIZE requests are already waiting; retry after the Retry-After header's seconds
    404 not_found, 405 method_not_allowed
    500 server_error           the generation (or the server) failed for any other reason (out of memory, a broken
                               model config, a bug): the message names the exception type, the log has the traceback
    503 cancelled              the server shut down before the request finished (or the client left)
No field names a path: nothing a request sends is read from or written to disk (uploads stay in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pipeline import NextStepPipeline
from ..sampling.flow import SAMPLERS
from ..settings import SPEC, SPECS, Settings
from .limits import (
    BATCH_WAIT_S,
    MAX_BATCH,
    MAX_INPUT_PIXELS,
    MAX_N,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MAX_UPLOAD_BYTES,
    QUEUE_SIZE,
)
from .parsing import build_job_kwargs, read_edit_request, read_json_request, stream_partials
from .responses import event_stream, json_result, openai_stream
from .schemas import ApiError, EditRequest, GenerationRequest
from .security import Access, HostOriginGuard
from .worker import Job, Worker

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/app.css": ("app.css", "text/css; charset=utf-8"),
                "/favicon.svg": ("favicon.svg", "image/svg+xml"),
                "/favicon.ico": ("favicon.svg", "image/svg+xml")}  # where browsers look without a <link rel=icon>


def _api_settings(s: Settings, edit: bool) -> dict:
    """The settings a request gets for the fields it leaves out, under the API's field names (the settings a request
    cannot choose under their own)."""
    return {spec.api or spec.name: getattr(s, spec.name) for spec in SPECS if edit or not spec.edit_only}


def create_app(pipe: NextStepPipeline, *, queue_size: int = QUEUE_SIZE, preview_every: int | None = None,
               model_name: str = "nextstep", access: Access = Access(), max_batch: int = MAX_BATCH,
               batch_wait_s: float = BATCH_WAIT_S, reproducible: bool = False) -> FastAPI:
    """The ASGI app around one loaded pipeline. ``queue_size`` requests may wait behind the running call;
    ``max_batch``: images one call may draw for compatible queued requests merged into it, ``batch_wait_s``: how
    long a request that finds the worker idle waits for such company, ``reproducible``: one fixed call layout, so a
    request's images do not depend on what it is batched with (``worker``);
    ``preview_every`` image tokens between stream previews (default: PREVIEWS_PER_IMAGE per image); ``access``: who
    may use it (default: loopback clients and the server's own page, no key). The worker thread starts and stops
    with the app's lifespan."""
    multiple = pipe.size_multiple
    native = multiple * pipe.model.config.base_image_grid_size
    default_side = max(multiple, min(native, MAX_SIZE) // multiple * multiple)
    default_size = (default_side, default_side)
    worker = Worker(pipe, queue_size, preview_every, max_batch, batch_wait_s, reproducible)
    model_info = {"name": model_name, "device": str(pipe.device), "dtype": str(pipe.model.dtype).removeprefix("torch."),
                  "parameters": sum(p.numel() for p in pipe.model.parameters()), "size_multiple": multiple,
                  "native_size": native, "trained_sizes": list(pipe.defaults.trained_sizes),  # [] not known
                  "parallel_tokens": pipe.model.config.parallel_tokens,  # the most "parallel" a request may ask
                  "loras": list(getattr(pipe, "lora_names", []))}  # the adapters a request may name ("lora")
    defaults = {"generation": _api_settings(pipe.defaults.resolve(False), edit=False),
                "edit": _api_settings(pipe.defaults.resolve(True), edit=True)}
    fast = {"available": pipe.head is not None}  # the distilled head's settings ("fast": true requests)
    if pipe.head is not None:
        fast.update(generation=_api_settings(pipe.distilled_settings(False), edit=False),
                    edit=_api_settings(pipe.distilled_settings(True), edit=True),
                    trained_steps=list(pipe.head.config.trained_steps))
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
    app.add_middleware(CORSMiddleware, allow_origins=list(access.allow_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
    app.add_middleware(HostOriginGuard, access=access)  # added last: runs first
    api = APIRouter(dependencies=[Depends(_key_check(access))] if access.api_key is not None else [])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug: JSON like every answer (the log has it)
        return ApiError(500, f"the server failed ({type(exc).__name__}); the server log has the details").response()

    for route, (content, mime) in static.items():
        app.add_api_route(route, _static_handler(content, mime), methods=["GET"], include_in_schema=False)

    @api.get("/health")
    async def health():
        return {"status": "ok",
                "model": model_info,
                "queue": {"depth": worker.depth, "waiting": worker.waiting, "running": bool(worker.running),
                          "batch": len(worker.running), "capacity": worker.capacity},
                "defaults": {"size": f"{default_size[0]}x{default_size[1]}", **defaults},
                "fast": fast,
                "limits": {"max_size": MAX_SIZE, "max_n": MAX_N, "max_steps": MAX_STEPS,
                           "max_guidance": SPEC["guidance_scale"].hi, "max_time_shift": SPEC["time_shift"].hi,
                           "max_seed": MAX_SEED,
                           "max_prompt_chars": MAX_PROMPT_CHARS, "max_upload_bytes": MAX_UPLOAD_BYTES,
                           "max_input_pixels": MAX_INPUT_PIXELS, "queue_size": worker.capacity,
                           "max_batch": worker.max_batch, "batch_wait_s": worker.batch_wait_s,
                           "reproducible": worker.reproducible,
                           "samplers": sorted(SAMPLERS)},
                "stats": dict(worker.stats)}

    def submit(req: GenerationRequest, image: Image.Image | None, stream: bool, mask: Image.Image | None = None
               ) -> tuple[Job, int]:
        """Check and queue a request; on the plain routes (``stream`` False) ``stream: true`` makes the job an
        OpenAI stream (``job.partials`` not None)."""
        kwargs, response = build_job_kwargs(req, pipe, default_size, image, mask)
        partials = None if stream else stream_partials(req)
        job = Job(kwargs, response, stream or partials is not None, asyncio.get_running_loop(), partials=partials)
        return job, worker.submit(job)

    async def answer(job: Job, request: Request, kind: str) -> Response:
        return openai_stream(job, kind) if job.partials is not None else await json_result(job, request)

    json_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerationRequest.model_json_schema()}}}}
    form_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "prompt"],
        "properties": {"image": {"type": "string", "format": "binary"},
                       "mask": {"type": "string", "format": "binary",
                                "description": "a PNG of the image's size: edit where fully transparent (alpha 0)"},
                       **EditRequest.model_json_schema()["properties"]}}}}}}

    @api.post("/v1/images/generations", openapi_extra=json_body)
    async def generations(request: Request):
        job, _ = submit(await read_json_request(request, GenerationRequest), None, stream=False)
        return await answer(job, request, "image_generation")

    @api.post("/v1/images/generations/stream", openapi_extra=json_body)
    async def generations_stream(request: Request):
        job, ahead = submit(await read_json_request(request, GenerationRequest), None, stream=True)
        return event_stream(job, ahead)

    @api.post("/v1/images/edits", openapi_extra=form_body)
    async def edits(request: Request):
        req, image, mask = await read_edit_request(request)
        job, _ = submit(req, image, stream=False, mask=mask)
        return await answer(job, request, "image_edit")

    @api.post("/v1/images/edits/stream", openapi_extra=form_body)
    async def edits_stream(request: Request):
        req, image, mask = await read_edit_request(request)
        job, ahead = submit(req, image, stream=True, mask=mask)
        return event_stream(job, ahead)

    app.include_router(api)
    return app


def _key_check(access: Access):
    """The API-key dependency (declared as HTTP bearer, so the OpenAPI schema says how to authenticate)."""
    bearer = HTTPBearer(auto_error=False, description="the server's API key (--api-key / NEXTSTEP_API_KEY)")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not access.key_matches(credentials.credentials if credentials is not None else None):
            raise access.key_error()

    return check


def _static_handler(content: bytes, mime: str):
    async def handler():
        return Response(content, media_type=mime, headers={"Cache-Control": "no-cache"})

    return handler
