"""``fedplug credentials add|list|remove``: manage the per-site credentials file.

Registered in :data:`fedplug.cli.SUBCOMMANDS`; :func:`main` gets the
arguments after ``credentials`` and returns the exit status.  The file format
and the hashing are :mod:`fedplug.security`'s.  ``add`` prints the new secret
exactly once (or writes it to ``--secret-file``); only its hash is stored.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from fedplug.security import Credentials, CredentialsError

DEFAULT_FILE = "fedplug-credentials.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedplug credentials",
        description="Per-site secrets for server.credentials_file: only their scrypt hashes are stored.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{add,list,remove}")
    file_help = f"the credentials file (default: ./{DEFAULT_FILE}; created with mode 0600)"

    add = sub.add_parser("add", help="make a secret for a site and store its hash")
    add.add_argument("client_id", help="the site's client_id (what it sets as client.client_id)")
    add.add_argument("--file", default=DEFAULT_FILE, help=file_help)
    add.add_argument("--rotate", action="store_true",
                     help="replace the secret of an id that already has one (the old secret stops working)")
    add.add_argument("--secret-file", default=None,
                     help="write the secret to this new file (mode 0600) instead of printing it")

    lst = sub.add_parser("list", help="list the client ids that have a secret")
    lst.add_argument("--file", default=DEFAULT_FILE, help=file_help)

    rm = sub.add_parser("remove", help="remove a site: its secret stops working")
    rm.add_argument("client_id")
    rm.add_argument("--file", default=DEFAULT_FILE, help=file_help)
    return parser


def _write_secret(path: Path, secret: str) -> None:
    """Create ``path`` with mode 0600 and the secret in it; never overwrite a file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        raise CredentialsError(f"--secret-file {path} already exists; give a new path (it is never overwritten)") \
            from None
    except OSError as exc:
        raise CredentialsError(f"--secret-file {path} cannot be created: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")


def _add(args: argparse.Namespace, out) -> int:
    path = Path(args.file).resolve()
    creds = Credentials.load(path, missing_ok=True)
    rotated = args.client_id in creds
    secret_file = Path(args.secret_file).resolve() if args.secret_file else None
    if secret_file is not None and secret_file.exists():
        raise CredentialsError(f"--secret-file {secret_file} already exists; give a new path (it is never "
                               "overwritten)")
    secret = creds.add(args.client_id, rotate=args.rotate)
    creds.save(path)
    if secret_file is not None:
        _write_secret(secret_file, secret)
    verb = "replaced the secret of" if rotated else "added"
    print(f"{verb} client {args.client_id!r} in {path} (only a hash of its secret is stored there)", file=out)
    if secret_file is not None:
        print(f"its secret is in {secret_file} (mode 0600); copy that file to the site", file=out)
        how_file = str(secret_file)
    else:
        print("its secret, shown only this once:", file=out)
        print("", file=out)
        print(f"    {secret}", file=out)
        print("", file=out)
        how_file = f"/path/to/{args.client_id}.secret"
    print("on the site, keep the secret in a file only that site's user can read, and run:", file=out)
    print(f"    python -m fedplug mode=client client.client_id={args.client_id} client.secret_file={how_file} "
          "client.server_url=https://<server>:<port> ...", file=out)
    print("(or client.secret=<the secret>, which shows it in the process list and the shell history)", file=out)
    print(f"on the server: python -m fedplug mode=server server.credentials_file={path} ...", file=out)
    if rotated:
        print("the server picks up the change at the site's next connection; the old secret no longer works",
              file=out)
    return 0


def _list(args: argparse.Namespace, out) -> int:
    path = Path(args.file).resolve()
    creds = Credentials.load(path)
    if not len(creds):
        print(f"{path} holds no client id; add one with `fedplug credentials add <client_id> --file {path}`",
              file=out)
        return 0
    for cid in creds.ids():
        print(cid, file=out)
    return 0


def _remove(args: argparse.Namespace, out) -> int:
    path = Path(args.file).resolve()
    creds = Credentials.load(path)
    creds.remove(args.client_id)
    creds.save(path)
    print(f"removed client {args.client_id!r} from {path}; its secret no longer works (a connected site keeps "
          "its connection until it leaves)", file=out)
    return 0


def main(argv: list[str], out=None) -> int:
    """``fedplug credentials ...``: 0 on success, 2 with a one-line error otherwise."""
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    try:
        return {"add": _add, "list": _list, "remove": _remove}[args.action](args, out)
    except CredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
