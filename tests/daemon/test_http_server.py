"""The HTTP server: RFC 9112 framing, keep-alive, timeouts, a cap on connections, slow clients,
TLS. Real sockets on loopback ports the tests pick; no timing targets here (those are in
``benchmarks/daemon_throughput.py``), only generous limits that a hung server would miss."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from daemon_helpers import assert_balanced

GOOD = {"features": {"x": 1.0, "y": 0.5, "c": "a"}, "prediction": 0.4}
BODY = json.dumps(GOOD).encode()


def _raw(url_port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", url_port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


def _port(r) -> int:
    return r.server.address[1]


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("request_bytes", [
    # Transfer-Encoding and Content-Length together: ambiguous (request smuggling)
    b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" % len(BODY) + BODY,
    # two different Content-Length headers
    b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
    b"Content-Length: %d\r\n\r\n" % (len(BODY), len(BODY) + 1) + BODY,
    # a Content-Length that is not a number
    b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n" + BODY,
    # a bare LF line ending inside the headers is not HTTP/1.1 framing either
    b"POST /v1/predictions HTTP/1.1\r\nHost: x\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
])
def test_ambiguous_framing_is_a_400_and_nothing_is_counted(run_daemon, request_bytes) -> None:
    r = run_daemon()
    out = _raw(_port(r), request_bytes)
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert r.post("/v1/predictions", GOOD)[0] == 200  # still serving
    r.daemon.drain()
    assert r.daemon.counters["received"] == 1
    assert_balanced(r.daemon)


def test_keep_alive_serves_many_requests_on_one_connection(run_daemon) -> None:
    r = run_daemon()
    conn = http.client.HTTPConnection("127.0.0.1", _port(r), timeout=10)
    conn.connect()
    first = conn.sock.getsockname()
    for _ in range(20):
        conn.request("POST", "/v1/predictions", body=BODY)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["accepted"] == 1
        assert conn.sock is not None and conn.sock.getsockname() == first
    conn.request("GET", "/v1/status")
    assert conn.getresponse().status == 200
    conn.close()
    assert r.metric("lrwatch_predictions_total") == 20


def test_oversize_body_is_413_before_it_is_read(run_daemon) -> None:
    # chunked bodies: tests/daemon/test_fifteenth_audit.py (they were 411 before)
    r = run_daemon(max_body_bytes=1000)
    out = _raw(_port(r), b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         b"5000\r\n\r\n" + b"x" * 100)
    assert out.startswith(b"HTTP/1.1 413") and b"connection: close" in out.lower()
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "too_large"}) == 1
    assert_balanced(r.daemon)


def test_slow_headers_and_stalled_bodies_are_cut_off_and_not_counted(run_daemon) -> None:
    r = run_daemon(header_timeout=0.5, read_timeout=0.5)
    port = _port(r)
    slowloris = socket.create_connection(("127.0.0.1", port))
    slowloris.sendall(b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    for _ in range(3):  # a header line now and then does not keep it open
        time.sleep(0.2)
        try:
            slowloris.sendall(b"X-A: b\r\n")
        except OSError:
            break
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                    % len(BODY) + BODY[:10])
    idle = socket.create_connection(("127.0.0.1", port))  # never sends a byte
    assert _closed_within(slowloris, 10) and time.monotonic() - t0 < 10
    assert _closed_within(stalled, 10)
    assert _closed_within(idle, 10)
    for s in (slowloris, stalled, idle):
        s.close()
    # a client that hangs up mid-body was never a request: nothing counted, nothing logged
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
    time.sleep(0.2)
    assert r.post("/v1/predictions", GOOD)[0] == 200
    r.daemon.drain()
    assert r.daemon.counters["received"] == 1
    assert r.metric("lrwatch_internal_errors_total") == 0
    assert_balanced(r.daemon)


def test_connections_over_the_cap_get_503_and_the_others_are_served(run_daemon) -> None:
    r = run_daemon(max_connections=20)
    port = _port(r)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        time.sleep(0.2)
        out = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in out.lower()
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert r.get("/healthz")[0] == 200


def test_a_thousand_slow_clients_do_not_stop_a_normal_one(run_daemon) -> None:
    """Functional only (the 100 ms figure is measured by the benchmark): with 1000 clients
    holding half-sent requests, a normal client is served on a fresh connection."""
    r = run_daemon()
    port = _port(r)
    slow = []
    try:
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                      if i % 2 else b"POST /v1/predictions HTTP/1.1\r\nHo")
            slow.append(s)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/predictions", body=BODY)
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        for s in slow:
            s.close()
    assert_balanced(r.daemon)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_when_a_certificate_is_configured(run_daemon, tmp_path) -> None:
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=localhost"], check=True,
                   capture_output=True)
    r = run_daemon(tls_certfile=cert, tls_keyfile=key)
    assert r.url.startswith("https://")
    ctx = ssl.create_default_context(cafile=cert)
    ctx.check_hostname = False
    conn = http.client.HTTPSConnection("127.0.0.1", _port(r), context=ctx, timeout=10)
    conn.request("POST", "/v1/predictions", body=BODY)
    assert conn.getresponse().status == 200
    conn.close()
    assert r.metric("lrwatch_predictions_total") == 1


def test_metrics_are_promtool_clean_with_one_build_info(run_daemon) -> None:
    from services import promtool_check_metrics

    r = run_daemon()
    assert r.post("/v1/predictions", GOOD)[0] == 200
    r.daemon.drain()
    status, text = r.get("/metrics")
    assert status == 200
    rc, out = promtool_check_metrics(text)
    assert rc == 0, out
    build = [ln for ln in text.decode().splitlines() if ln.startswith("lrwatch_build_info{")]
    assert len(build) == 1 and 'component="daemon"' in build[0] and "python=" in build[0]


def test_accepted_connections_have_nagle_off(run_daemon) -> None:
    """An answer's head and body are separate writes: with Nagle's algorithm on, the body
    waits for the client's delayed ACK (it cost 40 ms a request before)."""
    r = run_daemon()
    conn = http.client.HTTPConnection("127.0.0.1", _port(r), timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b"ok\n"
    protocols = list(r.server._server.server_state.connections)
    assert protocols
    for p in protocols:
        sock = p.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    conn.close()


def test_alerts_sent_is_exported_at_zero_without_sinks(run_daemon) -> None:
    """DESIGN.md's engine family ``lrwatch_alerts_sent_total`` was absent from a daemon with no
    alert sink, so what reads it saw missing data; it is 0 (no ``sink`` label) there, and a
    daemon with sinks exports one series per sink instead."""
    from services import promtool_check_metrics

    bare = run_daemon()
    status, text = bare.get("/metrics")
    assert status == 200
    sent = [ln for ln in text.decode().splitlines() if ln.startswith("lrwatch_alerts_sent_total")]
    assert sent == ["lrwatch_alerts_sent_total 0.0"]
    rc, out = promtool_check_metrics(text.decode())
    assert rc == 0, out
    logged = run_daemon(log_alerts=True)
    text = logged.get("/metrics")[1].decode()
    sent = [ln for ln in text.splitlines() if ln.startswith("lrwatch_alerts_sent_total")]
    assert sent == ['lrwatch_alerts_sent_total{sink="log"} 0.0']
