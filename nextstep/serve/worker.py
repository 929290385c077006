"""The worker: one thread runs the generations, fed by a bounded queue; each job hands its events (progress,
previews, the result or an error) back to its request's event loop.

Batching: when the worker takes a text-to-image job it also takes the queued jobs that would make exactly the same
pipeline call but for the prompt and the seed (``batch_key``: same size, images per request, and resolved sampling
settings), up to ``max_batch`` images, and runs them as one call with one generator per prompt, so each job's noise
is its own seed's, as when it runs alone. Edits run one at a time. Progress, previews and cancellation stay per job:
a job cancelled in a running batch is answered at once (its rows finish with the batch); the call stops early only
when every job in it is cancelled. A streamed job gets previews every few tokens (the /stream routes) or, as OpenAI's
``partial_images``, at a few evenly spaced tokens (``partial_steps``); either way they are decoded in one VAE call
per step for all the jobs that want one.

Reproducible mode (``reproducible=True``, ``nextstep serve --reproducible``): every batchable call has one fixed
layout, so a request's images are bit for bit the same whatever it is batched with (float weights; an int8
pipeline's activation quantization still shares one range per call). The call is filled up to ``max_batch // n``
prompts of ``n`` images with copies of its first prompt (seed 0, results dropped) and every prompt row is left-padded
to a multiple of ``PROMPT_BUCKET`` tokens (at most what the model's positions leave beside the image); only requests
of the same padded length share a call. A request alone then costs what a full batch costs.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import logging
import threading
import time
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from PIL import Image

from ..errors import InputError
from ..images import to_pil, to_unit
from ..pipeline import NextStepPipeline
from ..settings import SPEC, Settings
from .limits import BATCH_WAIT_S, MAX_BATCH, PREVIEWS_PER_IMAGE, PROMPT_BUCKET, RETRY_AFTER_S
from .schemas import ApiError

log = logging.getLogger("nextstep.serve")

SETTINGS_FIELDS = frozenset(SPEC)
_UNKNOWN = object()
PER_PROMPT = ("prompt", "generator")  # the pipeline arguments that may differ between the jobs of one batch


class BatchKey(NamedTuple):
    """What jobs sharing a call have in common (``Worker.batch_key``)."""

    settings: Settings  # resolved sampling settings
    rest: tuple  # every other pipeline argument but the prompt and the generator, sorted (name, value) pairs
    prompt_length: int | None  # reproducible mode's padded prompt length


class Cancelled(Exception):
    """Raised from the pipeline callback when every job of the call is cancelled (clients gone, server stopping)."""


@dataclass(eq=False)
class Job:
    kwargs: dict[str, Any]  # the pipeline's
    response: dict[str, Any]  # the final answer's fields besides "created" and "data" (seed, size, usage)
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = 0.0  # time.monotonic() when submitted
    started: bool = False  # "started" sent (worker thread only)
    answered: bool = False  # the terminal event sent (worker thread only): nothing more is emitted
    key: Any = _UNKNOWN  # Worker.batch_key's answer, once computed
    partials: int | None = None  # OpenAI's stream=true: this many previews, evenly spaced (None: every few tokens)

    @property
    def images(self) -> int:
        return self.kwargs["num_images_per_prompt"]

    def preview_steps(self, total: int, every: int) -> Container[int]:
        """The image tokens (of ``total``) after which this streamed job gets a preview: every ``every`` tokens for
        the /stream routes, or its ``partials`` at evenly spaced tokens (``partial_steps``)."""
        return range(every, total, every) if self.partials is None else partial_steps(total, self.partials)

    def emit(self, name: str, data: Any = None) -> None:
        """Thread-safe: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (name, data))
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def cancel(self) -> None:
        self.cancelled.set()


def partial_steps(total: int, count: int) -> frozenset[int]:
    """The image tokens after which OpenAI-style streaming sends its ``count`` partial images: evenly spaced over the
    ``total`` tokens (token i * total / (count + 1), rounded), never the last one (that is the final image), so an
    image of few tokens gets fewer partial images (as OpenAI allows: the final image may come first)."""
    return frozenset(s for i in range(1, count + 1) if 0 < (s := round(i * total / (count + 1))) < total)


class Worker:
    """Runs jobs on its own thread, so torch never blocks the event loop; compatible queued jobs share a call."""

    def __init__(self, pipe: NextStepPipeline, queue_size: int, preview_every: int | None,
                 max_batch: int = MAX_BATCH, batch_wait_s: float = BATCH_WAIT_S, reproducible: bool = False):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not batch_wait_s >= 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
        self.pipe, self.capacity, self.preview_every = pipe, queue_size, preview_every
        self.max_batch, self.batch_wait_s, self.reproducible = max_batch, batch_wait_s, reproducible
        self.pending: collections.deque[Job] = collections.deque()  # bounded by submit()
        self.running: tuple[Job, ...] = ()  # the jobs of the call in progress not yet answered
        self.stats = {"completed": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self.thread: threading.Thread | None = None
        self._ready = threading.Condition()
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="nextstep-worker", daemon=True)
        self.thread.start()

    def cancel_all(self) -> None:
        """Cancel what is queued and running: each request ends at once with a 'cancelled' error."""
        jobs = list(self.pending)  # one C-level copy under the GIL, no lock: this runs in a signal handler
        for job in [*jobs, *self.running]:
            job.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything, then end the thread (it answers what is still queued first)."""
        self.cancel_all()
        if self.thread is not None:
            with self._ready:
                self._stopping = True
                self._ready.notify()
            self.thread.join(timeout)
            self.thread = None

    @property
    def waiting(self) -> int:
        return len(self.pending)

    @property
    def depth(self) -> int:
        """Jobs queued plus the ones running."""
        return self.waiting + len(self.running)

    def submit(self, job: Job) -> int:
        """Queue a job; returns how many jobs are ahead of it. Raises ApiError(429) when the queue is full."""
        self.batch_key(job)  # computed here, not under the queue's lock in _take (it may tokenize the prompt)
        with self._ready:
            ahead = self.depth
            if self.waiting >= self.capacity:
                self.stats["rejected"] += 1
                raise ApiError(429, f"the server is busy: {self.waiting} request(s) waiting, the queue holds "
                                    f"{self.capacity}; retry later", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            job.queued_at = time.monotonic()
            self.pending.append(job)
            self._ready.notify()
            return ahead

    # ---- batching --------------------------------------------------------------------------------------------------
    def batch_key(self, job: Job) -> BatchKey | None:
        """What must be equal for jobs to share one pipeline call: every argument but the prompt and the generator,
        sampling settings compared after the model's defaults fill them in (steps=None and the default steps are the
        same call). None: the job runs alone (edits: their input images go through the VAE encoder as one batch,
        not yet shown to equal encoding each alone). In reproducible mode the key also holds the padded prompt length
        (``prompt_length``). Computed once per job, when it is submitted."""
        if job.key is _UNKNOWN:
            job.key = self._key(job)
        return job.key

    def _key(self, job: Job) -> BatchKey | None:
        kw = job.kwargs
        if kw.get("image") is not None:
            return None
        settings = self.pipe.resolve_settings(False, kw.get("fast", False),
                                              **{k: v for k, v in kw.items() if k in SETTINGS_FIELDS})
        rest = tuple(sorted((k, v) for k, v in kw.items() if k not in SETTINGS_FIELDS and k not in PER_PROMPT))
        return BatchKey(settings, rest, self._prompt_length(kw, settings) if self.reproducible else None)

    def _prompt_length(self, kw: dict[str, Any], settings: Settings) -> int:
        """Reproducible mode's padded length of a call's prompt rows: the job's longest row (as the call prefills it:
        the prompt alone in fast mode) rounded up to a multiple of ``PROMPT_BUCKET`` tokens, but never beyond what
        the model's positions leave beside the image (validation checked the unpadded rows against that)."""
        m = self.pipe.size_multiple
        grid = (kw["height"] // m, kw["width"] // m)
        longest = max(len(r) for r in self.pipe.prompt_rows(kw["prompt"], grid, settings, edit=False))
        room = self.pipe.model.config.transformer.max_position_embeddings - grid[0] * grid[1]
        return max(longest, min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, room))

    def _take(self) -> list[Job] | None:
        """Wait for the next job; returns it with the queued jobs that can share its call (in queue order, up to
        ``max_batch`` images), or None when stopping with nothing left to answer. A batchable job that has been
        queued less than ``batch_wait_s`` (it found the worker idle) waits out the rest of it for company, unless
        its batch fills first."""
        with self._ready:
            while not self.pending:
                if self._stopping:
                    return None
                self._ready.wait()
            first = self.pending.popleft()
            batch, key, images = [first], self.batch_key(first), first.images
            deadline = first.queued_at + self.batch_wait_s
            while key is not None:
                for job in list(self.pending):
                    if images + job.images <= self.max_batch and self.batch_key(job) == key:
                        self.pending.remove(job)
                        batch.append(job)
                        images += job.images
                left = deadline - time.monotonic()
                if images >= self.max_batch or left <= 0 or self._stopping:
                    break
                self._ready.wait(left)
            self.running = tuple(batch)  # under the lock: a job is always counted, queued or running
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception:  # never lose the thread (or a client's answer) to a bug in the worker itself
                log.exception("the worker failed")
                for job in batch:
                    if not job.answered:
                        self._answer(job, "error", ApiError(500, "the server failed; the server log has the details"))
            finally:
                self.running = ()

    # ---- answering -------------------------------------------------------------------------------------------------
    def _answer(self, job: Job, name: str, data: Any) -> None:
        """Send the terminal event, after the job leaves ``running`` (a client never sees its own job running)."""
        job.answered = True
        self.running = tuple(j for j in self.running if j is not job)
        job.emit(name, data)

    def _cancel(self, job: Job) -> None:
        job.cancel()
        self.stats["cancelled"] += 1
        self._answer(job, "error", ApiError(503, "the generation was cancelled (the client left or the server is "
                                                 "stopping)", "cancelled"))

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        if isinstance(e, InputError):  # the pipeline's verdict on input the limits let through
            error = ApiError(400, str(e))
        else:  # anything else is ours, not the client's (a plain ValueError, a ConfigError too)
            kw = jobs[0].kwargs
            log.error("generation failed (%dx%d, %d request(s) of %d image(s))", kw["width"], kw["height"], len(jobs),
                      kw["num_images_per_prompt"], exc_info=e)
            error = ApiError(500, f"the generation failed on the server ({type(e).__name__}); the server log has "
                                  f"the details")
        for job in jobs:
            self.stats["failed"] += 1
            self._answer(job, "error", error)

    # ---- running ---------------------------------------------------------------------------------------------------
    def _run(self, batch: list[Job]) -> None:
        """One pipeline call for the jobs of ``batch`` (one prompt and one generator each); answers every job."""
        for job in batch:
            if job.cancelled.is_set():
                self._cancel(job)
        jobs = [job for job in batch if not job.answered]
        if not jobs:
            return
        kwargs = dict(jobs[0].kwargs)
        n = jobs[0].images
        key = self.batch_key(jobs[0])
        fixed = self.reproducible and key is not None
        fill = max(0, self.max_batch // n - len(jobs)) if fixed else 0
        if len(jobs) > 1 or fill:
            prompts, gens = [j.kwargs["prompt"] for j in jobs], [j.kwargs["generator"] for j in jobs]
            # the fixed layout: filler copies of the first prompt with their own noise, results dropped
            prompts += [prompts[0]] * fill
            gens += [torch.Generator(gens[0].device).manual_seed(0) for _ in range(fill)]
            kwargs.update(prompt=prompts, generator=gens)
        if fixed:
            kwargs["prompt_length"] = key.prompt_length
        m = self.pipe.size_multiple
        grid = (kwargs["height"] // m, kwargs["width"] // m)
        total = grid[0] * grid[1]
        every = self.preview_every or max(1, total // PREVIEWS_PER_IMAGE)
        previews = {job: job.preview_steps(total, every) for job in jobs if job.stream}
        for job in jobs:
            if not job.started:
                job.started = True
                job.emit("started", {"total": total})

        def on_token(step: int, total: int, partial: torch.Tensor) -> None:
            """partial: (len(jobs) * n, k, D), job i's images in rows i*n .. i*n+n-1."""
            for job in jobs:
                if not job.answered and job.cancelled.is_set():
                    self._cancel(job)
            live = [(i, job) for i, job in enumerate(jobs) if not job.answered]
            if not live:
                raise Cancelled
            streams = [(i, job) for i, job in live if job.stream]
            for _, job in streams:
                job.emit("progress", {"step": step, "total": total})
            shown = [(i, job) for i, job in streams if step in previews[job]]
            if shown:
                rows = [i * n + r for i, _ in shown for r in range(n)]
                images = self._preview(partial[rows] if len(rows) < partial.shape[0] else partial, grid)
                for s, (_, job) in enumerate(shown):
                    job.emit("preview", {"step": step, "total": total, "images": images[s * n:(s + 1) * n]})

        if "lora" in kwargs:  # the batch's adapter (one per batch: it is in the key); switching is a flag, not a load
            self.pipe.set_lora(kwargs.pop("lora"))
        try:
            out = self.pipe._generate(**kwargs, progress=False, callback=on_token)
        except Cancelled:
            return
        except Exception as e:
            live = [job for job in jobs if not job.answered]
            if len(live) > 1:  # one request's failure is its own: retry them one at a time
                log.warning("a batch of %d requests failed (%s: %s); running them one at a time", len(live),
                            type(e).__name__, e)
                for job in live:
                    self._run([job])
            elif live:
                self._fail(live, e)
            return
        created = int(time.time())
        for i, job in enumerate(jobs):
            if job.answered:  # cancelled while its rows were computing
                continue
            data = [{"b64_json": png_b64(im)} for im in out.images[i * n:(i + 1) * n]]
            self.stats["completed"] += 1
            self._answer(job, "final", {"created": created, **job.response, "data": data})

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
