"""A job's events as an HTTP response: one JSON answer when it ends, a Server-Sent Events stream of every event (the
/stream routes), or OpenAI's image stream (``stream: true`` on the plain routes). Each way a client that leaves
cancels its job."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .limits import DISCONNECT_POLL_S
from .schemas import ApiError
from .worker import Job


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


async def json_result(job: Job, request: Request) -> Response:
    """Wait for the job's final result or error, watching that the client stays (a plain POST shows no progress)."""
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


def event_stream(job: Job, ahead: int) -> _EventStream:
    """Every event of the job as SSE, starting with its place in the queue; closing the stream cancels the job."""

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


def openai_stream(job: Job, kind: str) -> _EventStream:
    """OpenAI's image streaming for a job of one image and ``job.partials`` partial images: a ``{kind}.partial_image``
    event per partial image (``partial_image_index`` from 0), then one ``{kind}.completed`` with the final image and
    ``usage`` (and the server's ``seed``), or an ``error`` event ``{"type": "error", "error": {...}}`` (the object a
    JSON error carries, which OpenAI's clients raise as ``APIError``); then the stream ends. ``kind`` is
    ``image_generation`` or ``image_edit``. The fields follow OpenAI's ``ImageGen*Event``/``ImageEdit*Event`` types;
    ``quality`` is "auto" (the model has one). Closing the stream cancels the job."""
    fields = {"size": job.response["size"], "quality": "auto", "background": job.response["background"],
              "output_format": job.response["output_format"]}

    def event(name: str, data: dict) -> bytes:
        return sse(name, {"type": name, **data})

    async def events() -> AsyncIterator[bytes]:
        index = 0
        while True:
            name, data = await _next_event(job, None)
            if name == "preview":  # only at the job's partial steps (worker.partial_steps)
                for b64 in data["images"]:
                    yield event(f"{kind}.partial_image", {"b64_json": b64, "created_at": int(time.time()), **fields,
                                                          "partial_image_index": index})
                    index += 1
            elif name == "final":
                for image in data["data"]:
                    yield event(f"{kind}.completed", {"b64_json": image["b64_json"], "created_at": data["created"],
                                                      **fields, "usage": data["usage"], "seed": data["seed"]})
                return
            elif name == "error":
                yield event("error", data.body())
                return
            # queued, started, progress: OpenAI's stream has no such events

    return _EventStream(events(), on_close=job.cancel)
