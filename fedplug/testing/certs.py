"""Throw-away certificates for tests of TLS and mutual TLS (public API, like the rest of fedplug.testing).

:func:`make_pki` writes, under one folder, a CA, a server certificate for
``localhost`` / ``127.0.0.1``, a client certificate signed by the CA, and a
second, unrelated CA with a client certificate of its own (one the server
must refuse)::

    from fedplug.testing.certs import make_pki
    pki = make_pki(tmp_path)
    cfg = compose_cfg(f"+server.ssl_certfile={pki.server_cert}", f"+server.ssl_keyfile={pki.server_key}", ...)

Keys are EC P-256 (fast to make); nothing here is fit for production use.
Needs the ``cryptography`` package (a fedplug dependency).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issuer:
    """A CA: its certificate file and the objects to sign with."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class PKI:
    """The files :func:`make_pki` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # a CA the server does not trust ...
    rogue_client_cert: Path  # ... and a client certificate it signed
    rogue_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_ca(folder: Path, name: str = "fedplug test CA", stem: str = "ca") -> Issuer:
    """A self-signed CA certificate (``<stem>.pem``) and key (``<stem>.key``), valid for a day."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return Issuer(cert_path, key_path, cert, key)


def issue(ca: Issuer, folder: Path, stem: str, common_name: str, *, dns: Sequence[str] = (),
          ips: Sequence[str] = (), client: bool = False, expired: bool = False) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca`` for a server (``dns``/``ips`` as subject alternative names)
    or, with ``client=True``, for a client; ``expired`` makes one that expired yesterday."""
    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = ((now - datetime.timedelta(days=3), now - datetime.timedelta(days=1)) if expired
                  else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                              else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


def make_pki(folder: Path) -> PKI:
    """Everything a TLS / mutual-TLS test needs, written under ``folder``."""
    folder = Path(folder)
    ca = make_ca(folder)
    server_cert, server_key = issue(ca, folder, "server", "localhost", dns=["localhost"], ips=["127.0.0.1"])
    client_cert, client_key = issue(ca, folder, "client", "site-a", client=True)
    other = make_ca(folder, "some other CA", stem="other-ca")
    rogue_cert, rogue_key = issue(other, folder, "rogue-client", "site-a", client=True)
    return PKI(ca.cert_path, server_cert, server_key, client_cert, client_key, other.cert_path, rogue_cert,
               rogue_key)
