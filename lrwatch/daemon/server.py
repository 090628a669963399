"""The daemon's HTTP API (standard library ``ThreadingHTTPServer``).

``POST /v1/predictions``, ``POST /v1/labels``, ``GET /metrics``, ``GET /healthz``,
``GET /v1/status``. Bound to 127.0.0.1 unless told otherwise; with a token, every endpoint but
``/healthz`` needs ``Authorization: Bearer <token>``. Bodies over ``max_body_bytes`` get 413
without being read, a full queue 429, bad records 400 with a JSON body naming them. Each of
those is counted in ``lrwatch_ingest_errors_total{reason}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .core import Daemon

__all__ = ["DaemonServer"]

_log = logging.getLogger("lrwatch.daemon")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        _log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if status == 429:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode())

    def _authorized(self) -> bool:
        token = self.server.daemon.config.token
        if not token:
            return True
        got = self.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
            return
        if not self._authorized():
            self._json(401, {"error": "missing or wrong bearer token"})
            return
        if path == "/metrics":
            self._send(200, generate_latest(self.server.daemon.registry), CONTENT_TYPE_LATEST)
        elif path == "/v1/status":
            self._json(200, self.server.daemon.status())
        else:
            self._json(404, {"error": f"no such endpoint {path}; try /v1/predictions, "
                                      f"/v1/labels, /metrics, /healthz, /v1/status"})

    def do_POST(self) -> None:  # noqa: N802
        d = self.server.daemon
        path = self.path.split("?", 1)[0]
        kind = {"/v1/predictions": "predictions", "/v1/labels": "labels"}.get(path)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if kind is None:
            self._discard(length)
            self._json(404, {"error": f"no such endpoint {path}; POST to /v1/predictions or "
                                      f"/v1/labels"})
            return
        if not self._authorized():
            self._discard(length)
            d.reject("unauthorized")
            self._json(401, {"error": "missing or wrong bearer token", "reason": "unauthorized"})
            return
        if length < 0:
            d.reject("too_large")
            self.close_connection = True
            self._json(411, {"error": "a Content-Length header is required",
                             "reason": "too_large"})
            return
        if length > d.config.max_body_bytes:
            d.reject("too_large")
            self.close_connection = True  # do not read the body
            self._json(413, {"error": f"body of {length} bytes is over the limit of "
                                      f"{d.config.max_body_bytes}", "reason": "too_large"})
            return
        body = self.rfile.read(length)
        status, out = d.submit(kind, body)
        self._json(status, out)

    def _discard(self, length: int) -> None:
        if 0 < length <= 1 << 20:
            self.rfile.read(length)
        else:
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], daemon: Daemon) -> None:
        self.daemon = daemon
        super().__init__(addr, _Handler)


class DaemonServer:
    """Serves a :class:`Daemon` over HTTP on a background thread.

    >>> # server = DaemonServer(daemon); server.start(); ...; server.stop()
    """

    def __init__(self, daemon: Daemon, host: str | None = None, port: int | None = None) -> None:
        self.daemon = daemon
        cfg = daemon.config
        self._httpd = _Server((host or cfg.host, cfg.port if port is None else port), daemon)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "DaemonServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="lrwatch-http",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
