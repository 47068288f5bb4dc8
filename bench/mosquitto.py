"""A real Mosquitto broker on a free 127.0.0.1 port with a generated config file, for the MQTT tests and
bench/fleet.py (never the system service). Needs the ``mosquitto`` binary: ``apt-get install mosquitto``."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from .serve import free_port


class BrokerError(RuntimeError):
    """Mosquitto is missing or did not come up."""


class Mosquitto:
    """``with Mosquitto(tmp_dir) as broker: broker.port`` — start, stop and restart on the same port.
    ``users`` ({name: password}) turns anonymous access off."""

    def __init__(self, workdir: Path, port: int | None = None, users: dict[str, str] | None = None):
        self.binary = shutil.which("mosquitto")
        if self.binary is None:
            raise BrokerError("mosquitto is not installed: apt-get install mosquitto")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "user root",
                 f"log_dest file {self.workdir / 'mosquitto.log'}", "max_queued_messages 100000"]
        if users:
            pw = self.workdir / "passwords"
            pw.write_text("")
            for name, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), name, password], check=True, timeout=10,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> "Mosquitto":
        """Start the broker and wait (bounded) until it accepts connections."""
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited ({self.proc.returncode}): {self.proc.stderr.read().decode()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout_s} s")

    def stop(self) -> None:
        """Terminate the broker (kill after 5 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
