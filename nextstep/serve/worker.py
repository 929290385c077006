"""The worker: one thread runs the generations one at a time (torch never blocks the event loop), fed by a bounded
queue; each job hands its events (progress, previews, the result or an error) back to its request's event loop."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..errors import InputError
from ..images import to_pil, to_unit
from ..pipeline import NextStepPipeline
from .limits import PREVIEWS_PER_IMAGE, RETRY_AFTER_S
from .schemas import ApiError

log = logging.getLogger("nextstep.serve")


class Cancelled(Exception):
    """Raised from the pipeline callback when the client has gone or the server is stopping."""


@dataclass(eq=False)
class Job:
    kwargs: dict[str, Any]  # the pipeline's
    response: dict[str, Any]  # the final answer's fields besides "created" and "data" (seed, size, usage)
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
                                    f"{self.capacity}; retry later", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
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
            result = {"created": int(time.time()), **job.response,
                      "data": [{"b64_json": png_b64(im)} for im in out.images]}
        except Cancelled:
            return self._cancelled(job)
        except InputError as e:  # the pipeline's verdict on input the limits let through (e.g. prompt too long)
            self.stats["failed"] += 1
            return "error", ApiError(400, str(e))
        except Exception as e:  # anything else is ours, not the client's (a plain ValueError, a ConfigError too)
            log.exception("generation failed (%dx%d, %d image(s))", job.kwargs["width"], job.kwargs["height"],
                          job.kwargs["num_images_per_prompt"])
            self.stats["failed"] += 1
            return "error", ApiError(500, f"the generation failed on the server ({type(e).__name__}); the server log "
                                          f"has the details")
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
