"""Two "hosts" for tests: Linux network namespaces joined by a veth pair, optionally rate-limited.

The server side is ``SERVER_IP`` in one namespace, the client side
``CLIENT_IP`` in the other; traffic crosses only the veth link, where a
``tbf`` qdisc on each end can cap the rate (this kernel has no ``netem``).
Needs root and iproute2; skips the test otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid

import pytest

SERVER_IP, CLIENT_IP = "10.77.0.1", "10.77.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@contextlib.contextmanager
def two_hosts(rate: str | None = None):
    """Yield (server namespace, client namespace); ``rate`` (e.g. "1mbit") caps the link both ways."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    srv, cli = f"fps{tag}", f"fpc{tag}"
    try:
        ip("netns", "add", srv)
        ip("netns", "add", cli)
        ip("link", "add", f"vs{tag}", "type", "veth", "peer", "name", f"vc{tag}")
        ip("link", "set", f"vs{tag}", "netns", srv)
        ip("link", "set", f"vc{tag}", "netns", cli)
        for ns, dev, addr in ((srv, f"vs{tag}", SERVER_IP), (cli, f"vc{tag}", CLIENT_IP)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            if rate:  # egress shaping on each end: the uplink and the downlink
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                "rate", rate, "burst", "32kbit", "latency", "400ms"],
                               check=True, capture_output=True, timeout=20)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        for ns in (srv, cli):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        detail = exc.stderr.decode(errors="replace").strip() if getattr(exc, "stderr", None) else str(exc)
        pytest.skip(f"cannot create rate-limited network namespaces here: {detail}")
    try:
        yield srv, cli
    finally:
        for ns in (srv, cli):  # deleting a namespace also removes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
