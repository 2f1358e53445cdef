"""TLS: ``rediss://`` verifies the certificate and the host name, takes a CA file and a client
certificate, fails with a clear error otherwise, and never falls back to plaintext.

The server is Debian's ``/usr/bin/redis-server`` (7.0, built with TLS) listening on a TLS port
only; the certificates are made by the test with the ``openssl`` command.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from streamstore import ConfigurationError, Settings, StreamStore
from streamstore.errors import ConnectionLostError
from streamstore.redis.connection import connect
from streamstore.redis.embedded import EmbeddedServer

REDIS_SERVER = "/usr/bin/redis-server"  # a symlink named for its mode: run it by this path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=30
    )


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate for ``localhost`` only, and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_certificates(directory: Path) -> Certificates:
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
            "-subj", f"/CN=streamstore test {ca}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )  # fmt: skip
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        extensions = directory / f"{name}.ext"
        extensions.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\n"
            "subjectAltName=DNS:localhost\n"
            "authorityKeyIdentifier=keyid,issuer\n"
        )
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", extensions,
            cwd=directory,
        )  # fmt: skip
    return Certificates(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.crt",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TlsServer:
    """redis-server with a TLS port and no plaintext port (``--port 0``)."""

    def __init__(self, workdir: Path, certs: Certificates, *, client_certs: bool) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.args = [
            REDIS_SERVER, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
            "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "yes" if client_certs else "no",
            "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
            "--dir", str(workdir), "--daemonize", "no", "--logfile", str(workdir / "server.log"),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.workdir / "server.log"
        with (self.workdir / "stderr.log").open("wb") as errors:
            self.process = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors
            )
        deadline = time.monotonic() + 10
        while b"Ready to accept connections" not in (log.read_bytes() if log.exists() else b""):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = (self.workdir / "stderr.log").read_text() + (
                    log.read_text() if log.exists() else ""
                )
                if "TLS" in text and ("support" in text or "Failed" in text):
                    pytest.skip(f"{REDIS_SERVER} has no TLS support: {text[-300:]}")
                pytest.fail(f"{REDIS_SERVER} did not start: {text[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _server(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates, *, client_certs: bool
) -> Iterator[TlsServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip(f"{REDIS_SERVER} (a TLS-capable Redis) is not installed")
    server = TlsServer(tmp_path_factory.mktemp("tls"), certs, client_certs=client_certs)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[TlsServer]:
    yield from _server(tmp_path_factory, certs, client_certs=False)


@pytest.fixture(scope="module")
def mutual_tls_server(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[TlsServer]:
    yield from _server(tmp_path_factory, certs, client_certs=True)


def settings_for(url: str, tmp_path: Path, **tls: object) -> Settings:
    return Settings(
        redis_url=url,
        history_url=f"sqlite:///{tmp_path}/history.db",
        key_prefix=f"sst{uuid.uuid4().hex[:10]}",
        partitions=2,
        block=0.5,
        socket_timeout=3.0,
        **tls,  # type: ignore[arg-type]
    )


async def test_connects_with_the_ca_and_verifies(
    tls_server: TlsServer, certs: Certificates, tmp_path: Path
) -> None:
    url = f"rediss://localhost:{tls_server.port}/0"
    async with StreamStore.open(
        settings=settings_for(url, tmp_path, tls_ca_file=str(certs.ca))
    ) as store:
        session = await store.create_session(["a"])
        message = await store.publish(session.id, sender="a", content="over TLS")
        assert [m.content async for m in store.replay(session.id)] == ["over TLS"]
        assert message.stream_id is not None
        kwargs = store.client.connection_pool.connection_kwargs
        assert kwargs["ssl_cert_reqs"] == "required"
        assert kwargs["ssl_check_hostname"] is True


async def test_fails_clearly_without_the_ca(tls_server: TlsServer, tmp_path: Path) -> None:
    url = f"rediss://localhost:{tls_server.port}/0"
    with pytest.raises(ConnectionLostError, match=r"not trusted.*tls_ca_file"):
        async with StreamStore.open(settings=settings_for(url, tmp_path)):
            pass


async def test_fails_clearly_with_another_ca(
    tls_server: TlsServer, certs: Certificates, tmp_path: Path
) -> None:
    url = f"rediss://localhost:{tls_server.port}/0"
    settings = settings_for(url, tmp_path, tls_ca_file=str(certs.other_ca))
    with pytest.raises(ConnectionLostError, match="CERTIFICATE_VERIFY_FAILED"):
        async with StreamStore.open(settings=settings):
            pass


async def test_fails_clearly_with_a_wrong_host_name(
    tls_server: TlsServer, certs: Certificates, tmp_path: Path
) -> None:
    url = f"rediss://127.0.0.1:{tls_server.port}/0"  # the certificate names localhost only
    settings = settings_for(url, tmp_path, tls_ca_file=str(certs.ca))
    with pytest.raises(ConnectionLostError, match="does not name this host") as caught:
        async with StreamStore.open(settings=settings):
            pass
    assert "127.0.0.1" in str(caught.value)


async def test_plaintext_url_to_a_tls_port_fails(tls_server: TlsServer, tmp_path: Path) -> None:
    url = f"redis://localhost:{tls_server.port}/0"
    with pytest.raises(ConnectionLostError) as caught:
        async with StreamStore.open(settings=settings_for(url, tmp_path)):
            pass
    assert f"cannot connect to redis://localhost:{tls_server.port}" in str(caught.value)
    assert "use a rediss:// URL" in str(caught.value)


async def test_tls_url_to_a_plaintext_server_never_falls_back(
    certs: Certificates, tmp_path: Path
) -> None:
    with EmbeddedServer(data_dir=tmp_path / "plain") as plain:
        url = plain.url.replace("redis://", "rediss://", 1)
        settings = settings_for(url, tmp_path, tls_ca_file=str(certs.ca))
        admin = redis.Redis.from_url(plain.url)
        with admin:
            before = admin.info("stats")["total_commands_processed"]
            with pytest.raises(ConnectionLostError, match="TLS port"):
                async with StreamStore.open(settings=settings):
                    pass
            after = admin.info("stats")["total_commands_processed"]
        assert after == before + 1  # the second INFO: not one command came in plaintext


@pytest.mark.parametrize(
    ("url", "tls", "message"),
    [
        ("redis://localhost:6379/0", {"tls_ca_file": "ca.crt"}, "plaintext redis://"),
        ("unix:///tmp/redis.sock", {"tls_ca_file": "ca.crt"}, "plaintext unix://"),
        ("redis://localhost/0", {"tls_cert_file": "c.crt", "tls_key_file": "c.key"}, "use rediss"),
        ("rediss://localhost/0?ssl_cert_reqs=none", {}, "ssl_cert_reqs"),
        ("rediss://localhost/0?ssl_check_hostname=false", {}, "cannot be turned off"),
        ("rediss://localhost/0", {"tls_ca_file": "/nonexistent/ca.crt"}, "not a readable file"),
        ("http://localhost/0", {}, "redis://, rediss:// or unix://"),
    ],
)
def test_refused_before_any_connection(
    url: str, tls: dict[str, str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        connect(url, settings_for(url, tmp_path, **tls))


async def test_client_certificate(
    mutual_tls_server: TlsServer, certs: Certificates, tmp_path: Path
) -> None:
    url = f"rediss://localhost:{mutual_tls_server.port}/0"
    without = settings_for(url, tmp_path, tls_ca_file=str(certs.ca))
    with pytest.raises(ConnectionLostError, match="cannot connect to rediss://localhost"):
        async with StreamStore.open(settings=without):
            pass
    with_cert = without.replace(
        tls_cert_file=str(certs.client_cert), tls_key_file=str(certs.client_key)
    )
    async with StreamStore.open(settings=with_cert) as store:
        session = await store.create_session(["a"])
        await store.publish(session.id, sender="a", content="mutual TLS")


def test_credentials_never_appear_in_errors() -> None:
    from streamstore.redis.connection import redact_url  # noqa: PLC0415

    assert redact_url("rediss://worker:s3cret@redis.internal:6380/0") == (
        "rediss://worker:***@redis.internal:6380/0"
    )
    assert redact_url("redis://[::1]:6379/0") == "redis://[::1]:6379/0"
    assert redact_url("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
