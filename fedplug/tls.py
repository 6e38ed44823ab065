"""TLS for the federation: the server's and the client's ``ssl.SSLContext``, and why a connection fails.

Who calls what:

- the server (``FederationServer.start``) builds :func:`server_context_from`
  ``server.ssl_certfile`` / ``server.ssl_keyfile`` (+ ``server.ssl_ca_file`` and
  ``server.ssl_client_certs`` = ``none`` | ``optional`` | ``required`` for mutual
  TLS) and hands it to aiohttp's ``TCPSite(ssl_context=...)``;
- a client builds :func:`client_context_from` ``client.ca_file`` (+
  ``client.ssl_certfile`` / ``client.ssl_keyfile``, its own certificate) for
  an ``https://`` server URL and gives it to python-socketio through an
  aiohttp session;
- when a client's connection fails, it calls :func:`diagnose`, which opens
  one TLS connection itself and names the cause: wrong scheme (``http`` vs
  ``https``), untrusted certificate, hostname mismatch, or client certificate
  refused (the library's own errors say only "cannot connect").

Every bad file is a :class:`TLSConfigError` naming the config key, the file
and what to do.  Both sides require TLS 1.2 or newer.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

CLIENT_CERT_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

# OpenSSL verify codes (X509_V_ERR_*) that mean "the certificate is not for this name"
_HOSTNAME_CODES = {62, 63, 64}  # HOSTNAME_MISMATCH, EMAIL_MISMATCH, IP_ADDRESS_MISMATCH
# OpenSSL's reasons when the peer does not speak TLS at all (an HTTP answer read as a TLS record)
_NOT_TLS_REASONS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
                    "PACKET_LENGTH_TOO_LONG"}


class TLSConfigError(ValueError):
    """A TLS setting that cannot work; the message names the key, the file and what to do."""


def _readable(path: Any, key: str) -> str:
    """``path`` as a string, or :class:`TLSConfigError` if it is not a readable file."""
    if path is None or str(path) == "":
        raise TLSConfigError(f"{key} is not set")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise TLSConfigError(f"{key}={path}: no such file")
    if not p.is_file():
        raise TLSConfigError(f"{key}={path} is not a file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(1)
    except OSError as exc:
        raise TLSConfigError(f"{key}={path} cannot be read ({exc.strerror}); check its permissions") from None
    if not head:
        raise TLSConfigError(f"{key}={path} is empty")
    return str(p)


def _no_passphrase() -> str:
    raise TLSConfigError("encrypted")


def _load_chain(ctx: ssl.SSLContext, certfile: Any, keyfile: Any, cert_key: str, key_key: str) -> None:
    cert = _readable(certfile, cert_key)
    key = _readable(keyfile, key_key) if keyfile not in (None, "") else None
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except TLSConfigError:
        raise TLSConfigError(f"{key_key}={keyfile or certfile}: the private key is encrypted with a passphrase; "
                             "give an unencrypted key file and protect it with file permissions (mode 0600)") \
            from None
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", None) or ""
        if reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"{key_key}={keyfile or certfile} does not match the certificate in "
                                 f"{cert_key}={certfile}: give the key the certificate was made for") from None
        if key is None:
            raise TLSConfigError(f"{cert_key}={certfile} holds no usable certificate and private key "
                                 f"({reason or exc}); give PEM files, the key in {key_key}") from None
        raise TLSConfigError(f"{cert_key}={certfile} / {key_key}={keyfile}: not a PEM certificate and its private "
                             f"key ({reason or exc})") from None


def _load_ca(ctx: ssl.SSLContext, ca_file: Any, key: str) -> None:
    path = _readable(ca_file, key)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{key}={ca_file} holds no PEM CA certificate "
                             f"({getattr(exc, 'reason', None) or exc})") from None


def server_context(certfile: Any, keyfile: Any = None, ca_file: Any = None, client_certs: str = "none",
                   prefix: str = "server.") -> ssl.SSLContext:
    """The server's context: its certificate chain, and with ``client_certs`` optional/required, the CA
    that client certificates must chain to (mutual TLS)."""
    mode = str(client_certs)
    if mode not in CLIENT_CERT_MODES:
        raise TLSConfigError(f"{prefix}ssl_client_certs must be one of none, optional, required; got {client_certs!r}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, certfile, keyfile, f"{prefix}ssl_certfile", f"{prefix}ssl_keyfile")
    if mode != "none":
        if ca_file in (None, ""):
            raise TLSConfigError(f"{prefix}ssl_client_certs={mode} needs {prefix}ssl_ca_file: the CA certificate(s) "
                                 "that sign the sites' client certificates")
        _load_ca(ctx, ca_file, f"{prefix}ssl_ca_file")
    elif ca_file not in (None, ""):
        raise TLSConfigError(f"{prefix}ssl_ca_file is set but {prefix}ssl_client_certs=none, so no client "
                             f"certificate is checked; set {prefix}ssl_client_certs=required (or optional)")
    ctx.verify_mode = CLIENT_CERT_MODES[mode]
    return ctx


def client_context(ca_file: Any = None, certfile: Any = None, keyfile: Any = None,
                   prefix: str = "client.") -> ssl.SSLContext:
    """The client's context: verify the server against ``ca_file`` (the system's CAs when None),
    hostname checked; present ``certfile`` / ``keyfile`` when given (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file not in (None, ""):
        _load_ca(ctx, ca_file, f"{prefix}ca_file")
    if certfile not in (None, ""):
        _load_chain(ctx, certfile, keyfile, f"{prefix}ssl_certfile", f"{prefix}ssl_keyfile")
    elif keyfile not in (None, ""):
        raise TLSConfigError(f"{prefix}ssl_keyfile is set without {prefix}ssl_certfile: give the client "
                             "certificate too")
    return ctx


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    getter = getattr(cfg, "get", None)
    return getter(key) if getter is not None else None


def server_context_from(server_cfg: Any) -> ssl.SSLContext | None:
    """The context for the config's ``server`` section, or None when ``server.ssl_certfile`` is unset
    (plain HTTP); any other TLS key without a certificate is an error, never silently ignored."""
    cert = _get(server_cfg, "ssl_certfile")
    if cert in (None, ""):
        for key in ("ssl_keyfile", "ssl_ca_file"):
            if _get(server_cfg, key) not in (None, ""):
                raise TLSConfigError(f"server.{key} is set but server.ssl_certfile is not: TLS needs the server's "
                                     "certificate (server.ssl_certfile) and key (server.ssl_keyfile)")
        if str(_get(server_cfg, "ssl_client_certs") or "none") != "none":
            raise TLSConfigError("server.ssl_client_certs needs TLS: set server.ssl_certfile and server.ssl_keyfile")
        return None
    return server_context(cert, _get(server_cfg, "ssl_keyfile"), _get(server_cfg, "ssl_ca_file"),
                          str(_get(server_cfg, "ssl_client_certs") or "none"))


def client_context_from(client_cfg: Any, server_url: str) -> ssl.SSLContext | None:
    """The context for ``client.server_url`` when it is ``https://`` / ``wss://``, else None.

    TLS keys given with a plain ``http://`` URL are an error: they would be
    ignored, and the site believe its traffic encrypted.
    """
    secure = is_secure_url(server_url)
    keys = ("ca_file", "ssl_certfile", "ssl_keyfile")
    if not secure:
        given = [k for k in keys if _get(client_cfg, k) not in (None, "")]
        if given:
            raise TLSConfigError(f"client.{given[0]} is set but client.server_url={server_url} is not https://; "
                                 "use https://<server>:<port> for a TLS server")
        return None
    return client_context(_get(client_cfg, "ca_file"), _get(client_cfg, "ssl_certfile"),
                          _get(client_cfg, "ssl_keyfile"))


def is_secure_url(url: str) -> bool:
    return urlsplit(str(url)).scheme.lower() in ("https", "wss")


def _host_port(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(str(url))
    secure = parts.scheme.lower() in ("https", "wss")
    port = parts.port or (443 if secure else 80)
    return parts.hostname or "localhost", port, secure


def _switch_scheme(url: str, secure: bool) -> str:
    parts = urlsplit(str(url))
    scheme = {"http": "https", "ws": "wss"}.get(parts.scheme.lower(), "https") if secure else \
        {"https": "http", "wss": "ws"}.get(parts.scheme.lower(), "http")
    return parts._replace(scheme=scheme).geturl()


def _alert(exc: ssl.SSLError) -> str | None:
    reason = str(getattr(exc, "reason", None) or "")
    return reason if "ALERT" in reason else None


def diagnose(url: str, context: ssl.SSLContext | None = None, timeout: float = 5.0,
             client_cert: bool = False) -> str | None:
    """Why a (Socket.IO) connection to ``url`` fails at the TLS level, in one line; None when TLS is not the
    problem (or the server cannot be reached at all: the caller reports that).

    Blocking (one TCP connection, one handshake, one small HTTP request): call
    it from a worker thread.  ``context`` is the client's; with it None and an
    ``https`` URL, the system's default context is used.  ``client_cert`` says
    whether that context presents a client certificate (for the message).
    """
    host, port, secure = _host_port(url)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    with raw:
        if not secure:
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.check_hostname = False
            probe.verify_mode = ssl.CERT_NONE
            try:
                with probe.wrap_socket(raw, server_hostname=host):
                    pass
            except (ssl.SSLError, OSError):
                return None  # not a TLS server either: not a scheme problem
            return (f"the server at {host}:{port} speaks TLS but client.server_url is {url}: use "
                    f"{_switch_scheme(url, True)} (and client.ca_file for its CA)")
        ctx = context or ssl.create_default_context()
        try:
            tls = ctx.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            code = getattr(exc, "verify_code", None)
            detail = getattr(exc, "verify_message", None) or str(exc)
            if code in _HOSTNAME_CODES:
                return (f"hostname mismatch: the server's certificate is not valid for {host!r} ({detail}); "
                        "connect with a name the certificate lists (client.server_url), or give the server a "
                        "certificate for this name")
            return (f"untrusted certificate: the server's certificate at {host}:{port} is not trusted ({detail}); "
                    "set client.ca_file to the CA certificate that signed it")
        except ssl.SSLError as exc:
            reason = str(getattr(exc, "reason", None) or "")
            if _alert(exc):
                return _client_cert_message(host, port, client_cert, reason)
            if reason in _NOT_TLS_REASONS:
                return (f"the server at {host}:{port} does not speak TLS but client.server_url is {url}: use "
                        f"{_switch_scheme(url, False)}, or start the server with server.ssl_certfile/ssl_keyfile")
            if isinstance(exc, ssl.SSLEOFError):  # TLS 1.2: the server hung up on the client's certificate
                return _client_cert_message(host, port, client_cert, "the server ended the handshake")
            return f"TLS handshake with {host}:{port} failed: {reason or exc}"
        except OSError as exc:
            return _client_cert_message(host, port, client_cert, f"the server ended the handshake: {exc}")
        with tls:
            # TLS 1.3: the server checks the client's certificate after the handshake, so a refusal is seen at
            # the first read; a server that accepted it answers this request with some HTTP response
            try:
                tls.settimeout(timeout)
                tls.sendall(f"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: {host}\r\n"
                            "Connection: close\r\n\r\n".encode("ascii"))
                answer = tls.recv(1)
            except ssl.SSLError as exc:
                return _client_cert_message(host, port, client_cert, str(getattr(exc, "reason", None) or exc))
            except socket.timeout:
                return None
            except OSError as exc:
                return _client_cert_message(host, port, client_cert, f"the server hung up: {exc}")
            if not answer:
                return _client_cert_message(host, port, client_cert, "the server hung up without answering")
    return None


def _client_cert_message(host: str, port: int, has_cert: bool, reason: str) -> str:
    if not has_cert:
        return (f"client certificate refused: the server at {host}:{port} requires a client certificate "
                f"({reason}); set client.ssl_certfile and client.ssl_keyfile to this site's certificate and key")
    return (f"client certificate refused: the server at {host}:{port} does not accept this client's certificate "
            f"({reason}); it must be signed by the CA in the server's server.ssl_ca_file and still be valid")
