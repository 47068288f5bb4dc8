"""MQTT: lookup events, retained state, Home Assistant discovery and the "look up now" button (a sink:
edge_retrieval/outputs/sinks.py)."""
from __future__ import annotations

import json
import logging
import ssl
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from edge_retrieval.core.config import MqttConfig
from edge_retrieval.core.results import LookupResult
from edge_retrieval.core.status import Health
from edge_retrieval.outputs.home_assistant import discovery_messages, match_state
from edge_retrieval.outputs.mqtt_auth import password, tls_context
from edge_retrieval.outputs.sinks import DRAIN_S, POLL_S, QueueWorker, default_device_id, lookup_event

log = logging.getLogger(__name__)


class MqttPublisher(QueueWorker):
    """Publishes lookups and state to an MQTT broker and announces the device to Home Assistant.

    Topics under ``<topic_prefix>/<device_id>/``: ``lookup`` (one JSON event per lookup), ``match`` (retained
    JSON: the latest lookup's event and the items in view, what Home Assistant's sensors read:
    edge_retrieval/outputs/home_assistant.py), ``items`` (retained: how many catalog items the
    latest lookup saw), ``state`` (retained JSON: camera and index health),
    ``availability`` (retained "online"; the broker publishes the last will "offline" when the device vanishes)
    and ``command/lookup`` (the Home Assistant button; see ``on_lookup_command``)."""

    def __init__(self, config: MqttConfig, page_url: str | None = None):
        """``page_url``: the device's page, which Home Assistant links to (``mqtt.page_url`` wins over it)."""
        super().__init__("mqtt-publisher", config.queue_size)
        self.config = config
        self.device_id = config.device_id or default_device_id()
        self.page_url = config.page_url or page_url
        base = f"{config.topic_prefix}/{self.device_id}"
        self.topics = {k: f"{base}/{k}" for k in ("lookup", "match", "items", "state", "availability")}
        self.topics["command"] = f"{base}/command/lookup"
        self._callbacks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._retained: dict[str, str] = {}  # last state per topic: re-sent after a reconnect (the broker may have restarted)
        self._retained_lock = threading.Lock()
        self._last_error: str | None = None
        self._tls_error: str | None = None  # why the last TLS handshake failed (paho only says "failed")
        self._stopping = False
        self._client = self._make_client(password(config))

    def _make_client(self, password: str | None) -> mqtt.Client:
        c = self.config
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=c.client_id or f"edge-retrieval-{self.device_id}")
        if c.username is not None:
            client.username_pw_set(c.username, password)
        if c.tls:
            client.tls_set_context(tls_context(c, self._tls_failed))
        client.will_set(self.topics["availability"], "offline", qos=c.qos, retain=True)
        client.reconnect_delay_set(c.reconnect_min_s, c.reconnect_max_s)
        # paho's own queue holds QoS>0 messages awaiting the broker's ack: bound it as well
        client.max_queued_messages_set(c.queue_size)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = lambda *_: self._count("published")
        client.on_message = self._on_message
        return client

    # ---- lifetime --------------------------------------------------------------------------------------------
    def start(self) -> MqttPublisher:
        """Connect in the background (a broker that is down is retried with backoff) and start the worker."""
        self._stopping = False
        self._start_worker()
        try:
            self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
            self._client.loop_start()
        except (OSError, ValueError) as e:
            self._last_error = str(e)
            log.error("mqtt: cannot start the client for %s:%d: %s", self.config.host, self.config.port, e)
        log.info("mqtt: publishing to %s:%d under %s/%s", self.config.host, self.config.port,
                 self.config.topic_prefix, self.device_id)
        return self

    def stop(self) -> None:
        """Send what is queued (≤ 2 s), mark the device offline and disconnect. Idempotent; never raises."""
        self._stop_worker(DRAIN_S)
        self._stopping = True
        try:
            if self._connected.is_set():
                info = self._client.publish(self.topics["availability"], "offline", qos=self.config.qos, retain=True)
                info.wait_for_publish(timeout=DRAIN_S)
            self._client.disconnect()
            self._client.loop_stop()
        except (OSError, RuntimeError, ValueError) as e:
            log.warning("mqtt: stopping: %s", e)
        self._connected.clear()

    def __enter__(self) -> MqttPublisher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- what the appliance calls ----------------------------------------------------------------------------
    def on_lookup_command(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the MQTT thread) whenever the "look up now" button's command topic gets a message."""
        self._callbacks.append(callback)

    def publish_lookup(self, result: LookupResult) -> None:
        """Queue the lookup event and the new retained match state; never blocks, never raises."""
        try:
            event = lookup_event(result, self.device_id)
            self._offer((self.topics["lookup"], json.dumps(event), False))
            self._set_state("match", json.dumps(match_state(event)))
            self._set_state("items", str(event["items"]))  # catalog items in view, as a plain number
        except Exception:
            log.exception("mqtt: could not queue a lookup event")

    def publish_health(self, health: Health) -> None:
        """Queue the retained camera/index state from ``Appliance.health()``; never blocks, never raises."""
        try:
            cam, idx = health.camera, health.index
            state = {"ok": health.ok, "camera_ok": cam.state == "streaming", "camera": cam.state, "fps": cam.fps,
                     "index_items": idx.size, "index_generation": idx.generation, "uptime_s": health.uptime_s}
            self._set_state("state", json.dumps(state))
        except Exception:
            log.exception("mqtt: could not queue the health state")

    def stats(self) -> dict:
        """published (acknowledged by the broker at QoS ≥ 1), dropped, queued, connected, reconnects, last_error."""
        n = self._counted()
        return {"published": n["published"], "dropped": n["dropped"], "queued": self._queue.qsize(),
                "connected": self._connected.is_set(), "reconnects": n["reconnects"], "last_error": self._last_error}

    def register_metrics(self, metrics) -> None:
        """Expose the publisher's counters on the appliance's /metrics (a ``edge_retrieval.outputs.metrics.Metrics``)."""
        metrics.read_at_scrape("appliance_mqtt_messages", "MQTT messages by result", "counter",
                               lambda: {k: self.stats()[k] for k in ("published", "dropped")}, label="result")
        metrics.read_at_scrape("appliance_mqtt_connected", "1 while connected to the broker", "gauge",
                               lambda: float(self.stats()["connected"]))
        metrics.read_at_scrape("appliance_mqtt_reconnects", "Reconnects to the broker", "counter",
                               lambda: self.stats()["reconnects"])

    def discovery_messages(self) -> dict[str, dict]:
        """Home Assistant MQTT discovery (edge_retrieval/outputs/home_assistant.py), keyed by the retained
        config topics."""
        return discovery_messages(self.config, self.device_id, self.topics, self.page_url)

    # ---- internals -------------------------------------------------------------------------------------------
    def _set_state(self, key: str, payload: str) -> None:
        topic = self.topics[key]
        with self._retained_lock:
            self._retained[topic] = payload
        self._offer((topic, payload, self.config.retain))

    def _handle(self, item: tuple[str, str, bool]) -> None:
        # Waiting here while the broker is away is what makes the queue fill up and, past its size, drop.
        while not self._connected.wait(POLL_S):
            if self._halt.is_set():
                self._count("dropped")
                return
        topic, payload, retain = item
        info = self._client.publish(topic, payload, qos=self.config.qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:  # lost the connection meanwhile (QoS 0) or paho's queue is full
            self._count("dropped")

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            if self._last_error != str(reason_code):
                log.warning("mqtt: %s:%d refused the connection: %s (retrying with backoff)",
                            self.config.host, self.config.port, reason_code)
            self._last_error = str(reason_code)
            return
        first = self._counted()["connects"] == 0
        self._count("connects")
        self._tls_error = None
        if not first:
            self._count("reconnects")
        self._last_error = None
        log.info("mqtt: connected to %s:%d%s", self.config.host, self.config.port, "" if first else " again")
        qos = self.config.qos
        client.publish(self.topics["availability"], "online", qos=qos, retain=True)
        if self.config.discovery:
            for topic, payload in self.discovery_messages().items():
                client.publish(topic, json.dumps(payload), qos=qos, retain=True)
        client.subscribe(self.topics["command"], qos=qos)
        with self._retained_lock:
            last = dict(self._retained)
        for topic, payload in last.items():
            client.publish(topic, payload, qos=qos, retain=self.config.retain)
        self._connected.set()

    def _tls_failed(self, e: ssl.SSLError) -> None:
        c = self.config
        if isinstance(e, ssl.SSLCertVerificationError):
            self._tls_error = (f"TLS: certificate verify failed ({e.verify_message}): is mqtt.ca_file "
                               f"({c.ca_file or 'the system CAs'}) the CA of the broker's certificate, for {c.host}?")
        else:  # e.g. the broker wants a client certificate (TLS 1.3 says so after the handshake)
            why = str(e.reason).lower().replace("_", " ") if e.reason else str(e)
            self._tls_error = f"TLS refused ({why}): does the broker want a client certificate (mqtt.cert_file)?"

    def _on_connect_fail(self, _client, _userdata) -> None:
        self._refused(self._tls_error or "cannot connect (is the broker running, and reachable from here?)")

    def _refused(self, why: str) -> None:
        self._tls_error = None
        if self._last_error != why:
            log.error("mqtt: %s:%d: %s (retrying with backoff)", self.config.host, self.config.port, why)
        self._last_error = why

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and not self._stopping:  # (a refused CONNACK also ends here: keep its reason)
            self._last_error = f"disconnected: {reason_code}"
            log.warning("mqtt: lost %s:%d (%s); reconnecting with backoff", self.config.host, self.config.port,
                        reason_code)
        elif self._tls_error is not None and not self._stopping:  # closed before its CONNACK, by a TLS alert
            self._refused(self._tls_error)

    def _on_message(self, _client, _userdata, msg) -> None:
        if msg.topic != self.topics["command"]:
            return
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.exception("mqtt: the lookup command callback failed")
