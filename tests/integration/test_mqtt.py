"""MQTT events, Home Assistant discovery and the webhook against real servers on 127.0.0.1: a real Mosquitto
(started per test on a free port, with a generated config) and a local http.server. Every wait is bounded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import paho.mqtt.client as mqtt
import pytest
from jinja2 import Environment

import edge_retrieval
import tests.support.mosquitto as broker_mod
from edge_retrieval.core.config import MqttConfig, WebhookConfig
from edge_retrieval.core.config_file import load_config
from edge_retrieval.core.errors import ConfigError
from edge_retrieval.core.results import Candidate, LookupResult
from edge_retrieval.core.status import CameraStatus, Health, IndexHealth
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.outputs.mqtt import MqttPublisher
from edge_retrieval.outputs.webhook import WebhookNotifier
from tests.conftest import ROOT, make_appliance, view


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture()
def broker(tmp_path):
    try:
        with broker_mod.Mosquitto(tmp_path / "broker") as b:
            yield b
    except broker_mod.BrokerError as e:
        if "not installed" in str(e):
            pytest.skip(f"{e} — the MQTT tests need a real broker")
        raise


class Subscriber:
    """A paho client that records every message (topic → list of payloads) and resubscribes on reconnect."""

    def __init__(self, port: int, *topics: str, auth: tuple[str, str] | None = None):
        self.messages: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{time.monotonic_ns()}")
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, *_: [c.subscribe(t, qos=1) for t in topics]
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg):
        with self._lock:
            self.messages.append((msg.topic, msg.payload.decode(), bool(msg.retain)))

    def on(self, topic: str) -> list[str]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def count_prefix(self, prefix: str) -> int:
        with self._lock:
            return sum(t.startswith(prefix) for t, _, _ in self.messages)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def publisher_config(port: int, **kw) -> MqttConfig:
    return MqttConfig(enabled=True, host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.5,
                      keepalive_s=5, **{"device_id": "shelf", **kw})


def connected(pub: MqttPublisher) -> MqttPublisher:
    wait_until(lambda: pub.stats()["connected"], 10, "the publisher to connect")
    return pub


def result(item: str | None, source: str = "camera") -> LookupResult:
    top = Candidate(item or "chelsea", (item or "chelsea").title(), 0.91 if item else 0.42, 37 if item else 3,
                    photo=f"{item}#side" if item else None, attributes={"sku": "R-1"} if item else {})
    return LookupResult([top, Candidate("moon", "Moon", 0.31)], {"encode": 3.4, "search": 0.7, "total": 4.6},
                        source, match=top if item else None)


def test_lookup_events_retained_state_and_home_assistant_discovery(broker):
    live = Subscriber(broker.port, "edge-retrieval/shelf/lookup")
    pub = connected(MqttPublisher(publisher_config(broker.port, device_name="Shelf camera")).start())
    try:
        wait_until(lambda: live.client.is_connected(), 5, "the subscriber")
        time.sleep(0.2)  # the live subscription is in place before the first event
        pub.publish_health(Health.model_construct(ok=True, camera=CameraStatus(state="streaming", fps=9.8),
                                                  index=IndexHealth(size=14, generation="g1", path="/x", n_trees=10,
                                                                    search_k=5000), uptime_s=3.0))
        pub.publish_lookup(result("rocket"))
        pub.publish_lookup(result(None, source="upload"))
        events = wait_until(lambda: len(live.on("edge-retrieval/shelf/lookup")) == 2 and live.on(
            "edge-retrieval/shelf/lookup"), 5, "two lookup events")
        first, second = (json.loads(e) for e in events)
        assert first["decision"] == "match" and first["id"] == "rocket" and first["label"] == "Rocket"
        assert first["score"] == 0.91 and first["inliers"] == 37 and first["source"] == "camera"
        assert first["attributes"] == {"sku": "R-1"} and first["matches"][0]["attributes"] == {"sku": "R-1"}
        assert first["matches"][0]["photo"] == "side" and second["attributes"] == {}
        assert first["timings_ms"]["total"] == 4.6 and first["time"].endswith("+00:00") and first["device"] == "shelf"
        assert second["decision"] == "no_match" and second["id"] is None and second["source"] == "upload"
        wait_until(lambda: pub.stats()["queued"] == 0 and pub.stats()["published"] >= 14, 5, "everything published")

        # a subscriber arriving later gets the retained state and discovery
        late = Subscriber(broker.port, "edge-retrieval/shelf/#", "homeassistant/#")
        try:
            wait_until(lambda: len({t for t, _, r in late.messages if r}) >= 11, 5, "retained messages")
            retained = {t: p for t, p, r in late.messages if r}
            match_state = json.loads(retained["edge-retrieval/shelf/match"])  # the latest lookup had no match
            assert match_state["decision"] == "no_match" and match_state["id"] is None
            assert match_state["items_in_view"] == 0 and match_state["source"] == "upload"
            assert retained["edge-retrieval/shelf/availability"] == "online"
            state = json.loads(retained["edge-retrieval/shelf/state"])
            assert state["camera_ok"] is True and state["index_items"] == 14 and state["fps"] == 9.8
            assert "edge-retrieval/shelf/lookup" not in retained  # events are not retained
            sensor = json.loads(retained["homeassistant/sensor/shelf/match/config"])
            camera = json.loads(retained["homeassistant/binary_sensor/shelf/camera/config"])
            button = json.loads(retained["homeassistant/button/shelf/lookup/config"])
            assert sensor["state_topic"] == "edge-retrieval/shelf/match" and sensor["unique_id"] == "shelf_match"
            assert camera["device_class"] == "connectivity" and camera["state_topic"] == "edge-retrieval/shelf/state"
            assert button["command_topic"] == "edge-retrieval/shelf/command/lookup"
            # one Home Assistant device, shared availability
            assert {json.dumps(x["device"], sort_keys=True) for x in (sensor, camera, button)} == {
                json.dumps({"identifiers": ["edge_retrieval_shelf"], "name": "Shelf camera",
                            "manufacturer": "edge-retrieval", "model": "Edge image-retrieval appliance",
                            "sw_version": edge_retrieval.__version__}, sort_keys=True)}
            assert all(x["availability_topic"] == "edge-retrieval/shelf/availability" for x in (sensor, camera, button))
        finally:
            late.close()
    finally:
        pub.stop()
        live.close()
    assert pub.stats()["dropped"] == 0


def _render(template: str, payload: str) -> str:
    """A discovery value_template rendered as Home Assistant does (Jinja, the JSON payload as ``value_json``)."""
    return Environment().from_string(template).render(value_json=json.loads(payload), value=payload)


def test_home_assistant_reads_every_sensor_from_one_retained_message_per_lookup(broker):
    """What a Home Assistant (re)starting reads from the broker: the device (version, link to the page, origin),
    entities at mqtt.qos, diagnostic ones marked so, and each sensor's state and the match's attributes out of the
    one retained message of the latest lookup; "no match" is an empty state, not a word."""
    cfg = publisher_config(broker.port, qos=2, page_url="http://shelf-cam.example.lan:8080/")
    pub = connected(MqttPublisher(cfg, page_url="http://10.1.2.3:8080/").start())
    try:
        pub.publish_lookup(result("rocket"))
        wait_until(lambda: pub.stats()["queued"] == 0 and pub.stats()["published"] >= 11, 5, "everything published")
        ha = Subscriber(broker.port, "homeassistant/#", "edge-retrieval/shelf/#")
        try:
            wait_until(lambda: len({t for t, _, r in ha.messages if r}) >= 10, 5, "the retained messages")
            retained = {t: p for t, p, r in ha.messages if r}
            configs = {t.split("/")[-2]: json.loads(p) for t, p in retained.items() if t.startswith("homeassistant/")}
            assert set(configs) == {"match", "label", "score", "items_in_view", "last_lookup", "camera",
                                    "catalog_items", "lookup"}
            for c in configs.values():
                assert c["qos"] == 2 and c["origin"]["name"] == "edge-retrieval"
                assert c["device"]["sw_version"] == edge_retrieval.__version__ == c["origin"]["sw_version"]
                assert c["device"]["configuration_url"] == "http://shelf-cam.example.lan:8080/"  # mqtt.page_url wins
            assert {k for k, c in configs.items() if c.get("entity_category") == "diagnostic"} == {"camera",
                                                                                                  "catalog_items"}
            assert configs["last_lookup"]["device_class"] == "timestamp"
            # state and attributes come in one message: one state change per lookup, both back after a restart
            sensors = {k: c for k, c in configs.items() if c.get("state_topic") == "edge-retrieval/shelf/match"}
            assert set(sensors) == {"match", "label", "score", "items_in_view", "last_lookup"}
            assert configs["match"]["json_attributes_topic"] == configs["match"]["state_topic"]
            match = retained["edge-retrieval/shelf/match"]
            seen = {k: _render(c["value_template"], match) for k, c in sensors.items()}
            assert seen == {"match": "rocket", "label": "Rocket", "score": "0.91", "items_in_view": "1",
                            "last_lookup": json.loads(match)["time"]}
            assert json.loads(match)["candidates"][1]["id"] == "moon"  # the attributes: the whole lookup event
        finally:
            ha.close()

        pub.publish_lookup(result(None))
        ha = Subscriber(broker.port, "edge-retrieval/shelf/match")
        try:
            nothing = wait_until(lambda: [m for m in ha.on("edge-retrieval/shelf/match")
                                          if json.loads(m)["decision"] == "no_match"], 5, "the no-match state")[-1]
            seen = {k: _render(c["value_template"], nothing) for k, c in sensors.items() if k != "last_lookup"}
            # Home Assistant keeps "" as a text sensor's state and reads "None" as unknown for a numeric one
            assert seen == {"match": "", "label": "", "score": "None", "items_in_view": "0"}
        finally:
            ha.close()
    finally:
        pub.stop()


def test_the_home_assistant_button_requests_a_lookup(broker):
    pressed = threading.Event()
    pub = MqttPublisher(publisher_config(broker.port))
    pub.on_lookup_command(pressed.set)
    connected(pub.start())
    try:
        time.sleep(0.2)  # the subscription follows the connection
        ha = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="home-assistant")
        ha.connect("127.0.0.1", broker.port)
        ha.loop_start()
        ha.publish("edge-retrieval/shelf/command/lookup", "PRESS", qos=1).wait_for_publish(timeout=5)
        ha.disconnect()
        ha.loop_stop()
        assert pressed.wait(5), "the button did not reach the callback"
    finally:
        pub.stop()


def test_the_appliance_publishes_every_recorded_lookup_and_counts_in_metrics(broker, tmp_path, catalog_dir, encoder, photos):
    """As `serve` wires it with mqtt.enabled, on an appliance without a camera (uploads only): its state goes out
    on schedule all the same, and each lookup as an event."""
    live = Subscriber(broker.port, "edge-retrieval/shelf/lookup", "edge-retrieval/shelf/state")
    app = make_appliance(tmp_path, encoder, catalog_dir, mqtt=publisher_config(broker.port, state_interval_s=0.5),
                         index={"top_k": 3})
    (pub,) = app.recorder.sinks  # the publisher that mqtt.enabled wires, started
    connected(pub)
    try:
        app.start()
        state = json.loads(wait_until(lambda: live.on("edge-retrieval/shelf/state"), 5, "the state")[-1])
        assert state["ok"] is True and state["camera"] == "absent" and state["index_items"] == 14
        time.sleep(0.2)
        app.query_image(encode_jpeg(view(photos, "chelsea", "perspective", seed=4)), source="upload")
        event = json.loads(wait_until(lambda: live.on("edge-retrieval/shelf/lookup"), 5, "the lookup event")[0])
        assert event["source"] == "upload" and event["candidates"][0]["id"] == "chelsea"
        m = app.metrics
        wait_until(lambda: m.value("appliance_mqtt_messages_total", result="published") >= 2, 5, "the published counter")
        assert m.value("appliance_mqtt_messages_total", result="dropped") == 0
        assert m.value("appliance_mqtt_connected") == 1.0
        assert b'appliance_mqtt_messages_total{result="published"}' in m.exposition()
    finally:
        app.stop()
        pub.stop()
        live.close()


def test_a_broker_restart_is_survived_and_what_could_not_wait_is_counted(broker):
    pub = connected(MqttPublisher(publisher_config(broker.port, queue_size=5)).start())
    try:
        broker.stop()
        wait_until(lambda: not pub.stats()["connected"], 10, "the publisher to notice the broker is gone")
        t0 = time.perf_counter()
        for _ in range(20):
            pub.publish_lookup(result("rocket"))  # 2 messages each: the event and the retained match
        assert time.perf_counter() - t0 < 0.5, "publishing blocked while the broker was down"
        s = pub.stats()
        assert s["dropped"] >= 40 - 5 - 1 and s["queued"] == 5 and s["connected"] is False

        broker.start()  # the same port
        live = Subscriber(broker.port, "edge-retrieval/shelf/#")
        try:
            connected(pub)
            assert pub.stats()["reconnects"] >= 1
            # what was queued goes out, then publishing resumes; the retained state is sent again
            pub.publish_lookup(result("coins"))
            wait_until(lambda: any(json.loads(e)["id"] == "coins" for e in live.on("edge-retrieval/shelf/lookup")),
                       10, "an event after the restart")
            wait_until(lambda: any(json.loads(m)["id"] == "coins" for m in live.on("edge-retrieval/shelf/match")), 5,
                       "the match state after the restart")
            assert "online" in live.on("edge-retrieval/shelf/availability")
        finally:
            live.close()
    finally:
        pub.stop()


def test_a_broker_refusing_the_credentials_never_raises(tmp_path, monkeypatch):
    try:
        b = broker_mod.Mosquitto(tmp_path / "auth", users={"device": "right-password"}).start()
    except broker_mod.BrokerError as e:
        pytest.skip(f"{e} — the MQTT tests need a real broker")
    try:
        monkeypatch.setenv("EDGE_MQTT_PASSWORD", "wrong-password")
        pub = MqttPublisher(publisher_config(b.port, username="device", password_env="EDGE_MQTT_PASSWORD")).start()
        try:
            wait_until(lambda: pub.stats()["last_error"], 10, "the refusal")
            for _ in range(3):
                pub.publish_lookup(result("rocket"))
            s = pub.stats()
            assert s["connected"] is False and "authori" in s["last_error"].lower()
        finally:
            pub.stop()  # does not raise either
        assert pub.stats()["dropped"] >= 1

        (tmp_path / "pw").write_text("right-password\n")
        ok = connected(MqttPublisher(publisher_config(b.port, username="device", password_file=tmp_path / "pw")).start())
        ok.stop()
        monkeypatch.delenv("EDGE_MQTT_PASSWORD")
        with pytest.raises(ConfigError, match="EDGE_MQTT_PASSWORD"):
            MqttPublisher(publisher_config(b.port, username="device", password_env="EDGE_MQTT_PASSWORD"))
        with pytest.raises(ConfigError, match=r"mqtt\.ca_file .*missing\.pem"):
            MqttPublisher(publisher_config(b.port, tls=True, ca_file=tmp_path / "missing.pem"))
    finally:
        b.stop()


def test_the_password_is_never_a_config_key_and_mqtt_is_off_by_default(tmp_path):
    assert load_config(None).mqtt.enabled is False and load_config(None).webhook.enabled is False
    p = tmp_path / "config.yaml"
    p.write_text("mqtt:\n  password: hunter2\n")
    with pytest.raises(ConfigError, match=r"mqtt\.password.*password_file.*password_env"):
        load_config(p)
    p.write_text("webhook:\n  enabled: true\n")
    with pytest.raises(ConfigError, match="needs a url"):
        load_config(p)


def _serve_config(tmp_path, photos, broker_port: int):
    catalog, frames = tmp_path / "catalog", tmp_path / "frames"
    catalog.mkdir()
    frames.mkdir()
    for name in ("rocket", "coins", "moon"):
        (catalog / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 90))
    (frames / "rocket.jpg").write_bytes(encode_jpeg(view(photos, "rocket", "closeup", seed=1), 90))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
camera: {{source: {frames}, fps: 5}}
trigger: {{enabled: false}}
encoder: {{bundle: efficientnet-lite0, num_threads: 1}}
index: {{path: {tmp_path / 'index'}}}
catalog: {{build_from: {catalog}, enrolled_dir: {tmp_path / 'enrolled'}}}
web: {{host: 127.0.0.1, port: {broker_mod.free_port()}}}
mqtt: {{enabled: true, host: 127.0.0.1, port: {broker_port}, device_id: door, keepalive_s: 5,
        reconnect_min_s: 0.2, state_interval_s: 3600}}
""")
    return cfg


def test_serve_wires_the_button_and_the_broker_sends_the_last_will_when_killed(broker, tmp_path, photos):
    sub = Subscriber(broker.port, "edge-retrieval/door/#")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edge_retrieval", "serve", "--config", str(_serve_config(tmp_path, photos, broker.port))],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            wait_until(lambda: "online" in sub.on("edge-retrieval/door/availability") or proc.poll() is not None, 90,
                       "the serve process to come online")
        except AssertionError:
            proc.kill()
            raise
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        # state_interval_s is an hour: the camera's "streaming" goes out the moment it streams, by itself
        states = wait_until(lambda: [s for s in map(json.loads, sub.on("edge-retrieval/door/state")) if s["camera_ok"]],
                            30, "the camera's streaming state")
        assert states[0]["camera"] == "streaming" and states[0]["index_items"] == 3
        sub.client.publish("edge-retrieval/door/command/lookup", "PRESS", qos=1)
        event = json.loads(wait_until(lambda: sub.on("edge-retrieval/door/lookup"), 30, "the button's lookup")[0])
        assert event["source"] == "requested" and event["candidates"][0]["id"] == "rocket"  # a button, not the trigger
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_until(lambda: sub.on("edge-retrieval/door/availability")[-1:] == ["offline"], 10, "the last will")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        sub.close()


def test_twenty_devices_publish_to_one_broker_and_every_event_arrives(broker):
    devices, per_device = 20, 25
    sub = Subscriber(broker.port, "fleet/+/lookup")
    wait_until(lambda: sub.client.is_connected(), 5, "the subscriber")
    time.sleep(0.2)
    pubs = [MqttPublisher(publisher_config(broker.port, topic_prefix="fleet", device_id=f"dev{i:02d}",
                                           client_id=f"fleet-dev{i:02d}", discovery=False)).start()
            for i in range(devices)]
    try:
        for p in pubs:
            connected(p)

        def run(p: MqttPublisher) -> None:
            for k in range(per_device):
                p.publish_lookup(result("rocket" if k % 2 else None))

        threads = [threading.Thread(target=run, args=(p,)) for p in pubs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        wait_until(lambda: sub.count_prefix("fleet/") >= devices * per_device, 30, "every event")
        per = {}
        for topic, _, _ in sub.messages:
            per[topic] = per.get(topic, 0) + 1
        assert per == {f"fleet/dev{i:02d}/lookup": per_device for i in range(devices)}
        assert sum(p.stats()["dropped"] for p in pubs) == 0
    finally:
        for p in pubs:
            p.stop()
        sub.close()


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, *_):
        pass


def test_the_webhook_posts_accepted_matches_and_retries_a_failing_receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.bodies, server.statuses = [], [503]  # the first attempt fails, the retry gets through
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    hook = WebhookNotifier(WebhookConfig(enabled=True, url=url, timeout_s=2, retries=2, retry_backoff_s=0.05),
                           device_id="shelf").start()
    try:
        hook.publish_lookup(result(None))  # "no match" is not posted by default
        hook.publish_lookup(result("rocket"))
        wait_until(lambda: hook.stats()["sent"] == 1, 10, "the webhook")
        assert len(server.bodies) == 2 and server.bodies[-1]["id"] == "rocket" and server.bodies[-1]["device"] == "shelf"
    finally:
        hook.stop()
        server.shutdown()
        server.server_close()
    # nobody listening: retried, then counted as failed; publish_lookup never raises or blocks
    dead = WebhookNotifier(WebhookConfig(enabled=True, url=f"http://127.0.0.1:{broker_mod.free_port()}/x",
                                         timeout_s=1, retries=1, retry_backoff_s=0.05)).start()
    try:
        dead.publish_lookup(result("rocket"))
        wait_until(lambda: dead.stats()["failed"] == 1, 10, "the failure to be counted")
        from edge_retrieval.outputs.metrics import Metrics
        metrics = Metrics()
        dead.register_metrics(metrics)
        assert [metrics.value("appliance_webhook_posts_total", result=r) for r in ("sent", "failed", "dropped")] == [0, 1, 0]
    finally:
        dead.stop()


def test_the_lookup_event_lists_every_item_in_view_and_the_count_is_retained(broker):
    """A frame with three items: the event lists them best first with their outlines; ``items`` (retained) says
    how many are in view, for Home Assistant; a later lookup with none sets it to 0."""
    quad = ((0.1, 0.1), (0.4, 0.1), (0.4, 0.4), (0.1, 0.4))
    items = [Candidate("rocket", "Rocket", 0.9, 40, quad=quad), Candidate("moon", "Moon", 0.7, 22, quad=quad),
             Candidate("coins", "Coins", 0.6, None)]
    three = LookupResult(items, {"total": 9.0}, "camera", match=items[0], matches=items)
    live = Subscriber(broker.port, "edge-retrieval/shelf/lookup", "edge-retrieval/shelf/items")
    pub = connected(MqttPublisher(publisher_config(broker.port)).start())
    try:
        wait_until(lambda: live.client.is_connected(), 5, "the subscriber")
        time.sleep(0.2)
        pub.publish_lookup(three)
        event = json.loads(wait_until(lambda: live.on("edge-retrieval/shelf/lookup"), 5, "the lookup event")[0])
        assert event["id"] == "rocket" and event["items"] == 3
        assert [m["id"] for m in event["matches"]] == ["rocket", "moon", "coins"]
        assert event["matches"][0]["quad"] == [list(c) for c in quad] and event["matches"][1]["inliers"] == 22
        assert "quad" not in event["matches"][2]  # named by its cosine: no outline
        assert wait_until(lambda: live.on("edge-retrieval/shelf/items"), 5, "the items count") == ["3"]
        pub.publish_lookup(result(None))
        wait_until(lambda: live.on("edge-retrieval/shelf/items") == ["3", "0"], 5, "the count back to 0")
    finally:
        pub.stop()
        live.close()
    late = Subscriber(broker.port, "edge-retrieval/shelf/items")
    try:
        assert wait_until(lambda: late.on("edge-retrieval/shelf/items"), 5, "the retained count") == ["0"]
    finally:
        late.close()
