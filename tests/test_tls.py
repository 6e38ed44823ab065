"""fedplug.tls: SSL contexts from the config with clear errors, and connect-time diagnosis of TLS failures
(wrong scheme, untrusted certificate, hostname mismatch, client certificate refused) against real servers."""

import asyncio
import threading

import pytest
from aiohttp import web

from fedplug import tls
from fedplug.testing.certs import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------- contexts and their errors


def test_contexts_build_from_good_files(pki):
    import ssl

    server = tls.server_context(pki.server_cert, pki.server_key)
    assert server.verify_mode == ssl.CERT_NONE and server.minimum_version >= ssl.TLSVersion.TLSv1_2
    mutual = tls.server_context(pki.server_cert, pki.server_key, pki.ca_cert, "required")
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    client = tls.client_context(pki.ca_cert, pki.client_cert, pki.client_key)
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("setup, reason", [
    (lambda p, d: dict(certfile=d / "missing.pem", keyfile=p.server_key), "server.ssl_certfile=.*no such file"),
    (lambda p, d: dict(certfile=d, keyfile=p.server_key), "is not a file"),
    (lambda p, d: dict(certfile=_write(d / "empty.pem", b""), keyfile=p.server_key), "is empty"),
    (lambda p, d: dict(certfile=_write(d / "junk.pem", b"not a certificate"), keyfile=p.server_key), "not a PEM"),
    (lambda p, d: dict(certfile=p.server_cert, keyfile=p.client_key), "server.ssl_keyfile=.*does not match the "
                                                                      "certificate in server.ssl_certfile"),
    (lambda p, d: dict(certfile=p.server_cert, keyfile=_encrypted_key(d)), "encrypted with a passphrase"),
    (lambda p, d: dict(certfile=p.server_cert, keyfile=p.server_key, client_certs="required"),
     "needs server.ssl_ca_file"),
    (lambda p, d: dict(certfile=p.server_cert, keyfile=p.server_key, client_certs="yes"), "none, optional, required"),
    (lambda p, d: dict(certfile=p.server_cert, keyfile=p.server_key, ca_file=p.ca_cert), "ssl_client_certs=none"),
    (lambda p, d: dict(certfile=p.server_cert, keyfile=p.server_key, ca_file=_write(d / "ca.txt", b"junk"),
                       client_certs="optional"), "server.ssl_ca_file=.*holds no PEM CA"),
])
def test_bad_server_tls_files_name_the_key_and_the_fix(pki, tmp_path, setup, reason):
    with pytest.raises(tls.TLSConfigError, match=reason):
        tls.server_context(**setup(pki, tmp_path))


def test_bad_client_tls_files_name_the_key(pki, tmp_path):
    with pytest.raises(tls.TLSConfigError, match="client.ca_file=.*no such file"):
        tls.client_context(tmp_path / "nope.pem")
    with pytest.raises(tls.TLSConfigError, match="client.ssl_keyfile=.*does not match"):
        tls.client_context(pki.ca_cert, pki.client_cert, pki.server_key)
    with pytest.raises(tls.TLSConfigError, match="without client.ssl_certfile"):
        tls.client_context(pki.ca_cert, None, pki.client_key)


def test_the_config_sections_never_silently_ignore_a_tls_key(pki):
    assert tls.server_context_from({"ssl_certfile": None}) is None
    assert tls.server_context_from({"ssl_certfile": str(pki.server_cert), "ssl_keyfile": str(pki.server_key)})
    with pytest.raises(tls.TLSConfigError, match="server.ssl_certfile is not"):
        tls.server_context_from({"ssl_keyfile": str(pki.server_key)})
    with pytest.raises(tls.TLSConfigError, match="ssl_client_certs needs TLS"):
        tls.server_context_from({"ssl_client_certs": "required"})
    assert tls.client_context_from({}, "http://h:1") is None
    assert tls.client_context_from({"ca_file": str(pki.ca_cert)}, "https://h:1") is not None
    with pytest.raises(tls.TLSConfigError, match="client.ca_file is set but client.server_url=http://h:1 is not https"):
        tls.client_context_from({"ca_file": str(pki.ca_cert)}, "http://h:1")


def _write(path, data):
    path.write_bytes(data)
    return path


def _encrypted_key(folder):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return _write(folder / "enc.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.BestAvailableEncryption(b"pw")))


# ---------------------------------------------------------------------- diagnosis against real servers


class Servers:
    """Three aiohttp servers on one background loop: plain HTTP, TLS, and TLS requiring client certificates."""

    def __init__(self, pki):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners = []
        self.plain = self._start(None)
        self.tls = self._start(tls.server_context(pki.server_cert, pki.server_key))
        self.mtls = self._start(tls.server_context(pki.server_cert, pki.server_key, pki.ca_cert, "required"))

    def _start(self, ctx):
        async def ok(request):
            return web.Response(text="ok")

        async def go():
            app = web.Application()
            app.router.add_get("/{tail:.*}", ok)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
            await site.start()
            self.runners.append(runner)
            return site._server.sockets[0].getsockname()[1]

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def close(self):
        for runner in self.runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def servers(pki):
    s = Servers(pki)
    yield s
    s.close()


def test_a_sound_tls_setup_has_nothing_to_report(pki, servers):
    ctx = tls.client_context(pki.ca_cert)
    assert tls.diagnose(f"https://127.0.0.1:{servers.tls}", ctx, timeout=5) is None
    assert tls.diagnose(f"https://localhost:{servers.tls}", ctx, timeout=5) is None
    mutual = tls.client_context(pki.ca_cert, pki.client_cert, pki.client_key)
    assert tls.diagnose(f"https://127.0.0.1:{servers.mtls}", mutual, timeout=5, client_cert=True) is None
    assert tls.diagnose(f"http://127.0.0.1:{servers.plain}", None, timeout=5) is None


def test_wrong_scheme_is_named_both_ways(pki, servers):
    ctx = tls.client_context(pki.ca_cert)
    told = tls.diagnose(f"http://127.0.0.1:{servers.tls}", ctx, timeout=5)
    assert "speaks TLS" in told and f"use https://127.0.0.1:{servers.tls}" in told
    told = tls.diagnose(f"https://127.0.0.1:{servers.plain}", ctx, timeout=5)
    assert "does not speak TLS" in told and f"use http://127.0.0.1:{servers.plain}" in told


def test_an_untrusted_certificate_is_named(pki, servers):
    told = tls.diagnose(f"https://127.0.0.1:{servers.tls}", tls.client_context(pki.other_ca_cert), timeout=5)
    assert told.startswith("untrusted certificate") and "client.ca_file" in told


def _other_name_for_loopback():
    """A host name that resolves to 127.0.0.1 but is not in the server certificate (localhost is)."""
    import socket

    for name in ("runsc", "vm", socket.gethostname(), "localhost.localdomain"):
        try:
            if name != "localhost" and socket.gethostbyname(name) == "127.0.0.1":
                return name
        except OSError:
            continue
    pytest.skip("no second name for 127.0.0.1 on this machine")


def test_a_hostname_mismatch_is_named(pki, servers):
    name = _other_name_for_loopback()
    told = tls.diagnose(f"https://{name}:{servers.tls}", tls.client_context(pki.ca_cert), timeout=5)
    assert told.startswith("hostname mismatch") and repr(name) in told


def test_a_refused_client_certificate_is_named(pki, servers):
    url = f"https://127.0.0.1:{servers.mtls}"
    told = tls.diagnose(url, tls.client_context(pki.ca_cert), timeout=5, client_cert=False)
    assert told.startswith("client certificate refused") and "requires a client certificate" in told
    assert "client.ssl_certfile" in told
    rogue = tls.client_context(pki.ca_cert, pki.rogue_client_cert, pki.rogue_client_key)
    told = tls.diagnose(url, rogue, timeout=5, client_cert=True)
    assert told.startswith("client certificate refused") and "server.ssl_ca_file" in told


def test_an_unreachable_server_is_not_a_tls_problem(pki):
    assert tls.diagnose("https://127.0.0.1:1", tls.client_context(pki.ca_cert), timeout=2) is None
