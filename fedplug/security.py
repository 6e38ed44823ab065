"""Who may connect: per-site credentials, the shared token, and the limits on failed attempts and connections.

Pure classes with no server imports, so each is unit-tested on its own
(``tests/test_security.py``).  The server builds one :class:`Authenticator`
at start-up from ``server.credentials_file`` / ``server.token`` and calls
:meth:`Authenticator.check` from its Socket.IO ``connect`` handler (in a worker
thread: a scrypt verification costs tens of milliseconds), before any event of
that socket is handled; it keeps one :class:`ConnectionCounter` for the
per-address connection bound.  ``fedplug credentials add|list|remove``
(:mod:`fedplug.credentials_cli`) edits the credentials file.

The credentials file (YAML, mode 0600) maps each ``client_id`` to a hash of
its secret, never the secret itself::

    version: 1
    clients:
      site-a: scrypt$n=16384,r=8,p=1$<salt, base64>$<key, base64>

Why scrypt (``hashlib.scrypt``, OpenSSL's implementation in the standard
library) rather than argon2-cffi: it is a maintained, memory-hard KDF that
needs no extra dependency, and the secrets it protects are 256-bit random
tokens made by ``secrets.token_urlsafe``, not passwords people choose, so
the KDF only has to make a leaked file useless, which any memory-hard KDF
does; its parameters are stored in each hash, so they can be raised later
without invalidating existing entries.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

# scrypt cost: n=2**14, r=8 takes 16 MiB and about 50-70 ms per verification on one core; the
# secrets are random, so this is about a leaked file, not guessable passwords (see above).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
# refuse hashes whose parameters would make one verification take seconds or gigabytes
_MAX_SCRYPT_N = 2**20
_MAX_SCRYPT_R = 32
_MAX_SCRYPT_P = 16

SECRET_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 bits
MAX_SECRET_LEN = 256  # longer presented secrets or tokens are refused before hashing
MAX_CLIENT_ID_LEN = 128  # as fedplug.protocol.MAX_CLIENT_ID_LEN
FILE_VERSION = 1

_HEADER = (
    "# fedplug per-site credentials: each site's client_id and a scrypt hash of its secret (the secrets\n"
    "# themselves are not stored). Edit with `fedplug credentials add|list|remove`; the server reads it\n"
    "# with server.credentials_file=<this file>. Keep it readable by the server's user only (mode 0600).\n"
)


class CredentialsError(ValueError):
    """The credentials file cannot be read or written; the message names the file and what to do."""


class AuthFailed(Exception):
    """A connection attempt is refused; ``reason`` is what the peer is told (it names no secret).

    ``retry_after`` is set (seconds) when the address is locked out for too many failures.
    """

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


# ---------------------------------------------------------------------- secrets and their hashes


def new_secret() -> str:
    """A fresh site secret: 256 random bits, URL-safe text (safe in a shell and in YAML)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_secret(secret: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
                salt: bytes | None = None) -> str:
    """The stored form of ``secret``: ``scrypt$n=..,r=..,p=..$<salt>$<key>`` with a fresh random salt."""
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    key = _scrypt(secret.encode("utf-8"), salt, n, r, p)
    return f"scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(key)}"


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, dklen: int = _KEY_BYTES) -> bytes:
    # OpenSSL's default maxmem (32 MiB) is below what larger n/r need: allow what the parameters ask for
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=256 * r * n + (1 << 20))


@dataclass(frozen=True)
class _ParsedHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _parse_hash(encoded: str) -> _ParsedHash:
    """Split a stored hash; ``ValueError`` saying what is wrong with it."""
    if not isinstance(encoded, str):
        raise ValueError(f"a hash must be a string, got {type(encoded).__name__}")
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != "scrypt":
        raise ValueError("not a fedplug scrypt hash (expected scrypt$n=..,r=..,p=..$salt$key)")
    try:
        params = dict(item.split("=", 1) for item in parts[1].split(","))
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
        salt = base64.b64decode(parts[2], validate=True)
        key = base64.b64decode(parts[3], validate=True)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"unreadable scrypt hash ({exc})") from None
    if n < 2 or n & (n - 1) or n > _MAX_SCRYPT_N or not 1 <= r <= _MAX_SCRYPT_R or not 1 <= p <= _MAX_SCRYPT_P:
        raise ValueError(f"scrypt parameters out of range (n a power of 2 up to {_MAX_SCRYPT_N}, "
                         f"r 1-{_MAX_SCRYPT_R}, p 1-{_MAX_SCRYPT_P}), got n={n}, r={r}, p={p}")
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("scrypt hash with a salt under 8 or a key under 16 bytes")
    return _ParsedHash(n, r, p, salt, key)


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether ``secret`` matches the stored hash; the comparison is constant-time (``hmac.compare_digest``)."""
    h = _parse_hash(encoded)
    candidate = _scrypt(secret.encode("utf-8"), h.salt, h.n, h.r, h.p, dklen=len(h.key))
    return hmac.compare_digest(candidate, h.key)


def check_token(presented: Any, expected: str) -> bool:
    """The shared-token check, constant-time in the token's content (``hmac.compare_digest`` on UTF-8 bytes)."""
    if not isinstance(presented, str) or len(presented) > MAX_SECRET_LEN:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), str(expected).encode("utf-8"))


def valid_client_id(client_id: Any) -> bool:
    return (isinstance(client_id, str) and 0 < len(client_id) <= MAX_CLIENT_ID_LEN
            and client_id.isprintable() and client_id.strip() == client_id)


# ---------------------------------------------------------------------- the credentials file


class Credentials:
    """The per-site credentials: ``client_id`` -> stored hash, optionally backed by a file.

    :meth:`load` / :meth:`save` read and write the file; :meth:`verify` checks
    a presented secret.  :meth:`refresh` re-reads the file when it changed on
    disk, so ``fedplug credentials add`` or ``--rotate`` takes effect for the
    next connection without restarting the server.
    """

    def __init__(self, hashes: Mapping[str, str] | None = None, path: Path | str | None = None):
        self.hashes: dict[str, str] = dict(hashes or {})
        self.path = Path(path) if path is not None else None
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        # an unknown id is checked against this, so a refusal takes as long whether or not the id exists
        self._dummy = hash_secret(new_secret())

    # -- file

    @classmethod
    def load(cls, path: Path | str, *, missing_ok: bool = False) -> "Credentials":
        """Read a credentials file; :class:`CredentialsError` says what is wrong and how to fix it."""
        path = Path(path)
        creds = cls(path=path)
        if missing_ok and not path.exists():
            return creds
        creds.hashes, creds._stamp = _read_file(path)
        return creds

    def save(self, path: Path | str | None = None) -> Path:
        """Write the file atomically with mode 0600 (a reader never sees half a file)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise CredentialsError("no credentials file to write to")
        _write_file(target, self.hashes)
        self.path = target
        self._stamp = _stamp_of(target)
        return target

    def refresh(self) -> bool:
        """Re-read the file if it changed since it was read; return whether it was.

        A file that became unreadable or malformed keeps the credentials in
        memory and raises :class:`CredentialsError`, so the server can log it
        and go on with the last good version.
        """
        if self.path is None:
            return False
        try:
            stamp = _stamp_of(self.path)
        except OSError as exc:
            raise CredentialsError(f"credentials file {self.path} is gone ({exc.strerror}); "
                                   "keeping the credentials read before") from None
        if stamp == self._stamp:
            return False
        hashes, stamp = _read_file(self.path)
        with self._lock:
            self.hashes, self._stamp = hashes, stamp
        return True

    # -- entries

    def ids(self) -> list[str]:
        return sorted(self.hashes)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self.hashes

    def __len__(self) -> int:
        return len(self.hashes)

    def add(self, client_id: str, *, rotate: bool = False, secret: str | None = None) -> str:
        """Store a hash of a new secret for ``client_id`` and return the secret (shown to the admin once)."""
        if not valid_client_id(client_id):
            raise CredentialsError(f"client id {client_id!r} must be 1-{MAX_CLIENT_ID_LEN} printable characters "
                                   "without leading or trailing spaces")
        if client_id in self.hashes and not rotate:
            raise CredentialsError(f"client id {client_id!r} already has a secret in {self.path}; pass --rotate to "
                                   "replace it (the site's old secret stops working)")
        secret = new_secret() if secret is None else secret
        with self._lock:
            self.hashes[client_id] = hash_secret(secret)
        return secret

    def remove(self, client_id: str) -> None:
        if client_id not in self.hashes:
            known = ", ".join(self.ids()) or "none"
            raise CredentialsError(f"client id {client_id!r} is not in {self.path} (known ids: {known})")
        with self._lock:
            del self.hashes[client_id]

    def verify(self, client_id: Any, secret: Any) -> bool:
        """Whether ``secret`` is ``client_id``'s; the same work is done for an unknown id (no id probing)."""
        if not isinstance(secret, str) or len(secret) > MAX_SECRET_LEN:
            return False
        with self._lock:
            encoded = self.hashes.get(client_id) if isinstance(client_id, str) else None
        ok = verify_secret(secret, encoded if encoded is not None else self._dummy)
        return ok and encoded is not None


def _stamp_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _read_file(path: Path) -> tuple[dict[str, str], tuple[int, int]]:
    import yaml

    try:
        stamp = _stamp_of(path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialsError(f"credentials file {path} does not exist; create it with "
                               f"`fedplug credentials add <client_id> --file {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"credentials file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CredentialsError(f"credentials file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        data = {"version": FILE_VERSION, "clients": {}}
    if not isinstance(data, dict) or not isinstance(data.get("clients", {}), dict):
        raise CredentialsError(f"credentials file {path} must hold `version: 1` and a `clients:` mapping of "
                               "client_id to hash (as `fedplug credentials add` writes it)")
    if data.get("version", FILE_VERSION) != FILE_VERSION:
        raise CredentialsError(f"credentials file {path} has version {data.get('version')!r}; this fedplug "
                               f"reads version {FILE_VERSION}")
    hashes: dict[str, str] = {}
    for cid, encoded in (data.get("clients") or {}).items():
        if not valid_client_id(cid):
            raise CredentialsError(f"credentials file {path}: {cid!r} is not a valid client id")
        try:
            _parse_hash(encoded)
        except ValueError as exc:
            raise CredentialsError(f"credentials file {path}: the entry of {cid!r} is {exc}; "
                                   f"make a new one with `fedplug credentials add {cid} --rotate`") from None
        hashes[cid] = encoded
    return hashes, stamp


def _write_file(path: Path, hashes: Mapping[str, str]) -> None:
    import yaml

    body = yaml.safe_dump({"version": FILE_VERSION, "clients": dict(sorted(hashes.items()))},
                          sort_keys=False, default_flow_style=False, width=1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(_HEADER + body)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, stat.S_IRUSR | stat.S_IWUSR)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def loose_permissions(path: Path | str) -> bool:
    """Whether others than the owner may read or write the file (the server warns then)."""
    try:
        return bool(Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


# ---------------------------------------------------------------------- limits per address


def address_key(address: Any) -> str:
    """The unit that limits count: an IPv4 address, an IPv6 /64 network (one site's whole allocation).

    Anything that is not an IP address (e.g. a Unix socket's empty peer) is
    one key of its own.
    """
    text = str(address or "?")[:64]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailedAttemptLimiter:
    """Fixed window with lock-out: ``max_failures`` failed attempts within ``window_s`` lock an address
    out for ``lockout_s`` (every attempt is refused, without checking it, until then).

    Memory is bounded: at most ``max_addresses`` are tracked, the least
    recently failing one forgotten first.  Thread-safe (the server records
    results from worker threads).  ``clock`` is injectable for tests.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 60.0, lockout_s: float = 60.0,
                 max_addresses: int = 10_000, clock: Callable[[], float] = time.monotonic):
        if max_failures < 1 or window_s <= 0 or lockout_s < 0 or max_addresses < 1:
            raise ValueError("max_failures >= 1, window_s > 0, lockout_s >= 0 and max_addresses >= 1 are needed")
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_addresses = max_addresses
        self.clock = clock
        # key -> [window start, failures in it, locked until]
        self._state: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: Any) -> float | None:
        """Seconds until this address may try again, or None when it may try now."""
        key, now = address_key(address), self.clock()
        with self._lock:
            entry = self._state.get(key)
            if entry is None:
                return None
            if entry[2] > now:
                return entry[2] - now
            if now - entry[0] >= self.window_s and entry[2] <= now:
                del self._state[key]
            return None

    def failure(self, address: Any) -> None:
        key, now = address_key(address), self.clock()
        with self._lock:
            entry = self._state.pop(key, None)
            if entry is None or now - entry[0] >= self.window_s:
                entry = [now, 0.0, entry[2] if entry is not None else 0.0]
            entry[1] += 1
            if entry[1] >= self.max_failures:
                entry[2] = now + self.lockout_s
                entry[0], entry[1] = now, 0.0  # a new window begins after the lock-out's start
            self._state[key] = entry  # most recent last
            while len(self._state) > self.max_addresses:
                self._state.popitem(last=False)

    def __len__(self) -> int:
        return len(self._state)


class ConnectionCounter:
    """Open connections per address (:func:`address_key`) and in all, each bounded.

    :meth:`acquire` in the ``connect`` handler, :meth:`release` in
    ``disconnect``; memory is one entry per address that has a connection open.
    """

    def __init__(self, max_per_address: int = 64, max_total: int = 1024):
        if max_per_address < 1 or max_total < 1:
            raise ValueError("max_per_address and max_total must be >= 1")
        self.max_per_address = max_per_address
        self.max_total = max_total
        self._counts: dict[str, int] = {}
        self.total = 0

    def acquire(self, address: Any) -> str | None:
        """Count one more connection; return why it is refused instead, or None when it is counted."""
        key = address_key(address)
        if self.total >= self.max_total:
            return f"the server holds its maximum of {self.max_total} connections (server.max_connections)"
        if self._counts.get(key, 0) >= self.max_per_address:
            return (f"{key} already holds {self.max_per_address} connections "
                    "(server.max_connections_per_address)")
        self._counts[key] = self._counts.get(key, 0) + 1
        self.total += 1
        return None

    def release(self, address: Any) -> None:
        key = address_key(address)
        count = self._counts.get(key, 0)
        if count <= 0:
            return
        self.total -= 1
        if count == 1:
            del self._counts[key]
        else:
            self._counts[key] = count - 1

    def count(self, address: Any) -> int:
        return self._counts.get(address_key(address), 0)


# ---------------------------------------------------------------------- the connect-time check


@dataclass(frozen=True)
class Identity:
    """Who a connection proved to be: ``method`` is ``credentials``, ``token`` or ``none``.

    ``client_id`` is set with per-site credentials (the secret proved it), and
    with a token or no authentication when the auth payload named one.
    """

    method: str
    client_id: str | None = None

    @property
    def proven(self) -> bool:
        """Whether the id is proven (only a site's own secret proves it)."""
        return self.method == "credentials"


class Authenticator:
    """The ``connect`` handler's check of the Socket.IO ``auth`` payload.

    - with ``credentials`` (per-site secrets): ``{"client_id": ..., "secret": ...}``
      must match that id's stored hash;
    - with ``token`` (the shared secret, the quick and weaker option: every
      holder can claim any id): ``{"token": ...}``, optionally with ``client_id``;
    - with neither: anyone connects (``server.host`` should then be a loopback
      or otherwise private address).

    Configuring both is refused: a token holder could otherwise claim a
    credentialed site's id.  Failed attempts are rate-limited per address by
    ``limiter``; a locked-out address is refused without any check.
    """

    def __init__(self, credentials: Credentials | None = None, token: str | None = None,
                 limiter: FailedAttemptLimiter | None = None):
        if credentials is not None and token:
            raise CredentialsError("set server.credentials_file (per-site secrets) or server.token (one shared "
                                   "secret), not both")
        self.credentials = credentials
        self.token = str(token) if token else None
        self.limiter = limiter if limiter is not None else FailedAttemptLimiter()

    @property
    def method(self) -> str:
        return "credentials" if self.credentials is not None else "token" if self.token else "none"

    @property
    def required(self) -> bool:
        return self.method != "none"

    def check(self, auth: Any, address: Any) -> Identity:
        """The identity ``auth`` proves; :class:`AuthFailed` with the reason the peer is told."""
        wait = self.limiter.retry_after(address)
        if wait is not None:
            raise AuthFailed(f"too many failed authentication attempts from this address; retry in {wait:.0f} s",
                             retry_after=wait)
        if auth is not None and not isinstance(auth, Mapping):
            return self._fail(address, "the auth payload must be an object")
        auth = auth or {}
        claimed = auth.get("client_id")
        if claimed is not None and not valid_client_id(claimed):
            return self._fail(address, f"auth.client_id must be 1-{MAX_CLIENT_ID_LEN} printable characters")
        if self.credentials is not None:
            secret = auth.get("secret")
            if claimed is None or secret is None:
                return self._fail(address, "this server needs per-site credentials: auth {client_id, secret} "
                                           "(client.client_id with client.secret or client.secret_file)")
            if self.credentials.verify(claimed, secret):
                return Identity("credentials", claimed)
            return self._fail(address, "unknown client id or wrong secret")
        if self.token is not None:
            if auth.get("token") is None:
                return self._fail(address, "this server needs a token: auth {token} (client.token)")
            if check_token(auth.get("token"), self.token):
                return Identity("token", claimed)
            return self._fail(address, "wrong token")
        return Identity("none", claimed)

    def check_http(self, header: Any, address: Any, status_token: str | None = None) -> bool:
        """Whether an HTTP ``Authorization`` header may read the run (``GET /status``, the dashboard).

        Accepted: ``Bearer <secret>`` or ``Basic`` (``user:secret``, what a
        browser's login prompt sends) where the secret is ``status_token``
        (``server.status_token``), the shared token, or — with per-site
        credentials, as ``Basic <client_id>:<secret>`` — a site's own secret.
        Failures count against the address like failed connections.
        """
        wait = self.limiter.retry_after(address)
        if wait is not None:
            raise AuthFailed(f"too many failed authentication attempts from this address; retry in {wait:.0f} s",
                             retry_after=wait)
        user, secret = parse_authorization(header)
        if secret is not None:
            if status_token and check_token(secret, status_token):
                return True
            if self.token is not None and check_token(secret, self.token):
                return True
            if self.credentials is not None and user is not None and self.credentials.verify(user, secret):
                return True
        self.limiter.failure(address)
        return False

    def _fail(self, address: Any, reason: str) -> Identity:
        self.limiter.failure(address)
        raise AuthFailed(reason)


def parse_authorization(header: Any) -> tuple[str | None, str | None]:
    """``(user, secret)`` of an HTTP ``Authorization`` header (``Bearer`` has no user); ``(None, None)`` if unusable."""
    if not isinstance(header, str) or len(header) > 4 * MAX_SECRET_LEN:
        return None, None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return None, value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None, None
        user, sep, secret = decoded.partition(":")
        return (user or None, secret) if sep and secret else (None, None)
    return None, None


def read_secret_file(path: Path | str, key: str = "client.secret_file") -> str:
    """A site's secret from a file (its first line, stripped); :class:`CredentialsError` naming ``key``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"{key}={path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise CredentialsError(f"{key}={path} is empty; it must hold the secret `fedplug credentials add` printed")
    if len(lines[0]) > MAX_SECRET_LEN:
        raise CredentialsError(f"{key}={path}: the secret is longer than {MAX_SECRET_LEN} characters")
    return lines[0]
