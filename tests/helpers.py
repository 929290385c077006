"""Helpers shared by the test modules: seeded generators, differences, PSNR, teacher-forced parity runs; the
trainers' subprocesses (run, finish, kill -9 at a checkpoint); the server's test client, events and gates."""

from __future__ import annotations

import base64
import importlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Parity with the official code, per token and per component. The official code agrees with itself to about 2e-6
# (cached against uncached decoding); kernels of other instruction sets (AVX2, AVX-512, none) differ from each other
# by a few 1e-6 on one token. A teacher-forced token (its context the reference's own tokens) sees only that: measured
# at most 7e-6 under ATEN_CPU_CAPABILITY=avx512, avx2 and default (`python scripts/parity_report.py`, docs/numerics.md).
TOKEN_TOL = 3e-5
# Free-running runs compound those differences (the random fixture models roughly double a difference per token: a
# 3e-6 first token grows to 1e-3 by the 16th under ATEN_CPU_CAPABILITY=default), so whole runs are compared as
# pictures, as the official fixtures prescribe: PSNR >= 30 dB, where a wrong schedule, guidance formula, prompt
# layout or noise order lands near 10-15 dB.
MIN_PSNR = 30.0


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def psnr01(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two decoder outputs in [-1, 1], compared as [0, 1] pixels."""
    a, b = (a.float() / 2 + 0.5).clamp(0, 1), (b.float() / 2 + 0.5).clamp(0, 1)
    return 10 * math.log10(1 / max(((a - b) ** 2).mean().item(), 1e-20))


@contextmanager
def teacher_forced(monkeypatch, reference_tokens: torch.Tensor):
    """Inside the block every token the pipeline's full head samples is recorded, and the reference's token at that
    position is fed back in its place: each sampled token then depends on the reference's context only, so float
    differences do not compound from token to token. Yields the list of sampled tokens, one (rows, token_dim) tensor
    per position; ``reference_tokens`` is (rows, total, token_dim)."""
    from nextstep import pipeline
    from nextstep.sampling.token import TokenSampler

    sampled: list[torch.Tensor] = []

    class Forced(TokenSampler):
        def __call__(self, cond, scales, noise):
            x = super().__call__(cond, scales, noise)
            sampled.append(x.clone())
            return reference_tokens[:, len(sampled) - 1].to(x)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "TokenSampler", Forced)
        yield sampled


def forced_diffs(sampled: list[torch.Tensor], reference_tokens: torch.Tensor) -> list[float]:
    """The largest difference at each token position between teacher-forced samples and the reference."""
    assert len(sampled) == reference_tokens.shape[1], (len(sampled), reference_tokens.shape)
    return [maxdiff(x, reference_tokens[:, k]) for k, x in enumerate(sampled)]


# ---- the trainers' subprocesses ------------------------------------------------------------------------------

class Ranks:
    """The ``nproc`` processes of one multi-process run, used like one ``subprocess.Popen``: ``communicate`` (every
    rank's output, rank 0 first), ``returncode`` (the first failing rank's), ``poll``, ``wait``, ``send_signal``
    (to every rank)."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs, self.args = procs, procs[0].args

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        return "".join(p.communicate(timeout=timeout)[0] for p in self.procs), None

    @property
    def returncode(self) -> int | None:
        codes = [p.returncode for p in self.procs]
        return None if None in codes else next((c for c in codes if c), 0)

    def poll(self) -> int | None:
        for p in self.procs:
            p.poll()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        for p in self.procs:
            p.wait(timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        for p in self.procs:
            p.send_signal(sig)


def run_cli(args: list[str], nproc: int = 1, **kw) -> subprocess.Popen | Ranks:
    """``nextstep ARGS`` in a subprocess, one thread, the tests' directory on the path (recipes may name a reward
    defined in a test module). With ``nproc`` > 1 its ranks start with the environment torchrun gives them (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR / PORT), without torchrun's own launcher process (a second torch import per
    run; test_generate_many, test_tp and test_serve_tp go through torchrun itself)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "nextstep.cli", *args]
    if nproc == 1:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    world = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(29500 + os.getpid() % 1000), "GROUP_RANK": "0"}
    return Ranks([subprocess.Popen(cmd, env={**env, **world, "RANK": str(r), "LOCAL_RANK": str(r)},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
                  for r in range(nproc)])


def finish(p: subprocess.Popen | Ranks, timeout: float = 300) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def one_two_and_resumed(command: str, recipe: dict, tmp_path: Path, kill_at: int | None = None,
                        strategies=("ddp", "fsdp"), prepare=None) -> dict[str, Path]:
    """The runs of a trainer's 2-processes-equal-1 and kill-and-resume tests, which share one uninterrupted run:
    ``nextstep COMMAND`` on ``recipe`` in one process (its out_dir ``tmp_path / "one"``); with ``kill_at``, again in
    one process killed -9 at its step-``kill_at`` checkpoint (before it ends), then resumed ("resumed"); then in two
    processes (``run_cli``'s ranks) once per engine in ``strategies`` (``run.parallel``; one process wraps nothing,
    whatever it says). ``prepare(out)``, when given, readies each later run's directory from the first's (e.g. copies
    its cached targets). Returns {"one": dir, "resumed": dir, strategy: dir, ...}."""
    recipe = {**recipe, "run": {**recipe["run"], "out_dir": str(tmp_path / "one")}}
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(recipe))
    finish(run_cli([command, str(cfg), "--quiet"]))
    runs = {"one": tmp_path / "one"}

    def ready(name: str) -> Path:
        out = tmp_path / name
        out.mkdir()
        if prepare is not None:
            prepare(out)
        return out

    if kill_at is not None:
        out = runs["resumed"] = ready("resumed")
        kill_at_checkpoint(run_cli([command, str(cfg), "--quiet", "--out", str(out)]), out, kill_at)
        assert not (out / "final").exists(), "the run ended before it was killed"
        finish(run_cli([command, str(cfg), "--quiet", "--out", str(out), "--resume"]))
    for strategy in strategies:
        cfg = tmp_path / f"cfg-{strategy}.json"
        cfg.write_text(json.dumps({**recipe, "run": {**recipe["run"], "parallel": strategy}}))
        out = runs[strategy] = ready(f"two-{strategy}")
        finish(run_cli([command, str(cfg), "--quiet", "--out", str(out)], nproc=2))
    return runs


def kill_at_checkpoint(p: subprocess.Popen | Ranks, out: Path, step: int, timeout: float = 240) -> None:
    """Wait until the run ``p`` (writing to ``out``) has completed its step-``step`` checkpoint, then kill -9 it."""
    target = out / "checkpoints" / f"step_{step:07d}" / "trainer.json"
    deadline = time.time() + timeout
    while not target.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.002)  # the kill must land before the run ends: one step after it, in the tokenizer's test
    assert target.exists(), f"the run never reached its step-{step} checkpoint"
    p.send_signal(signal.SIGKILL)
    p.wait()


# ---- the server ------------------------------------------------------------------------------------------------

def need(module: str, install: str):
    """Skip without the package, except in CI, which installs it: there a missing package fails the run."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed ({install})")


def local(app):
    """A test client that calls the app as a loopback client does (TestClient's own host name is refused)."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1:8000")


def png_size(b64: str) -> tuple[int, int]:
    from PIL import Image

    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def png_bytes(w: int, h: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def events(lines) -> list[tuple[str, dict]]:
    """Server-Sent Events -> [(name, data)]."""
    out, name = [], None
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            out.append((name, json.loads(line[5:])))
    return out


class Wrapped:
    """A pipeline stand-in for server tests: every attribute is the pipeline's; subclasses change ``_generate``."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)


class AtToken(Wrapped):
    """The pipeline, calling ``at(step)`` after each image token's callback (to hold or fail a call mid-image)."""

    def at(self, step: int) -> None:
        raise NotImplementedError

    def _generate(self, *args, callback, **kwargs):
        def on_token(step, total, partial):
            callback(step, total, partial)
            self.at(step)

        return self.pipe._generate(*args, callback=on_token, **kwargs)


class Gated(Wrapped):
    """The pipeline, held at the start of each call until released."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.started, self.release = threading.Event(), threading.Event()

    def _generate(self, *args, **kwargs):
        self.started.set()
        assert self.release.wait(30), "test never released the gate"
        return self.pipe._generate(*args, **kwargs)


def wait_until(check, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
