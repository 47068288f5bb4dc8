"""What ``serve`` tells the machine it runs on: the page's clickable addresses, and systemd's notify protocol
(READY=1, then WATCHDOG=1 pings while the camera loop and the web server are healthy; systemd/ has the
unit)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger(__name__)


def page_urls(host: str, port: int) -> list[str]:
    """Clickable addresses of the page: 127.0.0.1 (when it listens there), and the machine's LAN address when
    it listens on every interface (0.0.0.0 / ::) — a wildcard is not an address a browser can open."""
    if host not in ("0.0.0.0", "::", ""):
        return [f"http://{host}:{port}/"]
    urls = [f"http://127.0.0.1:{port}/"]
    try:  # the source address of a route out; a UDP connect sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            lan = s.getsockname()[0]
        if not lan.startswith("127."):
            urls.append(f"http://{lan}:{port}/")
    except OSError:
        pass
    return urls


def http_probe(host: str, port: int, timeout_s: float = 5.0) -> Callable[[], tuple[bool, str]]:
    """A check that the web server answers ``GET /api/health`` on ``host:port`` (a wildcard host is asked
    on loopback). Any HTTP answer counts, 503 too: that is a lost camera, and the camera has its own check."""
    local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}/api/health"

    def probe() -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            pass
        except OSError as e:  # refused, timed out, reset
            return False, f"web server did not answer {url} within {timeout_s:g} s ({e})"
        return True, "web server answers"
    return probe


def watchdog_check(appliance, probe: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    """Whether the service deserves a systemd watchdog ping: the camera loop and the camera's watchdog run
    (``appliance.alive()``) and the web server answers (``probe()``). Returns (ok, why)."""
    ok, why = appliance.alive()
    web_ok, web_why = probe() if ok else (False, "")  # the web server is asked only while the loop is alive
    return (web_ok, f"{why}; {web_why}") if ok else (False, why)


def notify_systemd(check: Callable[[], tuple[bool, str]]) -> None:
    """READY=1, then (with WatchdogSec) WATCHDOG=1 every half period while ``check()`` passes (a wedged camera
    loop or web server stops the pings: systemd restarts the service); each check also goes out as STATUS=."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]

    def send(msg: str) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                s.send(msg.encode())
        except OSError as e:
            log.warning("systemd notify socket %s: %s", addr, e)

    send("READY=1\nSTATUS=starting the web server")
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if not usec:
        return

    def ping() -> None:
        failing = None
        while not threading.Event().wait(usec / 2e6):
            ok, why = check()
            if ok:
                if failing:
                    log.warning("systemd watchdog: healthy again (%s); pinging again", why)
                failing = None
                send(f"WATCHDOG=1\nSTATUS={why}")
            else:
                # Stop pinging (systemd restarts us after WatchdogSec); say why once, not every period.
                if why != failing:
                    log.error("systemd watchdog: %s; not pinging, systemd will restart the service", why)
                    send(f"STATUS=unhealthy: {why}")
                failing = why
    threading.Thread(target=ping, daemon=True, name="sd-watchdog").start()
