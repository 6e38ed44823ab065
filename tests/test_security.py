"""Per-site credentials, the shared token, failed-attempt limits and connection counts (fedplug.security),
and the ``fedplug credentials`` command."""

import hmac
import stat
import subprocess
import sys

import pytest

from fedplug import security as S
from fedplug.credentials_cli import main as credentials_main


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# ---------------------------------------------------------------------- hashes


def test_a_secret_verifies_against_its_hash_and_nothing_else():
    secret = S.new_secret()
    encoded = S.hash_secret(secret)
    assert secret not in encoded and encoded.startswith("scrypt$n=16384,r=8,p=1$")
    assert S.verify_secret(secret, encoded)
    assert not S.verify_secret(secret[:-1], encoded)
    assert not S.verify_secret(secret + "x", encoded)
    assert S.hash_secret(secret) != encoded  # a fresh salt each time


def test_new_secrets_are_long_random_and_shell_safe():
    secrets = {S.new_secret() for _ in range(20)}
    assert len(secrets) == 20
    assert all(len(s) >= 43 and all(c.isalnum() or c in "-_" for c in s) for s in secrets)


@pytest.mark.parametrize("encoded, reason", [
    ("sha1$abc", "not a fedplug scrypt hash"),
    ("scrypt$n=16384,r=8$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "unreadable"),
    ("scrypt$n=1000,r=8,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "out of range"),
    ("scrypt$n=2147483648,r=8,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "out of range"),
    ("scrypt$n=16384,r=8,p=1$!!!$AAAA", "unreadable"),
])
def test_malformed_hashes_are_refused_with_a_reason(encoded, reason):
    with pytest.raises(ValueError, match=reason):
        S.verify_secret("x", encoded)


def test_the_token_check_is_hmac_compare_digest(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(S.hmac, "compare_digest", spy)
    assert S.check_token("sesame", "sesame")
    assert not S.check_token("sesamE", "sesame")
    assert not S.check_token("s\u00e9same", "sesame")  # non-ASCII compared as bytes, not refused by a TypeError
    assert calls and all(isinstance(a, bytes) for a, _ in calls)
    assert not S.check_token(None, "sesame") and not S.check_token(12, "sesame")
    assert not S.check_token("x" * 10_000, "sesame")


def test_secret_verification_uses_compare_digest(monkeypatch):
    encoded = S.hash_secret("abc")
    used = []
    monkeypatch.setattr(S.hmac, "compare_digest", lambda a, b: used.append(1) or a == b)
    assert S.verify_secret("abc", encoded) and used


# ---------------------------------------------------------------------- the credentials file


def test_credentials_round_trip_through_a_0600_file(tmp_path):
    path = tmp_path / "sub" / "creds.yaml"
    creds = S.Credentials(path=path)
    secret_a, secret_b = creds.add("site-a"), creds.add("site-b")
    creds.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert secret_a not in text and secret_b not in text and "site-a" in text
    loaded = S.Credentials.load(path)
    assert loaded.ids() == ["site-a", "site-b"]
    assert loaded.verify("site-a", secret_a) and loaded.verify("site-b", secret_b)
    assert not loaded.verify("site-a", secret_b)  # one site's secret does not prove another's id
    assert not loaded.verify("nobody", secret_a)
    assert not loaded.verify("site-a", None) and not loaded.verify(["site-a"], secret_a)


def test_unknown_ids_cost_a_verification_too(monkeypatch):
    creds = S.Credentials()
    creds.add("site-a")
    checked = []
    real = S.verify_secret
    monkeypatch.setattr(S, "verify_secret", lambda s, e: checked.append(e) or real(s, e))
    assert not creds.verify("nobody", "guess")
    assert len(checked) == 1  # a dummy hash: refusing an unknown id takes as long as a wrong secret


def test_adding_an_existing_id_needs_rotate_and_rotation_retires_the_old_secret(tmp_path):
    creds = S.Credentials(path=tmp_path / "c.yaml")
    old = creds.add("site-a")
    with pytest.raises(S.CredentialsError, match="--rotate"):
        creds.add("site-a")
    new = creds.add("site-a", rotate=True)
    assert creds.verify("site-a", new) and not creds.verify("site-a", old)


@pytest.mark.parametrize("bad_id", ["", " lead", "tab\tid", "x" * 129])
def test_bad_client_ids_are_refused(bad_id):
    with pytest.raises(S.CredentialsError, match="printable"):
        S.Credentials().add(bad_id)


@pytest.mark.parametrize("content, reason", [
    ("clients: [a, b]\n", "clients:"),
    ("version: 7\nclients: {}\n", "version 7"),
    ("version: 1\nclients:\n  a: plain-text-secret\n", "not a fedplug scrypt hash"),
    ("version: 1\nclients: {a: b\n", "not valid YAML"),
])
def test_malformed_credentials_files_say_what_is_wrong(tmp_path, content, reason):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(S.CredentialsError, match=reason) as info:
        S.Credentials.load(path)
    assert str(path) in str(info.value)


def test_a_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(S.CredentialsError, match="fedplug credentials add"):
        S.Credentials.load(tmp_path / "none.yaml")


def test_refresh_picks_up_a_rotated_secret_and_keeps_the_old_set_on_a_broken_file(tmp_path):
    path = tmp_path / "c.yaml"
    admin = S.Credentials(path=path)
    first = admin.add("site-a")
    admin.save()
    server_view = S.Credentials.load(path)
    assert not server_view.refresh()  # unchanged
    second = admin.add("site-a", rotate=True)
    admin.save()
    assert server_view.refresh()
    assert server_view.verify("site-a", second) and not server_view.verify("site-a", first)
    path.write_text("clients: [broken\n")
    with pytest.raises(S.CredentialsError):
        server_view.refresh()
    assert server_view.verify("site-a", second)


# ---------------------------------------------------------------------- limits


def test_failures_lock_an_address_out_then_it_may_try_again():
    clock = Clock()
    limiter = S.FailedAttemptLimiter(max_failures=3, window_s=60, lockout_s=30, clock=clock)
    for _ in range(2):
        limiter.failure("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") is None
    limiter.failure("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == pytest.approx(30)
    assert limiter.retry_after("10.0.0.2") is None  # other addresses are not affected
    clock.now += 31
    assert limiter.retry_after("10.0.0.1") is None


def test_failures_spread_beyond_the_window_do_not_lock_out():
    clock = Clock()
    limiter = S.FailedAttemptLimiter(max_failures=3, window_s=10, lockout_s=30, clock=clock)
    for _ in range(10):  # one failure every 6 s: a 10 s window never holds three
        limiter.failure("10.0.0.1")
        clock.now += 6
    assert limiter.retry_after("10.0.0.1") is None


def test_the_limiter_tracks_a_bounded_number_of_addresses():
    limiter = S.FailedAttemptLimiter(max_failures=5, max_addresses=100, clock=Clock())
    for i in range(10_000):
        limiter.failure(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}")
    assert len(limiter) == 100


def test_ipv6_addresses_count_per_64_network():
    assert S.address_key("2001:db8:1:2::1") == S.address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert S.address_key("2001:db8:1:3::1") != S.address_key("2001:db8:1:2::1")
    assert S.address_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert S.address_key(None) == "?" and len(S.address_key("x" * 1000)) == 64


def test_connections_are_bounded_per_address_and_in_all():
    counter = S.ConnectionCounter(max_per_address=2, max_total=3)
    assert counter.acquire("10.0.0.1") is None and counter.acquire("10.0.0.1") is None
    assert "max_connections_per_address" in counter.acquire("10.0.0.1")
    assert counter.acquire("10.0.0.2") is None
    assert "max_connections" in counter.acquire("10.0.0.3")
    counter.release("10.0.0.1")
    assert counter.count("10.0.0.1") == 1 and counter.acquire("10.0.0.3") is None
    for _ in range(5):
        counter.release("10.0.0.9")  # never counted: no negative counts
    assert counter.total == 3


# ---------------------------------------------------------------------- the connect-time check


def test_per_site_credentials_prove_the_id():
    creds = S.Credentials()
    secret = creds.add("site-a")
    auth = S.Authenticator(credentials=creds)
    who = auth.check({"client_id": "site-a", "secret": secret}, "10.0.0.1")
    assert who == S.Identity("credentials", "site-a") and who.proven
    with pytest.raises(S.AuthFailed, match="unknown client id or wrong secret"):
        auth.check({"client_id": "site-b", "secret": secret}, "10.0.0.1")
    with pytest.raises(S.AuthFailed, match="client.secret"):
        auth.check({"token": "x"}, "10.0.0.1")
    with pytest.raises(S.AuthFailed, match="client.secret"):
        auth.check(None, "10.0.0.1")


def test_repeated_failures_lock_the_address_out_even_for_the_right_secret():
    creds = S.Credentials()
    secret = creds.add("site-a")
    auth = S.Authenticator(credentials=creds, limiter=S.FailedAttemptLimiter(max_failures=3, clock=Clock()))
    for _ in range(3):
        with pytest.raises(S.AuthFailed):
            auth.check({"client_id": "site-a", "secret": "guess"}, "10.6.6.6")
    with pytest.raises(S.AuthFailed, match="too many failed") as info:
        auth.check({"client_id": "site-a", "secret": secret}, "10.6.6.6")
    assert info.value.retry_after > 0
    assert auth.check({"client_id": "site-a", "secret": secret}, "10.0.0.1").client_id == "site-a"


def test_the_shared_token_admits_any_id_and_is_weaker():
    auth = S.Authenticator(token="sesame")
    assert auth.check({"token": "sesame", "client_id": "anyone"}, "h") == S.Identity("token", "anyone")
    assert not auth.check({"token": "sesame"}, "h").proven
    with pytest.raises(S.AuthFailed, match="wrong token"):
        auth.check({"token": "sesamE"}, "h")
    with pytest.raises(S.AuthFailed, match="client.token"):
        auth.check({}, "h")


def test_no_authentication_admits_everyone_and_both_kinds_together_are_refused():
    assert S.Authenticator().check(None, "h") == S.Identity("none", None)
    assert not S.Authenticator().required
    with pytest.raises(S.CredentialsError, match="not both"):
        S.Authenticator(credentials=S.Credentials(), token="t")


@pytest.mark.parametrize("auth", ["a string", ["list"], {"client_id": 5, "secret": "s"},
                                  {"client_id": "a\nb", "secret": "s"}])
def test_malformed_auth_payloads_are_failures_not_crashes(auth):
    creds = S.Credentials()
    creds.add("a")
    with pytest.raises(S.AuthFailed):
        S.Authenticator(credentials=creds).check(auth, "h")


def test_a_secret_file_gives_its_first_line(tmp_path):
    path = tmp_path / "site.secret"
    path.write_text("\n  abc-def  \nignored\n")
    assert S.read_secret_file(path) == "abc-def"
    path.write_text("\n\n")
    with pytest.raises(S.CredentialsError, match="empty"):
        S.read_secret_file(path)
    with pytest.raises(S.CredentialsError, match="client.secret_file"):
        S.read_secret_file(tmp_path / "missing")


# ---------------------------------------------------------------------- fedplug credentials


def test_credentials_add_prints_the_secret_once_and_stores_only_its_hash(tmp_path, capsys):
    path = tmp_path / "creds.yaml"
    assert credentials_main(["add", "site-a", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    secret = out.split("shown only this once:")[1].split()[0]
    assert "client.secret_file=" in out and "client.client_id=site-a" in out and "server.credentials_file=" in out
    assert secret not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert S.Credentials.load(path).verify("site-a", secret)


def test_credentials_add_refuses_to_overwrite_unless_rotate(tmp_path, capsys):
    path = tmp_path / "creds.yaml"
    credentials_main(["add", "site-a", "--file", str(path)])
    first = capsys.readouterr().out.split("shown only this once:")[1].split()[0]
    assert credentials_main(["add", "site-a", "--file", str(path)]) == 2
    assert "--rotate" in capsys.readouterr().err
    assert S.Credentials.load(path).verify("site-a", first)  # untouched
    assert credentials_main(["add", "site-a", "--file", str(path), "--rotate"]) == 0
    second = capsys.readouterr().out.split("shown only this once:")[1].split()[0]
    creds = S.Credentials.load(path)
    assert creds.verify("site-a", second) and not creds.verify("site-a", first)


def test_credentials_secret_file_list_and_remove(tmp_path, capsys):
    path, secret_file = tmp_path / "creds.yaml", tmp_path / "site-b.secret"
    credentials_main(["add", "site-a", "--file", str(path)])
    assert credentials_main(["add", "site-b", "--file", str(path), "--secret-file", str(secret_file)]) == 0
    out = capsys.readouterr().out
    secret = S.read_secret_file(secret_file)
    assert secret not in out and stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert S.Credentials.load(path).verify("site-b", secret)
    assert credentials_main(["add", "site-c", "--file", str(path), "--secret-file", str(secret_file)]) == 2
    assert "already exists" in capsys.readouterr().err and "site-c" not in S.Credentials.load(path)
    assert credentials_main(["list", "--file", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["site-a", "site-b"]
    assert credentials_main(["remove", "site-a", "--file", str(path)]) == 0
    assert S.Credentials.load(path).ids() == ["site-b"]
    assert credentials_main(["remove", "site-a", "--file", str(path)]) == 2
    assert "known ids: site-b" in capsys.readouterr().err


def test_fedplug_credentials_is_a_subcommand_of_the_console_script(tmp_path):
    path = tmp_path / "creds.yaml"
    done = subprocess.run([sys.executable, "-m", "fedplug", "credentials", "add", "site-x", "--file", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert S.Credentials.load(path).ids() == ["site-x"]


# ---------------------------------------------------------------------- HTTP access (/status, the dashboard)


def _basic(user, secret):
    import base64

    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def test_http_access_takes_the_token_the_status_token_or_a_sites_secret():
    assert S.Authenticator(token="sesame").check_http("Bearer sesame", "h")
    assert S.Authenticator(token="sesame").check_http(_basic("anyone", "sesame"), "h")  # a browser's prompt
    assert not S.Authenticator(token="sesame").check_http("Bearer wrong", "h")
    assert not S.Authenticator(token="sesame").check_http(None, "h")
    creds = S.Credentials()
    secret = creds.add("site-a")
    auth = S.Authenticator(credentials=creds)
    assert auth.check_http(_basic("site-a", secret), "h")
    assert not auth.check_http(_basic("site-b", secret), "h") and not auth.check_http("Bearer " + secret, "h")
    assert auth.check_http("Bearer admin-view", "h", status_token="admin-view")


@pytest.mark.parametrize("header", ["", "Bearer", "Basic !!!", "Basic " + "QQ==", "Digest x", "x" * 5000, 7])
def test_unusable_authorization_headers_are_refused_quietly(header):
    assert S.parse_authorization(header)[1] is None
    assert not S.Authenticator(token="t").check_http(header, "h")


def test_failed_http_attempts_lock_out_like_failed_connections():
    auth = S.Authenticator(token="sesame", limiter=S.FailedAttemptLimiter(max_failures=2, clock=Clock()))
    auth.check_http("Bearer a", "10.6.6.6")
    auth.check_http("Bearer b", "10.6.6.6")
    with pytest.raises(S.AuthFailed, match="too many"):
        auth.check_http("Bearer sesame", "10.6.6.6")
