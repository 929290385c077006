"""Running the server: ``serve()`` loads a model and runs it under uvicorn until interrupted (``nextstep serve``);
``running_server()`` runs an app on a background thread for tests and notebooks."""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn

from .. import hub
from ..checkpoint import require_dir
from ..errors import InputError
from ..pipeline import NextStepPipeline
from .limits import QUEUE_SIZE
from .routes import create_app
from .security import Access, is_loopback

log = logging.getLogger("nextstep.serve")


def check_exposure(host: str, access: Access, public_without_key: bool) -> None:
    """Refuse to bind beyond loopback without an API key (anyone who can reach the port could use the GPU), unless
    the caller says so explicitly (a trusted network, or a proxy in front that authenticates)."""
    if not is_loopback(host.strip("[]")) and access.api_key is None and not public_without_key:
        raise InputError(f"refusing to serve on {host} without an API key: anyone who can reach it could use it. Set "
                         f"a key (--api-key KEY or the NEXTSTEP_API_KEY environment variable; clients send "
                         f"'Authorization: Bearer KEY'), or pass --public-without-key if the network is trusted")


def serve(model_dir=None, vae_dir=None, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          dtype: torch.dtype | str | None = None, queue_size: int = QUEUE_SIZE, api_key: str | None = None,
          allow_origins: tuple[str, ...] = (), public_without_key: bool = False, head=None, tp: int = 1,
          reproducible: bool = False, loras: dict[str, str] | None = None) -> None:
    """Load a model (default: the bundled one) and serve it until interrupted. ``device`` defaults to CUDA when
    available; ``dtype`` to bfloat16 on GPU, float32 on CPU. ``api_key``: clients must send it as a bearer token;
    ``allow_origins``: web pages on these origins may call the API (``security``). Binding beyond loopback needs a
    key or ``public_without_key``; both are checked before the model loads. ``head``: a distilled few-step head
    directory, for requests with ``"fast": true``. ``tp``: split the model over this many processes, started by
    torchrun (``--nproc_per_node tp``): rank 0 serves and each call it makes is replayed on the others
    (``replicate``); every rank runs this function and returns when rank 0 is interrupted. ``reproducible``: batched
    calls keep one fixed layout, so a request's images do not depend on what it is batched with (``worker``).
    ``loras``: {name: adapter directory}, loaded once; a request picks one by its ``lora`` field (default: the base)."""
    access = Access(api_key=api_key, allow_origins=tuple(allow_origins), bound_host=host)
    options = {"queue_size": queue_size, "reproducible": reproducible}  # create_app's
    check_exposure(host, access, public_without_key)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"--port must be from 0 to 65535 (0: a free port), got {port!r}")
    if model_dir is not None and not hub.REPO_ID.match(str(model_dir)):  # a missing directory: before the port
        require_dir(Path(model_dir), "model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if tp < 1:
        raise InputError(f"tp must be >= 1, got {tp}")
    loras = dict(loras or {})
    if loras and tp > 1:
        raise InputError("LoRA adapters and tensor parallelism cannot be combined yet")
    for name, d in loras.items():  # a missing directory: before the model loads
        require_dir(Path(d), f"LoRA adapter {name!r}")
    if tp == 1:
        with listen(host, port) as sock:  # before the model loads: a port in use is found in a moment
            pipe = NextStepPipeline.from_pretrained(model_dir, vae_dir, dtype=dtype, device=device, head=head)
            if loras:
                for name, d in loras.items():
                    pipe.load_lora(d, name=name)
                pipe.set_lora(None)  # requests name their adapter; none: the base
            _run(pipe, model_dir, sock, host, access, options, f"{device}, {dtype}")
        return
    from ..parallel import join_tensor_parallel
    from ..train.distributed import shutdown

    try:
        info, mesh, device = join_tensor_parallel(tp, torch.device(device))
        with listen(host, port) if info.is_main else contextlib.nullcontext() as sock:
            # (a rank-0 port in use ends rank 0 here; the others then fail at their first collective)
            pipe = NextStepPipeline.from_pretrained(model_dir, vae_dir, dtype=dtype, device=device, head=head,
                                                    tp_mesh=mesh)
            if info.is_main:
                _lead(pipe, mesh, model_dir, sock, host, access, options, f"{device}, {dtype}, {tp} ranks")
            else:
                _follow(pipe, mesh)
    finally:
        shutdown()


def _lead(pipe, mesh, model_dir, sock, host, access, options: dict, where: str) -> None:
    """Rank 0: serve with the replicating pipeline; then release the followers. SIGTERM (what torchrun sends its
    processes when it is stopped) ends the server as Ctrl-C does instead of killing the process after uvicorn's
    graceful shutdown, so the followers always hear the shutdown."""
    from .replicate import Leader

    leader = Leader(pipe, mesh)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _run(leader, model_dir, sock, host, access, options, where)
    except KeyboardInterrupt:  # a signal while uvicorn was not running its handlers
        pass
    finally:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # already stopping: more signals change nothing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        leader.shutdown()  # waits for the call in progress (the worker cancels it at its next token)
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, previous)


def _follow(pipe, mesh) -> None:
    """Ranks > 0: replay rank 0's calls until it shuts down. Signals are ignored (torchrun and a terminal's Ctrl-C
    reach every rank): the leader says when to stop, after its last call, so no rank leaves a collective early."""
    from .replicate import follow

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    follow(pipe, mesh)


@contextlib.contextmanager
def listen(host: str, port: int) -> Iterator[socket.socket]:
    """A socket bound to ``host``:``port`` (0: a free port), for uvicorn to serve on; an address that cannot be had
    (in use, not this machine's, a privileged port) is an InputError that says what to do."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = ("another program is listening there (another nextstep serve?): choose another --port, or --port 0 "
                "for a free one" if e.errno == errno.EADDRINUSE else "choose another --host or --port")
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None
    try:
        yield sock
    finally:
        sock.close()


def _run(pipe, model_dir, sock: socket.socket, host: str, access, options: dict, where: str) -> None:
    name = Path(model_dir).name if model_dir is not None else "bundled"
    app = create_app(pipe, model_name=name, access=access, **options)
    if not is_loopback(host.strip("[]")) and access.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    port = sock.getsockname()[1]  # the real one when --port 0 asked for any
    print(f"nextstep: serving {name} on http://{host if ':' not in host else f'[{host}]'}:{port}/ ({where})")
    try:
        _Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
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
