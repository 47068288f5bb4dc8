"""Server push (edge_retrieval/outputs/push.py, GET /api/events): the hub never waits for a client, the status is sent when it
changed, and a real appliance behind a real waitress streams lookup_started / lookup_finished / status /
catalog_changed as text/event-stream, within a bounded number of streams that each end in time. Loopback
only; every wait is bounded."""
from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from edge_retrieval.core.config import SseConfig, WebConfig
from edge_retrieval.core.status import Status
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.outputs.push import PushHub, status_digest
from edge_retrieval.web import WAITRESS_LOOKAHEAD, create_app
from tests.conftest import FAST, make_appliance, view

TOKEN = "s3cret-token"


def _status(**changes) -> Status:
    s = {"camera": {"state": "streaming", "fps": 9.8}, "trigger": {"enabled": True, "armed": False},
         "looking_up": False, "lookups_per_min": 0, "last_error": None,
         "process": {"cpu_percent": 12.0, "rss_mb": 150.0}, "index": {"size": 3, "generation": "gen-1"},
         "verification": {"enabled": True}, "latest": {"n": None}, "uptime_s": 1.0}
    s.update(changes)
    return Status.model_validate(s)


def test_a_client_that_stops_reading_never_blocks_publishing_and_is_disconnected():
    hub = PushHub(SseConfig(queue_size=5))
    stuck, reader = hub.open(), hub.open()
    got = []
    for i in range(1000):
        hub.publish("lookup_started", {"i": i})
        got += reader.next(0) or []
    assert stuck.ended == "slow client" and stuck.next(0) is None
    assert hub.slow_clients == 1 and hub.open_streams() == 1
    assert [e.data["i"] for e in got] == list(range(1000))  # the reader lost nothing
    hub.close()
    assert reader.next(1) is None and hub.open_streams() == 0


def test_the_status_is_sent_when_what_the_page_shows_changes_and_the_catalog_too():
    current = {"status": _status()}
    hub = PushHub(SseConfig(status_check_s=0.05))
    hub.watch(lambda: current["status"])
    stream = hub.open()
    first = stream.next(1)
    assert [e.kind for e in first] == ["status"]  # a new stream starts with the current status
    # what a steady device changes every second is not a change: uptime, fps and CPU within their step
    current["status"] = _status(uptime_s=5.0, camera={"state": "streaming", "fps": 10.1},
                                process={"cpu_percent": 14.0, "rss_mb": 151.0})
    assert status_digest(current["status"]) == status_digest(_status())
    current["status"] = _status(camera={"state": "reconnecting", "fps": 0.0})
    events = _collect(stream, lambda evs: any(e.kind == "status" for e in evs))
    assert events[-1].data.camera.state == "reconnecting"
    current["status"] = _status(camera={"state": "reconnecting", "fps": 0.0}, index={"size": 4, "generation": "gen-2"})
    events = _collect(stream, lambda evs: any(e.kind == "catalog_changed" for e in evs))
    assert [e.data.model_dump() for e in events if e.kind == "catalog_changed"] == [{"size": 4, "generation": "gen-2"}]
    stream.close()
    hub.close()


def _collect(stream, done, timeout_s: float = 10.0) -> list:
    deadline, out = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        out += stream.next(0.1) or []
        if done(out):
            return out
    raise AssertionError(f"timed out; got {[e.kind for e in out]}")


# ------------------------------------------------------------------------ a real appliance behind waitress

@pytest.fixture()
def appliance(tmp_path, catalog_dir, encoder):
    app = make_appliance(tmp_path, encoder, catalog_dir, recognition=FAST, index={"top_k": 3},
                         sse=SseConfig(stream_max_s=30, heartbeat_s=0.5, status_check_s=0.1, queue_size=20))
    app.catalog.start()  # its worker indexes enrolments
    yield app
    app.stop()


class EventReader:
    """A plain HTTP client reading ``GET /api/events`` as a browser's EventSource would."""

    def __init__(self, port: int, timeout_s: float = 10.0):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        self.conn.request("GET", "/api/events", headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        self.lines: list[str] = []

    def next_event(self) -> tuple[str, dict | str] | None:
        """The next (event kind, data) or ("retry", ms) or ("comment", text); None at the end of the stream."""
        fields: dict[str, str] = {}
        while True:
            raw = self.response.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            if line == "":
                if "event" in fields:
                    return fields["event"], json.loads(fields["data"])
                if "retry" in fields:
                    return "retry", fields["retry"]
                if "comment" in fields:
                    return "comment", fields["comment"]
                continue
            key, _, value = line.partition(":")
            fields["comment" if key == "" else key] = value.strip()

    def until(self, kind: str, limit: int = 200):
        seen = []
        for _ in range(limit):
            event = self.next_event()
            assert event is not None, f"the stream ended before {kind}; got {seen}"
            seen.append(event[0])
            if event[0] == kind:
                return event[1], seen
        raise AssertionError(f"no {kind} in {seen}")

    def close(self):
        self.response.close()  # the response holds the socket open too
        self.conn.close()


def _upload(port: int, jpeg: bytes) -> tuple[int, dict]:
    boundary = "----edge-test"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/api/query", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_a_lookup_is_pushed_as_it_starts_and_finishes_with_its_history_entry(appliance, waitress_server, photos):
    port = waitress_server(create_app(WebConfig(api_token=TOKEN), appliance))
    reader = EventReader(port)
    try:
        assert reader.response.status == 200
        assert reader.response.headers["Content-Type"].startswith("text/event-stream")
        assert reader.next_event() == ("retry", "1000")
        status, _ = reader.until("status")
        assert status["latest"]["n"] is None and status["index"]["size"] > 0
        code, result = _upload(port, encode_jpeg(view(photos, "rocket", "closeup", seed=3)))
        assert code == 200
        started, _ = reader.until("lookup_started")
        finished, _ = reader.until("lookup_finished")
        assert started["source"] == "upload"
        assert finished["n"] == 1 and finished["decision"] == "match" and finished["match"]["id"] == "rocket"
        assert finished["image_url"] == "/api/history/1/image.jpg"
        assert finished["results"][0]["thumbnail_url"].startswith("/api/catalog/")
        assert finished["timestamp"] == result["timestamp"]
        # the status follows (latest n changed) and heartbeats keep an idle stream written to
        changed, _ = reader.until("status")
        assert changed["latest"]["n"] == 1
        reader.until("comment")
    finally:
        reader.close()


def test_an_enrolment_is_pushed_as_catalog_changed(appliance, waitress_server, photos):
    port = waitress_server(create_app(WebConfig(api_token=TOKEN), appliance))
    reader = EventReader(port, timeout_s=60)
    try:
        before, _ = reader.until("status")
        appliance.enrol(encode_jpeg(photos["coffee"]), "Mug", "pushed/mug")
        catalog, _ = reader.until("catalog_changed", limit=2000)
        assert catalog["size"] == before["index"]["size"] + 1 and catalog["generation"] != before["index"]["generation"]
    finally:
        reader.close()


def test_streams_are_bounded_end_in_time_and_a_stuck_client_frees_its_slot(appliance, waitress_server, photos):
    app = create_app(WebConfig(api_token=TOKEN), appliance)  # threads 4 in the fixture: 2 long-lived slots
    app.config["MAX_STREAMS"] = 2
    port = waitress_server(app)
    appliance.push.config = SseConfig(stream_max_s=3, heartbeat_s=0.5, status_check_s=0.1, queue_size=5)
    first = EventReader(port)
    stuck = socket.create_connection(("127.0.0.1", port), timeout=10)  # asks, then never reads
    stuck.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        first.until("status")
        deadline = time.monotonic() + 10
        while appliance.push.open_streams() < 2:
            assert time.monotonic() < deadline, "the second stream did not open"
            time.sleep(0.05)
        # beyond the slots: 503 with Retry-After, at once (the page polls instead)
        third = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        third.request("GET", "/api/events")
        refused = third.getresponse()
        assert refused.status == 503 and refused.headers["Retry-After"] == "15"
        assert "poll /api/status" in json.loads(refused.read())["error"]
        third.close()
        # lookups go on while a client reads nothing (waitress buffers its output; the hub never waits for it)
        for seed in range(3):
            assert _upload(port, encode_jpeg(view(photos, "moon", "closeup", seed=seed)))[0] == 200
        # a stream ends after sse.stream_max_s with its retry hint (the browser reconnects), the stuck one too
        while first.next_event() is not None:
            pass
        assert first.lines[0] == "retry: 1000" and "event: lookup_finished" in first.lines
        deadline = time.monotonic() + 10
        while appliance.metrics.value("appliance_http_event_streams_open") > 0:
            assert time.monotonic() < deadline, "the slots were not freed"
            time.sleep(0.05)
    finally:
        first.close()
        stuck.close()


def test_a_page_that_closes_its_stream_frees_the_slot_before_any_heartbeat(appliance, waitress_server):
    appliance.push.config = SseConfig(stream_max_s=600, heartbeat_s=600)  # neither would free it in this test
    port = waitress_server(create_app(WebConfig(), appliance), **WAITRESS_LOOKAHEAD)  # as edge_retrieval.web.serve does
    for _ in range(3):  # a page reloaded three times
        reader = EventReader(port)
        reader.until("status")
        reader.close()
        deadline = time.monotonic() + 10
        while appliance.metrics.value("appliance_http_event_streams_open") > 0:
            assert time.monotonic() < deadline, "a closed stream still holds its slot"
            time.sleep(0.05)
