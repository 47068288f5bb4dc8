"""How the device and the MQTT broker trust each other (edge_retrieval/outputs/mqtt.py uses it): the TLS context from the
``mqtt`` section (the CA, an optional client certificate, host-name checks) and the password, which never
lives in config.yaml (``password_file`` or the environment variable ``password_env``)."""
from __future__ import annotations

import os
import ssl
from collections.abc import Callable

from edge_retrieval.core.config import MqttConfig
from edge_retrieval.core.errors import ConfigError


def tls_context(config: MqttConfig, on_tls_error: Callable[[ssl.SSLError], None]) -> ssl.SSLContext:
    """The TLS context for the broker: ``ca_file`` (else the system CAs), the client certificate when set, the
    certificate and host name checked unless ``tls_insecure``. ``on_tls_error`` hears why a handshake failed or
    the broker's TLS alert (e.g. "certificate required", which TLS 1.3 sends after the handshake): paho logs
    only that the connection failed. ConfigError naming the key of a file that cannot be used."""
    try:
        ctx = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"mqtt.ca_file {config.ca_file}: cannot use it for TLS ({e.strerror or e})") from None
    if config.cert_file is not None:
        try:
            ctx.load_cert_chain(str(config.cert_file), str(config.key_file) if config.key_file else None)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"mqtt.cert_file {config.cert_file} / mqtt.key_file {config.key_file}: cannot use "
                              f"them as the client certificate ({e.strerror or e})") from None
    if config.tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    retry = (ssl.SSLWantReadError, ssl.SSLWantWriteError)  # a non-blocking socket's "not yet", not an error

    class ReportingSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            try:
                super().do_handshake(block)
            except retry:
                raise
            except ssl.SSLError as e:
                on_tls_error(e)
                raise

        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            try:
                return super().recv(buflen, flags)
            except retry:
                raise
            except ssl.SSLError as e:
                on_tls_error(e)
                raise

    ctx.sslsocket_class = ReportingSocket  # the documented hook for the class wrap_socket returns
    return ctx


def password(config: MqttConfig) -> str | None:
    """The broker password from password_file or password_env (never from the YAML)."""
    if config.password_file is not None:
        try:
            return config.password_file.read_text(encoding="utf-8").strip("\r\n")
        except OSError as e:
            raise ConfigError(f"mqtt.password_file {config.password_file}: cannot read ({e.strerror or e})") from None
    if config.password_env is not None:
        value = os.environ.get(config.password_env)
        if value is None:
            raise ConfigError(f"mqtt.password_env: the environment variable {config.password_env} is not set")
        return value
    return None
