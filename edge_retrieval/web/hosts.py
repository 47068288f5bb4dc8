"""Which ``Host`` headers the device answers (DNS rebinding: a page on ``evil.example`` whose name resolves to the
device would otherwise be "same origin" with it). Allowed: localhost, 127.0.0.1, ::1, the machine's host names
(``hostname``, its FQDN, ``<hostname>.local``), every address of its interfaces, ``web.host`` when it is one
address, and ``web.allowed_hosts`` (``"*"``: any host, the escape hatch). Addresses are looked up again (at most
every ``REFRESH_S``) when an unknown host arrives, so a new DHCP lease keeps working."""
from __future__ import annotations

import fcntl
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import flask

from edge_retrieval.core.config import WebConfig
from edge_retrieval.web.common import error

REFRESH_S = 10.0
_LOCAL = ("localhost", "127.0.0.1", "::1")
_SIOCGIFADDR = 0x8915


def host_name(header: str | None) -> str | None:
    """The host of a ``Host`` header (``name:port``, ``[v6]:port``), lower case, without port or trailing dot."""
    h = (header or "").strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] or None if end > 0 else None
    if h.count(":") == 1:
        h, _, port = h.partition(":")
        if not port.isdigit():
            return None
    return h.rstrip(".") or None


def machine_names() -> set[str]:
    """This machine's names and the addresses of its interfaces (IPv4 and IPv6), lower case."""
    names = set(_LOCAL)
    hostname = socket.gethostname().lower()
    names |= {hostname, f"{hostname}.local", socket.getfqdn().lower()}
    try:
        names |= {info[4][0].split("%")[0] for info in socket.getaddrinfo(hostname, None)}
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, ifname in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname[:15].encode()))
                names.add(socket.inet_ntoa(packed[20:24]))
            except OSError:  # no IPv4 address on it
                continue
    try:  # /proc/net/if_inet6: one address per line, 32 hex digits first
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = bytes.fromhex(line.split()[0])
            names.add(socket.inet_ntop(socket.AF_INET6, raw))
    except (OSError, ValueError):
        pass
    return names


def allowed_hosts(config: WebConfig) -> Callable[[str], bool]:
    """A check ``allowed(host)`` for the host part of a ``Host`` header (see the module docstring)."""
    configured = {h.strip().lower().strip("[]").rstrip(".") for h in config.allowed_hosts}
    if "*" in configured:
        return lambda host: True
    if config.host not in ("0.0.0.0", "::", ""):
        configured.add(config.host.lower().strip("[]"))
    lock = threading.Lock()
    known = {"names": machine_names() | configured, "at": time.monotonic()}

    def allowed(host: str) -> bool:
        if host in known["names"]:
            return True
        with lock:
            if time.monotonic() - known["at"] >= REFRESH_S:
                known["names"], known["at"] = machine_names() | configured, time.monotonic()
        return host in known["names"]
    return allowed


def host_checker(allowed: Callable[[str], bool]) -> Callable[[], flask.Response | None]:
    """A ``before_request`` hook: 421 for a ``Host`` that is not one of the device's names (before any route)."""
    def check() -> flask.Response | None:
        host = host_name(flask.request.headers.get("Host"))
        if host is None or not allowed(host):
            return error(421, f"this device does not answer to the host name {host or '(none)'!r}; add it to "
                              "web.allowed_hosts in config.yaml if it is one of the device's own names")
        return None
    return check
