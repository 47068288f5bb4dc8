"""The waitress server of ``serve``, with the limits waitress lacks so that one client cannot lock the others out:

- **a write timeout**: a connection whose pending output has not moved for ``web.write_timeout_s`` (a live view or
  event stream whose client stopped reading) is closed. waitress would keep buffering it (up to 16 MB) and then
  block the worker thread for ever, holding one of the few stream slots; closed, the stream's generator ends and
  its slot and thread are free again.
- **a request timeout**: a request still incomplete ``web.request_timeout_s`` after its first byte (a client
  trickling its headers a byte at a time, which waitress's idle timeout never catches) is closed.
- **connections per client**: past ``web.max_connections_per_client`` from one address, that client's oldest
  connection that is not being answered (idle, or still sending its request) is closed for the new one — so
  hundreds of trickling connections from one host never fill ``web.connection_limit`` and a second user (or the
  same host's next request) still gets in.

waitress calls ``maintenance`` from its own loop thread every ``web.cleanup_interval_s``; the checks run there.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import time

from edge_retrieval.core.config import WebConfig

log = logging.getLogger(__name__)
# The kernel's send buffer of a connection, fixed: left to autotuning it grows to 4 MB, which a live view whose
# client stopped reading takes a minute to fill before its output stops moving; 256 KB is a second of a live view
# and far above what a LAN's bandwidth-delay product needs.
SEND_BUFFER_BYTES = 256 * 1024


def create_server(app, config: WebConfig, **adjustments):
    """``waitress.create_server`` for ``app`` on ``config.host:config.port`` with the limits above installed."""
    import waitress

    server = waitress.create_server(app, host=config.host, port=config.port, threads=config.threads,
                                    connection_limit=config.connection_limit,
                                    channel_timeout=config.channel_timeout_s,
                                    cleanup_interval=config.cleanup_interval_s, **adjustments)
    for one in _servers(server):
        install(one, config)
    return server


def _servers(server) -> list:
    from waitress.server import BaseWSGIServer
    if isinstance(server, BaseWSGIServer):
        return [server]
    return [s for s in getattr(server, "map", {}).values() if isinstance(s, BaseWSGIServer)]  # MultiSocketServer


def install(server, config: WebConfig) -> None:
    """Install the write timeout, request timeout and per-client cap on one waitress ``BaseWSGIServer``."""
    base = server.channel_class

    class Channel(base):
        request_since: float | None = None  # when the first byte of the request still being received came

        def __init__(self, srv, sock, addr, adj, map=None):
            with contextlib.suppress(OSError):  # what a client that reads nothing can swallow before it is noticed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            super().__init__(srv, sock, addr, adj, map=map)
            _cap(self, config.max_connections_per_client)

        def received(self, data):
            if self.request is None:
                self.request_since = time.time()
            done = super().received(data)
            if self.request is None:
                self.request_since = None
            return done

    server.channel_class = Channel
    original = server.maintenance

    def maintenance(now: float) -> None:
        original(now)
        for channel in list(server.active_channels.values()):
            if channel.total_outbufs_len and channel.last_activity < now - config.write_timeout_s:
                _close(channel, f"its client read nothing for {config.write_timeout_s:g} s (web.write_timeout_s)")
            elif (channel.request_since is not None and not channel.requests
                  and channel.request_since < now - config.request_timeout_s):
                _close(channel, f"its request was still incomplete after {config.request_timeout_s:g} s "
                                "(web.request_timeout_s)")

    server.maintenance = maintenance


def _cap(channel, limit: int) -> None:
    """Past ``limit`` connections from the new channel's address: close that client's oldest connection that is
    not being answered (the new one when all are)."""
    host = channel.addr[0] if isinstance(channel.addr, tuple) else None
    if host is None:
        return
    mine = [c for c in list(channel.server.active_channels.values())
            if c is not channel and isinstance(c.addr, tuple) and c.addr[0] == host]
    if len(mine) < limit:
        return
    waiting = [c for c in mine if not c.requests and not c.total_outbufs_len]
    victim = min(waiting, key=lambda c: c.request_since or c.last_activity, default=channel)
    _close(victim, f"{host} has {len(mine) + 1} connections open (web.max_connections_per_client {limit})")


_logged = [0.0]  # when a closing was last logged at INFO (a flood of them is logged once a minute)


def _close(channel, why: str) -> None:
    """Close ``channel`` in waitress's loop thread, between two polls (maintenance runs while the loop gathers the
    sockets to poll: closing one there would hand select() a closed descriptor). A worker blocked writing to it
    wakes up (ClientDisconnected) and the response's generator is closed, which frees its stream slot. Setting
    ``will_close`` would not do: a socket whose client reads nothing never becomes writable to act on it."""
    now = time.monotonic()
    level = logging.INFO if now - _logged[0] > 60 else logging.DEBUG
    if level == logging.INFO:
        _logged[0] = now
    log.log(level, "web: closing a connection of %s: %s",
            channel.addr[0] if isinstance(channel.addr, tuple) else channel.addr, why)
    channel.will_close = True  # read nothing more meanwhile
    channel.server.trigger.pull_trigger(lambda: channel.connected and channel.handle_close())
