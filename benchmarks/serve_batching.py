"""Batched serving: N clients at once against the same N requests one after another, on a real server (loopback).

    python benchmarks/serve_batching.py                      # the bundled model, 8 clients, 64x64, its defaults
    python benchmarks/serve_batching.py --clients 8 --threads 2 --model path/to/model --size 256x256
    python benchmarks/serve_batching.py --reproducible       # the server's fixed-layout mode

Each client sends one non-streaming request (its own prompt and seed, every other setting left to the model's
defaults). "one after another": one client, the N requests in turn (each runs alone). "concurrent": N clients,
connected beforehand, send at the same moment (the worker merges the requests it finds queued, up to MAX_BATCH images
per call). One warm-up request first.
Prints both totals, the ratio, the batch sizes the worker ran, and how far each concurrent image is from its
one-after-another image: its image tokens (float) and PNG pixels (0-255). Seeds are per request, so they match to
float rounding, and exactly with ``--reproducible``.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # running from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from nextstep.pipeline import NextStepPipeline  # noqa: E402
from nextstep.serve.routes import create_app  # noqa: E402
from nextstep.serve.runner import running_server  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "two red circles",
           "a blue circle on the left of a green square", "a purple triangle", "an orange square"]


class Counting:
    """The pipeline, recording how many prompts each call draws and the image tokens of each prompt (its first row
    in the call: filler rows of the reproducible mode repeat the first prompt after it)."""

    def __init__(self, pipe: NextStepPipeline):
        self.pipe, self.batches, self.tokens = pipe, [], {}

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def _generate(self, prompt, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        self.batches.append(len(prompts))
        out = self.pipe._generate(prompt, **kwargs)
        for i, p in reversed(list(enumerate(prompts))):
            self.tokens[p] = out.tokens[i]
        return out


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--vae", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reproducible", action="store_true", help="the server's fixed-layout mode (serve --reproducible)")
    ap.add_argument("--batch-wait", type=float, default=None,
                    help="seconds a request finding the worker idle waits for company (default: BATCH_WAIT_S)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Counting(NextStepPipeline.from_pretrained(args.model, args.vae, device=args.device))
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i, "size": args.size} for i in range(args.clients)]
    extra = {} if args.batch_wait is None else {"batch_wait_s": args.batch_wait}
    app = create_app(pipe, queue_size=max(args.clients, 1), reproducible=args.reproducible, **extra)

    with running_server(app) as url:
        clients = [httpx.Client(base_url=url, timeout=600) for _ in bodies]  # connected before the clock starts
        go = threading.Barrier(len(bodies))

        def send(http: httpx.Client, body: dict, together: bool = False) -> dict:
            if together:
                go.wait()
            r = http.post("/v1/images/generations", json=body)
            r.raise_for_status()
            return r.json()

        for http in clients:  # warm-up: one generation, and every client's connection open
            http.get("/health")
        send(clients[0], {**bodies[0], "seed": 1})
        pipe.batches.clear()
        t0 = time.perf_counter()
        alone = [send(clients[0], b) for b in bodies]
        t_seq = time.perf_counter() - t0
        seq_batches, seq_tokens = list(pipe.batches), dict(pipe.tokens)
        pipe.batches.clear()
        with ThreadPoolExecutor(len(bodies)) as pool:
            t0 = time.perf_counter()
            together = list(pool.map(lambda cb: send(*cb, together=True), zip(clients, bodies)))
            t_conc = time.perf_counter() - t0
        conc_batches = list(pipe.batches)
        for http in clients:
            http.close()

    diff = max(int(np.abs(pixels(a["data"][0]["b64_json"]) - pixels(b["data"][0]["b64_json"])).max())
               for a, b in zip(alone, together))
    print(f"model: {args.model or 'bundled'}, {args.size}, defaults {app.state.worker.pipe.defaults.resolve(False)}")
    print(f"torch threads: {args.threads}, device: {args.device}, clients: {args.clients}, "
          f"batch wait: {app.state.worker.batch_wait_s} s, reproducible: {args.reproducible}")
    print(f"one after another: {t_seq:.2f} s (calls of {seq_batches} prompts)")
    print(f"concurrent:        {t_conc:.2f} s (calls of {conc_batches} prompts)")
    print(f"ratio:             {t_seq / t_conc:.2f}x")
    if args.clients <= len(PROMPTS):  # one request per prompt: tokens are found by prompt
        tokens = max(float((seq_tokens[b["prompt"]] - pipe.tokens[b["prompt"]]).abs().max()) for b in bodies)
        print(f"largest token difference, concurrent vs one after another: {tokens:.2e}")
    print(f"largest pixel difference, concurrent vs one after another: {diff} (of 255)")


if __name__ == "__main__":
    main()
