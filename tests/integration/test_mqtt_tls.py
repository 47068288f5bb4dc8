"""MQTT over TLS against a real Mosquitto with a TLS listener on 127.0.0.1 whose CA, broker and client
certificates the test makes (openssl): events arrive over TLS with a client certificate and a password; a wrong
CA, a missing client certificate and a refused password are reported in the log and in the publisher's
``last_error``, and a real ``serve`` with a wrong CA keeps answering. Every wait is bounded."""
from __future__ import annotations

import json
import logging

import pytest

import tests.support.mosquitto as broker_mod
from edge_retrieval.core.config import MqttConfig
from edge_retrieval.core.config_file import load_config
from edge_retrieval.core.errors import ConfigError
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.outputs.mqtt import MqttPublisher
from tests.integration.test_mqtt import Subscriber, connected, publisher_config, result, wait_until
from tests.support.serve import Serve

WATCHER = ("watcher", "watcher-password")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> broker_mod.Certificates:
    try:
        return broker_mod.make_certificates(tmp_path_factory.mktemp("pki"))
    except broker_mod.BrokerError as e:
        pytest.skip(str(e))


@pytest.fixture()
def tls_broker(tmp_path, certs):
    """A broker with a password on every listener and a TLS listener that wants a client certificate."""
    try:
        b = broker_mod.Mosquitto(tmp_path / "broker", users={"device": "right-password", WATCHER[0]: WATCHER[1]},
                                 tls=certs, require_certificate=True).start()
    except broker_mod.BrokerError as e:
        if "not installed" in str(e):
            pytest.skip(f"{e} — the MQTT tests need a real broker")
        raise
    (tmp_path / "pw").write_text("right-password\n")
    yield b
    b.stop()


def tls_config(broker, certs, tmp_path, **kw) -> MqttConfig:
    return publisher_config(broker.tls_port, **{"tls": True, "ca_file": certs.ca, "cert_file": certs.client_cert,
                                                "key_file": certs.client_key, "username": "device",
                                                "password_file": tmp_path / "pw", **kw})


def test_events_arrive_over_tls_with_a_client_certificate_and_a_password(tls_broker, certs, tmp_path):
    live = Subscriber(tls_broker.port, "edge-retrieval/shelf/#", auth=WATCHER)  # the plain listener, to watch
    pub = connected(MqttPublisher(tls_config(tls_broker, certs, tmp_path)).start())
    try:
        wait_until(lambda: "online" in live.on("edge-retrieval/shelf/availability"), 10, "online over TLS")
        pub.publish_lookup(result("rocket"))
        event = json.loads(wait_until(lambda: live.on("edge-retrieval/shelf/lookup"), 10, "the event")[0])
        assert event["decision"] == "match" and event["id"] == "rocket"
        assert pub.stats()["last_error"] is None
    finally:
        pub.stop()
        live.close()
    assert pub.stats()["dropped"] == 0


@pytest.mark.parametrize("case", ["wrong_ca", "no_client_certificate", "wrong_password"])
def test_a_refused_tls_connection_is_reported_and_never_raises(tls_broker, certs, tmp_path, caplog, monkeypatch, case):
    caplog.set_level(logging.WARNING, logger="edge_retrieval.outputs.mqtt")
    monkeypatch.setenv("EDGE_MQTT_PASSWORD", "wrong-password")
    config = {"wrong_ca": lambda: tls_config(tls_broker, certs, tmp_path, ca_file=certs.other_ca),
              "no_client_certificate": lambda: tls_config(tls_broker, certs, tmp_path, cert_file=None, key_file=None),
              "wrong_password": lambda: tls_config(tls_broker, certs, tmp_path, password_file=None,
                                                   password_env="EDGE_MQTT_PASSWORD")}[case]()
    pub = MqttPublisher(config).start()
    try:
        why = wait_until(lambda: pub.stats()["last_error"], 15, "the refusal")
        for _ in range(3):
            pub.publish_lookup(result("rocket"))  # queued, never raised
        assert pub.stats()["connected"] is False
        expected = {"wrong_ca": "certificate verify failed", "no_client_certificate": "certificate required",
                    "wrong_password": "not authori"}[case]
        assert expected in why.lower(), why
        if case == "wrong_ca":
            assert "mqtt.ca_file" in why and str(certs.other_ca) in why
        logged = [r.getMessage() for r in caplog.records if str(tls_broker.tls_port) in r.getMessage()]
        assert logged and expected in logged[0].lower(), logged
    finally:
        pub.stop()


def test_tls_insecure_is_off_by_default_and_skips_the_checks_only_when_asked(tls_broker, certs, tmp_path):
    assert MqttConfig().tls_insecure is False and load_config(None).mqtt.tls_insecure is False
    pub = connected(MqttPublisher(tls_config(tls_broker, certs, tmp_path, ca_file=certs.other_ca,
                                             tls_insecure=True)).start())
    pub.stop()


def test_tls_files_are_checked_at_start_and_name_their_key(certs, tmp_path):
    with pytest.raises(ConfigError, match=r"mqtt\.cert_file .*missing\.pem"):
        MqttPublisher(publisher_config(1, tls=True, ca_file=certs.ca, cert_file=tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"mqtt\.cert_file"):  # a key that is not the certificate's
        MqttPublisher(publisher_config(1, tls=True, cert_file=certs.client_cert, key_file=certs.server_key))
    p = tmp_path / "config.yaml"
    p.write_text("mqtt:\n  ca_file: ca.pem\n")
    with pytest.raises(ConfigError, match="set tls: true"):
        load_config(p)
    p.write_text("mqtt:\n  tls: true\n  key_file: client.key\n")
    with pytest.raises(ConfigError, match="set cert_file too"):
        load_config(p)
    p.write_text("mqtt:\n  tls: true\n  ca_file: pki/ca.pem\n  cert_file: pki/c.pem\n  key_file: pki/c.key\n")
    assert load_config(p).mqtt.key_file == tmp_path / "pki" / "c.key"  # relative to the config file


def test_serve_with_a_wrong_ca_keeps_running_and_says_why(tls_broker, certs, tmp_path, catalog_dir, photos):
    serve = Serve(tmp_path, catalog_dir, "recognition:\n  adapt: false\n" + (
        f"mqtt:\n  enabled: true\n  host: 127.0.0.1\n  port: {tls_broker.tls_port}\n  tls: true\n"
        f"  ca_file: {certs.other_ca}\n  cert_file: {certs.client_cert}\n  key_file: {certs.client_key}\n"
        f"  username: device\n  password_file: {tmp_path / 'pw'}\n  device_id: door\n  reconnect_min_s: 0.2\n"))
    try:
        serve.start()
        status, body = serve.upload("/api/query", encode_jpeg(photos["rocket"], 90))
        assert status == 200 and body["results"]
        wait_until(lambda: "certificate verify failed" in (tmp_path / "log").read_text(), 20, "the log line")
        line = next(x for x in (tmp_path / "log").read_text().splitlines() if "certificate verify failed" in x)
        assert "ERROR edge_retrieval.outputs.mqtt: mqtt: 127.0.0.1:" in line and "mqtt.ca_file" in line
        assert serve.request("GET", "/api/health")[0] == 200 and serve.proc.poll() is None
    finally:
        serve.stop()
