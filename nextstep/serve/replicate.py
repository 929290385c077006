"""Serving a tensor-parallel pipeline: every rank of the mesh must make the same pipeline calls (the backbone's
collectives run inside them), but only rank 0 (the leader) serves HTTP. The leader's pipeline is wrapped in
:class:`Leader`, which broadcasts each call's arguments before making it; the other ranks (followers) run
:func:`follow`, which makes the same calls and discards their outputs.

Stopping mid-call (a cancelled request, a server shutting down) stays in step: after every image token the leader
broadcasts whether its callback raised, and every rank leaves the call at that token. The leader's pipeline must
not fail between tokens where the followers do not (the calls are validated before they are queued, so what
reaches the pipeline is valid on every rank); a follower whose call fails anyway logs it and takes the next one.

Wire format (``broadcast_object_list``, one object): ``("call", args, kwargs)`` with each ``torch.Generator`` sent
as ``(_GENERATOR, device, state)`` and rebuilt with ``set_state``; ``("shutdown",)`` ends :func:`follow`. Then,
per image token, one int tensor: 1 to stop, 0 to go on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("nextstep.serve")

_GENERATOR = "__torch.Generator__"


class Stopped(Exception):
    """Raised in a follower's callback when the leader stopped the call at this token."""


def _pack(value: Any) -> Any:
    """Generators (alone or in a list, as the pipeline takes them) -> picklable state; anything else as is."""
    if isinstance(value, torch.Generator):
        return (_GENERATOR, str(value.device), value.get_state())
    if isinstance(value, list):
        return [_pack(v) for v in value]
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _GENERATOR:
        g = torch.Generator(device=value[1])
        g.set_state(value[2])
        return g
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    return value


class _Channel:
    """The leader-to-followers messages over one process group."""

    def __init__(self, group: dist.ProcessGroup | None, src: int, device: torch.device):
        self.group, self.src = group, src
        # nccl moves tensors on the GPU only; gloo on the CPU
        self.device = device if torch.device(device).type == "cuda" else torch.device("cpu")

    def message(self, obj: Any = None) -> Any:
        """The leader sends ``obj``; every rank returns it."""
        box = [obj]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    def flag(self, stop: bool = False) -> bool:
        """The leader sends ``stop``; every rank returns it."""
        t = torch.tensor([int(stop)], dtype=torch.int32, device=self.device)
        dist.broadcast(t, src=self.src, group=self.group)
        return bool(t.item())


def _channel(mesh, device: torch.device) -> _Channel:
    """The mesh's (1-D) group, its rank 0 leading."""
    group = mesh.get_group()
    return _Channel(group, dist.get_global_rank(group, 0), device)


class Leader:
    """Rank 0's pipeline: the wrapped one, each call first sent to the followers. Attributes are the pipeline's, so
    it stands in for it (``create_app(Leader(pipe, mesh))``). Calls are serialised: one at a time, and ``shutdown``
    waits for the call in progress."""

    def __init__(self, pipe, mesh):
        self.pipe = pipe
        self._channel = _channel(mesh, pipe.device)
        self._lock = threading.Lock()
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def _generate(self, *args, callback=None, **kwargs):
        """As the pipeline's ``_generate`` (the worker's entry); ``callback(step, total, partial)`` may raise to stop
        the call: every rank stops at that token and the leader re-raises the callback's exception."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the followers were shut down")
            self._channel.message(("call", [_pack(a) for a in args], {k: _pack(v) for k, v in kwargs.items()}))
            raised: list[BaseException] = []

            def on_token(step: int, total: int, partial: torch.Tensor) -> None:
                if callback is not None:
                    try:
                        callback(step, total, partial)
                    except BaseException as e:  # noqa: BLE001 - handed on below, after the followers hear of it
                        raised.append(e)
                if self._channel.flag(bool(raised)):
                    raise raised[0]

            return self.pipe._generate(*args, callback=on_token, **kwargs)

    def shutdown(self) -> None:
        """End the followers' loops (once; after the call in progress)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._channel.message(("shutdown",))
                dist.barrier(group=self._channel.group)  # no rank tears the group down while another still uses it


def follow(pipe, mesh) -> int:
    """A follower rank's loop: make each call the leader makes (the same arguments: an argument only the leader's
    call refused would leave this rank waiting for a token that never comes), outputs discarded, until the leader
    shuts down. Returns the number of calls made. A failing call is logged and the loop goes on; a failing
    broadcast (the leader gone) raises."""
    channel = _channel(mesh, pipe.device)

    def on_token(step: int, total: int, partial: torch.Tensor) -> None:
        if channel.flag():
            raise Stopped

    calls = 0
    while True:
        msg = channel.message()
        if msg[0] == "shutdown":
            dist.barrier(group=channel.group)  # the leader's, in Leader.shutdown
            return calls
        _, args, kwargs = msg
        kwargs = {k: _unpack(v) for k, v in kwargs.items()}
        kwargs.update(callback=on_token, progress=False)
        calls += 1
        try:
            pipe._generate(*[_unpack(a) for a in args], **kwargs)
        except Stopped:
            pass
        except Exception:  # noqa: BLE001 - the leader answers its client; this rank must stay in the loop
            log.exception("a replicated pipeline call failed on this rank")
