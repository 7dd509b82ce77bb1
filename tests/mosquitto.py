"""A throwaway MQTT broker for tests: Debian's /usr/sbin/mosquitto on a free loopback port.

``Mosquitto(directory, users={"feeds": "secret"}, tls=True).start()`` writes the
configuration (no persistence: a restarted broker has no retained messages),
the password file (PBKDF2-SHA512 hashes, mosquitto's ``$7$`` format) and, with
``tls``, a CA and a server certificate for 127.0.0.1/localhost made in the test
(the ``cryptography`` package when installed, else the openssl command).
:meth:`Mosquitto.stop` ends it; :meth:`Mosquitto.start` again reuses the port.
"""
from __future__ import annotations

import base64
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

MOSQUITTO = os.environ.get("MOSQUITTO", "/usr/sbin/mosquitto")


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def password_line(user: str, password: str, iterations: int = 101) -> str:
    """One line of a mosquitto password file (``user:$7$<iterations>$<salt>$<hash>``)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 and localhost
    signed by it, in ``directory``: (ca.crt, server.crt, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, crt, key = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _certs_openssl(directory, ca, crt, key)
    else:
        _certs_cryptography(ca, crt, key)
    os.chmod(key, 0o600)
    return ca, crt, key


def _certs_cryptography(ca: Path, crt: Path, key: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "feeds test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                .issuer_name(ca_name).public_key(srv_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca.write_bytes(ca_cert.public_bytes(pem))
    crt.write_bytes(srv_cert.public_bytes(pem))
    key.write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))


def _certs_openssl(directory: Path, ca: Path, crt: Path, key: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl command is available")
    ca_key, csr, ext = directory / "ca.key", directory / "server.csr", directory / "server.ext"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(ca_key), "-out", str(ca), "-days", "1", "-subj", "/CN=feeds test CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext.write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\n"
                   "extendedKeyUsage = serverAuth\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "1", "-extfile", str(ext))


class Mosquitto:
    """One mosquitto broker listening on 127.0.0.1:``port`` (a free one by
    default), its files under ``directory``.  ``users``: user -> password
    (anonymous clients refused then); ``tls``: TLS on the listener
    (:attr:`ca_file` verifies it).  A context manager: stopped at the end."""

    def __init__(self, directory: Path, *, users: dict[str, str] | None = None, tls: bool = False,
                 port: int | None = None):
        if not os.access(MOSQUITTO, os.X_OK):
            pytest.skip(f"mosquitto not installed ({MOSQUITTO})")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.users = dict(users or {})
        self.tls = tls
        self.ca_file: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "mosquitto.log"
        self.conf = self.dir / "mosquitto.conf"
        self._write_config()

    def _write_config(self) -> None:
        lines = [f"listener {self.port} {self.host}", "persistence false", "log_dest stdout",
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "connection_messages true",
                 # as root, mosquitto would switch to the user "mosquitto", who cannot read these files
                 f"user {pwd.getpwuid(os.getuid()).pw_name}"]
        if self.users:
            pw = self.dir / "passwords"
            pw.write_text("".join(password_line(u, p) + "\n" for u, p in self.users.items()))
            os.chmod(pw, 0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            self.ca_file, crt, key = make_certs(self.dir / "tls")
            lines += [f"cafile {self.ca_file}", f"certfile {crt}", f"keyfile {key}"]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> "Mosquitto":
        """Start the broker and wait until it accepts connections; raises
        RuntimeError with its log when it does not."""
        assert not self.running
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto not listening on {self.port} in {timeout} s:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0) -> None:
        """End the broker (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
