"""A real Mosquitto broker on a free 127.0.0.1 port with a generated config file, for the MQTT tests and
benchmarks/fleet.py (never the system service), optionally with a TLS listener whose certificates
:func:`make_certificates` makes with the ``openssl`` command. Needs the ``mosquitto`` binary:
``apt-get install mosquitto``."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.serve import free_port


class BrokerError(RuntimeError):
    """Mosquitto is missing or did not come up."""


@dataclass(frozen=True)
class Certificates:
    """PEM files of a test PKI: a CA, the broker's certificate for 127.0.0.1 / localhost signed by it, a client
    certificate signed by it, and another CA that signed neither."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_certificates(folder: Path, days: int = 2) -> Certificates:
    """A fresh test PKI in ``folder`` (EC P-256 keys, with the extensions strict verifiers want), made with the
    ``openssl`` command; BrokerError when it is missing."""
    if shutil.which("openssl") is None:
        raise BrokerError("openssl is not installed: apt-get install openssl")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30, cwd=folder)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", str(days),
            "-subj", f"/CN=edge-retrieval test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, usage, alt in (("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
                             ("client", "clientAuth", "")):
        (folder / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                            f"extendedKeyUsage={usage}\n{alt}authorityKeyIdentifier=keyid\n")
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", str(days), "-extfile", f"{name}.ext")
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
                        folder / "client.key", folder / "other-ca.pem")


class Mosquitto:
    """``with Mosquitto(tmp_dir) as broker: broker.port`` — start, stop and restart on the same port.
    ``users`` ({name: password}) turns anonymous access off (on every listener). ``tls`` adds a TLS listener on
    ``broker.tls_port`` with those certificates (``require_certificate``: clients must show one the CA signed)."""

    def __init__(self, workdir: Path, port: int | None = None, users: dict[str, str] | None = None,
                 tls: Certificates | None = None, require_certificate: bool = False):
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
        self.tls_port = free_port() if tls is not None else None
        if tls is not None:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {tls.ca}", f"certfile {tls.server_cert}",
                      f"keyfile {tls.server_key}", f"require_certificate {str(require_certificate).lower()}"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
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

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
