"""The daemon's HTTP API, served by uvicorn's httptools protocol on a thread of its own.

``POST /v1/predictions``, ``POST /v1/labels``, ``GET /metrics``, ``GET /healthz``,
``GET /v1/status``. Bound to 127.0.0.1 unless told otherwise; with a token, every endpoint but
``/healthz`` needs ``Authorization: Bearer <token>``. Bodies over ``max_body_bytes`` get 413
without being read (a chunked one once it passes the limit), a full queue 429, a journal that
cannot be written 503 (both with ``Retry-After``), bad records 400 with a JSON body naming
them. Each of those is counted in
``lrwatch_ingest_errors_total{reason}``.

Why uvicorn with httptools (measured side by side, see docs/daemon.md "HTTP server"): of the
servers tried (uvicorn+httptools, aiohttp, granian, hypercorn) it used the least CPU per
1000-record request after the standard library, rejects ambiguous framing (``Transfer-Encoding``
with ``Content-Length``, two ``Content-Length`` headers) with 400 through llhttp, and one event
loop holds thousands of idle or slow connections without a thread each. The request work
(parse, validate, journal) is CPU-bound and runs on the loop itself: a thread hand-off would
only add GIL switches on a one-core daemon.

What uvicorn does not have is added by :class:`_ProtocolLimits`: a cap on open connections (the
connection over it gets 503 and is closed before anything is read), a deadline for a request's
headers from its first byte (slowloris), and an idle timeout while a body is incomplete. The
listening socket is made here, so the backlog is real and ``port=0`` is known before start.

The standard library's ``ThreadingHTTPServer`` served the API before; it was measured side by
side with this one (docs/daemon.md, "HTTP server": half the throughput, a backlog of 5, no
timeouts, ambiguous framing accepted) and then removed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import ssl
import threading
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .core import Daemon
from .records import strict_json

__all__ = ["DaemonServer"]

_log = logging.getLogger("lrwatch.daemon")
_ENDPOINTS = {"/v1/predictions": "predictions", "/v1/labels": "labels"}
_GETS = ("/metrics", "/healthz", "/v1/status")
_JSON = "application/json"
#: (status, body, content type, close the connection after it)
Response = tuple[int, bytes, str, bool]


class _Api:
    """The endpoints, independent of the server that carries them."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        token = daemon.config.token
        # None only: DaemonConfig refuses an empty token, so no empty string turns auth off
        self._expected = token.encode() if token is not None else None

    def authorized(self, header: bytes | None) -> bool:
        """Whether ``header`` is ``Bearer <token>``: the scheme in any case (HTTP's schemes
        are case-insensitive, RFC 9110 11.1: a Prometheus scrape with ``type: bearer`` sends
        ``bearer``, and was refused), then spaces, then the token exactly."""
        if self._expected is None:
            return True
        scheme, _, given = (header or b"").partition(b" ")
        ok = scheme.lower() == b"bearer"
        return hmac.compare_digest(given.lstrip(b" "), self._expected) and ok

    @staticmethod
    def json(status: int, obj: Any, close: bool = False) -> Response:
        return status, strict_json(obj), _JSON, close

    def get(self, path: str, auth: bytes | None) -> Response:
        d = self.daemon
        if path == "/healthz":
            ok, text = d.health()
            return (200 if ok else 503), f"{text}\n".encode(), "text/plain; charset=utf-8", False
        if not self.authorized(auth):
            return self.json(401, {"error": "missing or wrong bearer token"})
        if path == "/metrics":
            return 200, generate_latest(d.registry), CONTENT_TYPE_LATEST, False
        if path == "/v1/status":
            return self.json(200, d.status())
        if path in _ENDPOINTS:
            return self.json(405, {"error": f"{path} takes POST (records as JSON or NDJSON), "
                                            f"not GET"})
        return self.json(404, {"error": f"no such endpoint {path}; try /v1/predictions, "
                                        f"/v1/labels, /metrics, /healthz, /v1/status"})

    def before_body(self, path: str, auth: bytes | None, length: int,
                    encoding: bytes = b"") -> Response | None:
        """The answer to a POST that is refused before its body is read (``length`` -1: a
        chunked body, whose size is checked while it is read; ``encoding`` other than
        identity: a 415), or ``None`` to read it."""
        d = self.daemon
        if path in _GETS:
            return self.json(405, {"error": f"{path} takes GET, not POST"}, length > 1 << 20)
        if path not in _ENDPOINTS:
            return self.json(404, {"error": f"no such endpoint {path}; POST to "
                                            f"/v1/predictions or /v1/labels"}, length > 1 << 20)
        if not self.authorized(auth):
            d.reject("unauthorized")
            return self.json(401, {"error": "missing or wrong bearer token",
                                   "reason": "unauthorized"}, length > 1 << 20)
        if encoding not in (b"", b"identity"):
            d.reject("invalid_json")   # the body is not JSON as sent
            return self.json(415, {"error": f"Content-Encoding {encoding.decode('latin-1')!r} "
                                            f"is not supported: send the JSON uncompressed",
                                   "reason": "invalid_json"}, length > 1 << 20)
        if length > d.config.max_body_bytes:
            return self.too_large(length)
        return None

    def too_large(self, length: int | None) -> Response:
        """413 for a body over ``max_body_bytes`` (``None``: a chunked one, cut off there)."""
        limit = self.daemon.config.max_body_bytes
        self.daemon.reject("too_large")
        size = f"of {length} bytes" if length is not None else "sent in chunks"
        return self.json(413, {"error": f"body {size} is over the limit of {limit} bytes "
                                        f"(max_body_bytes)", "reason": "too_large"}, True)

    def post(self, path: str, body: bytes) -> Response:
        status, out = self.daemon.submit(_ENDPOINTS[path], body)
        return self.json(status, out)


def _headers(status: int, ctype: str, length: int, close: bool,
             path: str = "") -> list[tuple[bytes, bytes]]:
    h = [(b"content-type", ctype.encode()), (b"content-length", b"%d" % length)]
    if status in (429, 503):
        h.append((b"retry-after", b"1"))
    if status == 405:   # RFC 9110, 15.5.6: say which methods the resource takes
        h.append((b"allow", b"POST" if path in _ENDPOINTS else b"GET, HEAD"))
    if close:
        h.append((b"connection", b"close"))
    return h


class _Asgi:
    """The ASGI application uvicorn runs (HTTP only; no lifespan, no websockets)."""

    def __init__(self, api: _Api) -> None:
        self.api = api

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any],
                       send: Callable[[dict[str, Any]], Any]) -> None:
        if scope["type"] != "http":
            return
        auth: bytes | None = None
        length = 0   # neither Content-Length nor Transfer-Encoding: no body (RFC 9112, 6.3)
        encoding = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == b"content-length":
                length = int(v)  # llhttp checked it: digits only, one value
            elif k == b"content-encoding":
                encoding = v.strip().lower()
            elif k == b"transfer-encoding":
                length = -1   # chunked (llhttp refuses it together with Content-Length)
        method, path = scope["method"], scope["path"]
        if method == "GET" or method == "HEAD":
            resp = self.api.get(path, auth)
        elif method == "POST":
            refused = self.api.before_body(path, auth, length, encoding)
            if refused is None:
                try:
                    body = await _read_body(receive, self.api.daemon.config.max_body_bytes)
                except _BodyTooLarge:
                    resp = self.api.too_large(None)
                else:
                    if body is None:  # the client hung up mid-body: not a request, not counted
                        return
                    resp = self.api.post(path, body)
            else:
                resp = refused
        else:
            takes = "POST" if path in _ENDPOINTS else "GET or HEAD"  # as its Allow header
            resp = _Api.json(405, {"error": f"method {method} not allowed: {path} takes "
                                            f"{takes}"})
        status, data, ctype, close = resp
        await send({"type": "http.response.start", "status": status,
                    "headers": _headers(status, ctype, len(data), close, path)})
        await send({"type": "http.response.body", "body": data})


class _BodyTooLarge(Exception):
    """A chunked body (whose size no header announced) passed ``max_body_bytes``."""


async def _read_body(receive: Callable[[], Any], limit: int) -> bytes | None:
    """The body, or ``None`` when the client hung up before its end; :class:`_BodyTooLarge`
    once more than ``limit`` bytes came."""
    parts = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        part = msg.get("body", b"")
        size += len(part)
        if size > limit:
            raise _BodyTooLarge
        parts.append(part)
        if not msg.get("more_body"):
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
            b"content-length: 21\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
            b"too many connections\n")


class _ProtocolLimits:
    """A connection cap and request timeouts, mixed in before uvicorn's ``HttpToolsProtocol``.

    :func:`_protocol_class` makes the class uvicorn runs and sets the limits below on it; this
    mixin imports nothing from uvicorn (``self.loop``, ``self.transport``, ``self.cycle`` and
    the rest are that protocol's), so the module still loads without it.
    """

    _max_connections: int
    _header_timeout: float
    _read_timeout: float
    _body_high_water: int
    # set by HttpToolsProtocol
    loop: asyncio.AbstractEventLoop
    transport: Any
    connections: set[Any]
    cycle: Any
    flow: Any
    client: tuple[str, int] | None

    _deadline: float | None = None
    _timer: asyncio.TimerHandle | None = None
    _in_body = False
    _refused = False

    def connection_made(self, transport: Any) -> None:
        if len(self.connections) >= self._max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)  # type: ignore[misc]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # uvicorn writes the head and the body of an answer separately; with Nagle's
            # algorithm the body waits for the client's delayed ACK (40 ms a request)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm(self._header_timeout)  # the first request's headers

    def _refuse(self, transport: Any) -> None:
        # answer, then close a little later: closing at once would reset the
        # connection when the client's request arrives, and it might never read this
        self._refused = True
        self.transport = transport  # what connection_lost reads
        transport.write(_REFUSAL)
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(1.0, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_body:
            self._deadline = self.loop.time() + self._read_timeout  # idle, not total
        super().data_received(data)  # type: ignore[misc]

    def on_body(self, body: bytes) -> None:
        # uvicorn pauses reading past 64 KiB until the app takes the body; a batch of
        # 1000 records is ~600 KiB, so that is ten pause/resume rounds (epoll calls, loop
        # turns) per request. The body size is bounded by max_body_bytes (checked before
        # it is read), so buffer up to that instead.
        cycle = self.cycle
        if cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > self._body_high_water:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_begin(self) -> None:
        super().on_message_begin()  # type: ignore[misc]
        self._arm(self._header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()  # type: ignore[misc]
        self._in_body = True
        self._arm(self._read_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()  # type: ignore[misc]
        self._in_body = False
        self._deadline = None  # the keep-alive timeout takes over after the response

    def _arm(self, seconds: float) -> None:
        self._deadline = self.loop.time() + seconds
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._expire)

    def _expire(self) -> None:
        # one timer per connection, pushed forward instead of re-created per chunk
        self._timer = None
        if self._deadline is None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._expire)
            return
        _log.debug("closing a connection that sent nothing in time: %s", self.client)
        self.transport.close()


def _protocol_class(max_connections: int, header_timeout: float, read_timeout: float,
                    body_high_water: int) -> type:
    """uvicorn's httptools protocol with :class:`_ProtocolLimits` and these limits."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("_Protocol", (_ProtocolLimits, HttpToolsProtocol), {
        "__doc__": "uvicorn's httptools protocol plus a connection cap and request timeouts.",
        "_max_connections": max_connections, "_header_timeout": header_timeout,
        "_read_timeout": read_timeout, "_body_high_water": body_high_water})


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say they are TCP
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:   # "[Errno 98] Address already in use" named neither port nor fix
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port} ({exc.strerror or exc}): "
                      "give another --port (0 picks a free one), or stop what holds it"
                      ) from exc
    sock.setblocking(False)
    return sock


def _raise_fd_limit(want: int) -> None:
    """Each connection is a file descriptor: lift the soft limit toward ``want`` (never past
    the hard limit) so a full house of connections does not make accept() fail."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not POSIX, or not allowed
        pass


class DaemonServer:
    """Serves a :class:`Daemon` over HTTP on a background thread.

    >>> # server = DaemonServer(daemon); server.start(); ...; server.stop()
    """

    def __init__(self, daemon: Daemon, host: str | None = None,
                 port: int | None = None) -> None:
        self.daemon = daemon
        cfg = daemon.config
        host = host or cfg.host
        port = cfg.port if port is None else port
        self._api = _Api(daemon)
        self._thread: threading.Thread | None = None
        _raise_fd_limit(cfg.max_connections + 256)
        self._sock = _listen(host, port, cfg.backlog)
        self._address = self._sock.getsockname()[:2]
        import uvicorn

        tls: dict[str, Any] = {}
        if cfg.tls_certfile:
            tls = {"ssl_certfile": cfg.tls_certfile, "ssl_keyfile": cfg.tls_keyfile,
                   "ssl_version": ssl.PROTOCOL_TLS_SERVER}
        self._config = uvicorn.Config(
            _Asgi(self._api), http=_protocol_class(cfg.max_connections, cfg.header_timeout,
                                                   cfg.read_timeout, cfg.max_body_bytes),
            loop="asyncio", ws="none", lifespan="off", log_config=None, access_log=False,
            server_header=False, proxy_headers=False, backlog=cfg.backlog,
            timeout_keep_alive=cfg.keep_alive_timeout, timeout_graceful_shutdown=5, **tls)
        self._server = uvicorn.Server(self._config)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._address
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = "https" if self.daemon.config.tls_certfile else "http"
        return f"{scheme}://{host}:{port}" if ":" not in host else f"{scheme}://[{host}]:{port}"

    def start(self) -> "DaemonServer":
        self._thread = threading.Thread(target=self.serve_forever, name="lrwatch-http",
                                        daemon=True)
        self._thread.start()
        for _ in range(500):   # listening already; wait until the loop accepts
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        return self

    def serve_forever(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()
