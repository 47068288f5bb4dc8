"""One misbehaving client cannot lock the others out of ``serve``'s waitress (edge_retrieval/web/connections.py): a
stream whose client stopped reading is closed and its generator ends (its slot is free again), a request trickled
a byte at a time is closed, and one host's pile of connections gives way to its next request. Real sockets against
the real server; the limits come from a YAML config."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from edge_retrieval.core.config_file import load_config
from edge_retrieval.web.connections import create_server
from tests.support.serve import free_port


class App:
    """A WSGI app with a fast endless stream (what a live view is to waitress) and a health answer."""

    def __init__(self):
        self.streams_closed = threading.Event()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/stream":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return self._stream()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    def _stream(self):
        try:
            while True:
                yield b"x" * 65536
        finally:  # waitress closes the iterator when the connection goes: this is where a slot is released
            self.streams_closed.set()


@pytest.fixture()
def served(tmp_path):
    port = free_port()
    (tmp_path / "config.yaml").write_text(
        f"web:\n  host: 127.0.0.1\n  port: {port}\n  threads: 4\n  channel_timeout_s: 120\n"
        "  cleanup_interval_s: 0.2\n  write_timeout_s: 1\n  request_timeout_s: 1\n  max_connections_per_client: 8\n")
    config = load_config(tmp_path / "config.yaml").web
    app = App()
    server = create_server(app, config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield app, port
    server.task_dispatcher.shutdown()
    server.trigger.pull_trigger(server.close)
    thread.join(timeout=5)


def _health(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return s.recv(4096)


def _closed_by_server(s: socket.socket, trickle: bool, limit: int = 300) -> bool:
    """Whether the server closes ``s`` (sending one more byte of a request every 0.1 s when ``trickle``)."""
    s.settimeout(0.1)
    for _ in range(limit):
        try:
            if s.recv(4096) == b"":
                return True
        except TimeoutError:
            pass
        except ConnectionError:
            return True
        if trickle:
            try:
                s.sendall(b"X")
            except OSError:
                return True
    return False


def test_a_stream_whose_client_stopped_reading_is_closed_and_its_generator_ends(served):
    app, port = served
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    stuck.connect(("127.0.0.1", port))
    stuck.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and never reads
    try:
        assert _health(port).startswith(b"HTTP/1.1 200")  # others are answered meanwhile
        assert app.streams_closed.wait(60), "the stuck stream kept its thread (no write timeout)"
        assert _health(port).startswith(b"HTTP/1.1 200")
    finally:
        stuck.close()


def test_a_request_trickled_a_byte_at_a_time_is_closed(served):
    _, port = served
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
    try:
        assert _closed_by_server(s, trickle=True), "a trickling request was never cut off"
    finally:
        s.close()


def test_one_host_piling_up_connections_gives_way_to_its_next_request(served):
    _, port = served
    pile = []
    try:
        for _ in range(20):  # past the cap of 8, each still sending its request
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
            pile.append(s)
        assert _health(port).startswith(b"HTTP/1.1 200")  # the same host's next request gets in
        closed = sum(_closed_by_server(s, trickle=False, limit=1) for s in pile[:12])
        assert closed >= 12 - 1, closed  # the oldest ones gave way
    finally:
        for s in pile:
            s.close()


def test_a_real_serve_stays_usable_for_a_second_user_while_one_client_misbehaves(tmp_path, small_catalog):
    """Round three: 520 half-sent requests (past web.connection_limit 500) timed the page out for everyone, and
    three live views that never read held the stream slots for as long as they liked."""
    import http.client

    from tests.support.serve import Serve
    serve = Serve(tmp_path, small_catalog, "  write_timeout_s: 2\n  cleanup_interval_s: 0.5\n")
    hoard = []
    try:
        serve.start()
        for _ in range(4):  # live views that never read: every slot (web.threads - 2)
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", serve.port))
            s.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            hoard.append(s)
        for _ in range(520):  # half-sent requests
            s = socket.create_connection(("127.0.0.1", serve.port), timeout=10)
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            hoard.append(s)
        assert serve.request("GET", "/api/health")[0] in (200, 503)
        assert serve.request("GET", "/api/status")[0] == 200
        view = None
        for _ in range(600):  # the stuck views lose their slots after web.write_timeout_s without a byte read
            conn = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=10)
            conn.request("GET", "/stream.mjpg")
            response = conn.getresponse()
            if response.status == 200:
                view = response.read(100)
                conn.close()
                break
            response.read()
            conn.close()
            time.sleep(0.1)
        assert view is not None and b"--frame" in view, "a second user never got a live view"
    finally:
        for s in hoard:
            s.close()
        serve.stop()
