"""``nextstep serve --tp 2``: two torchrun processes (gloo) serve what one process draws; a cancelled request and the
requests after it keep the ranks in step; Ctrl-C ends both ranks. Plus the replication's wire format and the
refusal of --tp without torchrun, which need no processes."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nextstep.cli import main
from nextstep.serve.replicate import _pack, _unpack

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

# Pixels of the 2-rank server against one process: TP sums partial products in another order (tests/test_tp.py
# measured >= 90 dB on this fixture), so a pixel may round to the next 8-bit value.
PIXEL_TOL = 2
BODY = {"prompt": "a red circle on the left", "size": "64x64", "steps": 4, "seed": 7}


def test_generators_travel_as_their_state():
    g = torch.Generator().manual_seed(3)
    torch.rand(5, generator=g)  # not at the seed's start: the state is what travels
    kwargs = {"generator": [g, torch.Generator().manual_seed(4)], "prompt": ["a", "b"], "height": 64}
    back = {k: _unpack(v) for k, v in _pack_all(kwargs).items()}
    assert back["prompt"] == ["a", "b"] and back["height"] == 64
    assert torch.equal(torch.rand(4, generator=back["generator"][0]), torch.rand(4, generator=g))
    assert torch.equal(torch.rand(4, generator=back["generator"][1]),
                       torch.rand(4, generator=torch.Generator().manual_seed(4)))


def _pack_all(kwargs: dict) -> dict:
    import pickle

    return pickle.loads(pickle.dumps({k: _pack(v) for k, v in kwargs.items()}))


def test_tp_without_torchrun_is_refused(capsys, fixture):
    assert main(["serve", "--model", str(fixture / "model"), "--vae", str(fixture / "vae"), "--tp", "2"]) == 2
    assert "--tp 2 needs 2 processes" in capsys.readouterr().err


class CountingPipe:
    """A stand-in pipeline: ``steps`` tokens, each an all-reduce over the ranks (as the TP backbone's are), the
    callback after each; draws one number from the generator per token. Raises ValueError for ``prompt="bad"``
    before any token, on every rank."""

    device = torch.device("cpu")

    def __init__(self):
        self.seen = []  # (prompt, tokens done, draws)

    def _generate(self, prompt, steps=4, generator=None, callback=None, progress=True):
        import torch.distributed as dist

        if prompt == "bad":
            raise ValueError("bad prompt")
        draws = []
        try:
            for k in range(steps):
                t = torch.ones(1)
                dist.all_reduce(t)
                draws.append(torch.rand(1, generator=generator).item())
                if callback is not None:
                    callback(k + 1, steps, t)
        finally:
            self.seen.append((prompt, len(draws), draws))
        return draws


def _replicate_worker(rank: int, init: str, out: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from nextstep.serve.replicate import Leader, follow

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    pipe = CountingPipe()
    result = {}
    if rank == 0:
        leader = Leader(pipe, mesh)
        result["first"] = leader._generate(prompt="a", steps=3, generator=torch.Generator().manual_seed(1))
        try:
            leader._generate(prompt="bad")
        except ValueError as e:
            result["bad"] = str(e)

        def cancel_at_2(step, total, partial):
            if step == 2:
                raise KeyError("cancelled")

        try:
            leader._generate(prompt="c", steps=5, generator=torch.Generator().manual_seed(2), callback=cancel_at_2)
        except KeyError as e:
            result["cancelled"] = str(e)
        result["last"] = leader._generate(prompt="d", steps=2, generator=torch.Generator().manual_seed(3))
        leader.shutdown()
    else:
        result["calls"] = follow(pipe, mesh)
    result["seen"] = pipe.seen
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # the file writes above come after the protocol's own barrier: meet again before tearing down
    dist.destroy_process_group()
    # Under load a rank aborted at interpreter exit now and then ("terminate called without an active exception":
    # a gloo thread destroyed while joinable, after everything above had finished); leave without finalization.
    os._exit(0)


@pytest.mark.slow
def test_followers_replay_the_leaders_calls_and_stop_at_its_token(tmp_path):
    import torch.multiprocessing as mp

    # a file rendezvous: a free port chosen here could be taken by another test's process before rank 0 binds it
    mp.spawn(_replicate_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    lead, fol = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert lead["bad"] == "bad prompt" and lead["cancelled"] == "'cancelled'"
    assert fol["calls"] == 4
    assert fol["seen"] == lead["seen"]  # same prompts, same stop token (2 of 5), same generator draws
    assert [(p, n) for p, n, _ in lead["seen"]] == [("a", 3), ("c", 2), ("d", 2)]
    assert lead["first"] == torch.rand(3, generator=torch.Generator().manual_seed(1)).tolist()


def pixels(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def session_processes(sid: int) -> list[int]:
    """The live (not zombie) processes of session ``sid``: torchrun and its ranks."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def wait_for(check, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.1)
    logs = [log, *sorted(log.parent.rglob("std*.log"))]
    raise AssertionError(f"timed out waiting for {what}; logs:\n" + "\n".join(f"{f}:\n{f.read_text()[-3000:]}"
                                                                              for f in logs))


def one_process_pixels(fixture: Path) -> np.ndarray:
    """BODY drawn by one process, with the pipeline arguments the server builds for it."""
    from nextstep.pipeline import NextStepPipeline

    pipe = NextStepPipeline.from_pretrained(fixture / "model", fixture / "vae")
    out = pipe(BODY["prompt"], height=64, width=64, num_inference_steps=BODY["steps"],
               generator=torch.Generator().manual_seed(BODY["seed"]), progress=False)
    return np.asarray(out.images[0].convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_serve_tp2_matches_one_process_and_stops_cleanly(fixture, tmp_path):
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ranks = tmp_path / "ranks"  # each rank's stdout and stderr in its own file, apart from torchrun's
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir",
           str(ranks), "--redirects", "3", "-m",
           "nextstep.cli", "serve", "--model", str(fixture / "model"), "--vae", str(fixture / "vae"), "--tp", "2",
           "--port", "0"]  # a free port, which rank 0 prints (one chosen here could be taken before it binds)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        expected = one_process_pixels(fixture)  # while the ranks load

        def address():
            assert proc.poll() is None, f"the server exited ({proc.returncode}); see {tmp_path}"
            said = "".join(f.read_text() for f in ranks.rglob("0/stdout.log"))
            found = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)/", said)
            return found and found.group(1)

        with httpx.Client(base_url=wait_for(address, 60, "the server's address", log), timeout=60) as http:
            def up():
                assert proc.poll() is None, f"the server exited ({proc.returncode}); see {tmp_path}"
                try:
                    return http.get("/health").json()
                except httpx.TransportError:
                    return None

            wait_for(up, 60, "/health", log)
            first = http.post("/v1/images/generations", json=BODY)
            assert first.status_code == 200, first.text
            got = pixels(first.json()["data"][0]["b64_json"])
            diff = np.abs(got - expected).max()
            print(f"max pixel difference, 2 ranks vs 1 process: {diff}/255")
            assert diff <= PIXEL_TOL

            # a long request, cancelled after its first token: every rank must leave the call at the same token
            with http.stream("POST", "/v1/images/generations/stream",
                             json={**BODY, "size": "256x256", "steps": 20}) as r:
                for line in r.iter_lines():
                    if line.startswith("event: progress"):
                        break

            def cancelled():
                h = http.get("/health").json()
                return h if h["stats"]["cancelled"] == 1 and h["queue"]["depth"] == 0 else None

            wait_for(cancelled, 30, "the cancellation", log)
            again = http.post("/v1/images/generations", json=BODY)  # both ranks still in step
            assert again.status_code == 200, again.text
            assert again.json()["data"] == first.json()["data"]
            stats = http.get("/health").json()["stats"]
            assert stats == {"completed": 2, "failed": 0, "cancelled": 1, "rejected": 0}, json.dumps(stats)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: torchrun and both ranks get it
        proc.wait(30)
        wait_for(lambda: True if not session_processes(proc.pid) else None, 10, "both ranks to exit", log)
        errors = sorted(ranks.rglob("stderr.log"))
        assert len(errors) == 2
        for f in errors:  # torchrun itself reports the Ctrl-C it got with a traceback; the ranks stop quietly
            assert "Traceback" not in f.read_text(), f"{f}:\n{f.read_text()[-4000:]}"
        assert "Finished server process" in errors[0].read_text() + errors[1].read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
