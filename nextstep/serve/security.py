"""Who may use the server. A browser lets any web page send requests to a server on the user's machine, so the
server checks three things itself:

- ``Host`` must name this server (a loopback name or address, the address it is bound to, or the host of an
  allowed origin): a page on another site that re-points its own DNS name at 127.0.0.1 (DNS rebinding) sends its
  own name and is refused.
- ``Origin``, when a browser sends one, must be the server's own (the page it serves) or one given with
  ``allow_origins``: a page on another site cannot start generations (the JSON routes also refuse any content type
  but ``application/json``, which no cross-site form or simple request can send without a CORS preflight).
- ``Authorization: Bearer KEY``, when an API key is set, on every route but the page's own files (``/``, its script
  and style: they hold no secrets, and the page asks for the key) and the OpenAPI schema.

Refusals are ``ApiError``s: 403 for the host or origin, 401 for the key.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import InputError
from .schemas import ApiError

LOOPBACK_NAMES = frozenset({"localhost"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})  # bind to every interface: not a name a client can use
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, IPv6 without brackets) only reaches this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_port(netloc: str) -> tuple[str, int | None] | None:
    """``name[:port]`` or ``[v6]:port`` -> (lower-case name without brackets, port or None); None if malformed."""
    try:
        parts = urlsplit(f"//{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return host, port


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` in the form browsers send it (lower case, default port left out); ValueError for
    anything else, so a mistyped ``--allow-origin`` fails at startup."""
    parts = urlsplit(origin.strip())
    hp = _host_port(parts.netloc) if parts.scheme in DEFAULT_PORTS and parts.path in ("", "/") else None
    if hp is None or parts.query or parts.fragment:
        raise InputError(f"an allowed origin looks like http://HOST or https://HOST:PORT (no path), got {origin!r}")
    host, port = hp
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + ("" if port in (None, DEFAULT_PORTS[parts.scheme]) else f":{port}")


@dataclass(frozen=True)
class Access:
    """The server's access rules: an optional API key, origins allowed besides its own, the address it is bound to.
    The default (no key, no origins) serves loopback clients and the server's own page only."""

    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    bound_host: str | None = None
    hosts: frozenset[str] = field(init=False)

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("the API key is empty")
        origins = tuple(dict.fromkeys(normalize_origin(o) for o in self.allow_origins))
        bound = (self.bound_host or "").strip("[]").lower()
        hosts = {urlsplit(o).hostname for o in origins} | ({bound} - WILDCARD_HOSTS)
        object.__setattr__(self, "allow_origins", origins)
        object.__setattr__(self, "hosts", frozenset(hosts))

    def host_allowed(self, host_header: str) -> bool:
        hp = _host_port(host_header)
        return hp is not None and (hp[0] in self.hosts or is_loopback(hp[0]))

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        """The server's own origin (the page it serves: same host and port as the request) or an allowed one."""
        try:
            origin = normalize_origin(origin)
        except ValueError:  # "null" (sandboxed frames, file: pages) and anything malformed
            return False
        if origin in self.allow_origins:
            return True
        try:
            own = normalize_origin(f"{urlsplit(origin).scheme}://{host_header}")
        except ValueError:
            return False
        return origin == own

    def key_matches(self, token: str | None) -> bool:
        """No key set, or the right key (compared in constant time, so its bytes cannot be guessed one by one)."""
        if self.api_key is None:
            return True
        return token is not None and hmac.compare_digest(token.encode(), self.api_key.encode())

    def refusal(self, headers: Headers) -> ApiError | None:
        """Why a request's ``Host`` or ``Origin`` is refused, or None."""
        host = headers.get("host", "")
        if not self.host_allowed(host):
            return ApiError(403, f"host {host!r} is not one of this server's names; start the server with "
                                 f"--allow-origin http://NAME:PORT to serve under another name",
                            code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return ApiError(403, f"requests from pages at {origin!r} are not allowed; start the server with "
                                 f"--allow-origin to allow a web page on another origin", code="origin_not_allowed")
        return None

    def key_error(self) -> ApiError:
        return ApiError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                        code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class HostOriginGuard:
    """ASGI middleware, outermost: answers a refused ``Host`` or ``Origin`` with a 403 before anything else runs."""

    def __init__(self, app: ASGIApp, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.access.refusal(Headers(scope=scope))
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
