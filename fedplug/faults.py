"""Fault points: named instants where a test can make this process die, exactly there.

``FEDPLUG_FAULT_POINT=<where>:<step>[@<round>]`` in the environment of a
fedplug process makes it SIGKILL itself when the code reaches
``fault_point(<where>, <step>, round_number)`` — with ``@<round>`` only in
that round, else the first time.  SIGKILL, not an exception: nothing is
flushed, no ``finally`` runs, just as when an operator's ``kill -9``, the
OOM killer or a power cut ends the server.  Used by the fault-injection tests
(``tests/test_faults_*.py``) to kill the server inside its checkpoint writes,
where a kill from outside could only land by luck.

The steps of a round's commit are listed in :data:`fedplug.commit.COMMIT_STEPS`.
Unset (always, outside tests) the check is one dictionary lookup per step.
"""

from __future__ import annotations

import os
import signal

ENV = "FEDPLUG_FAULT_POINT"


def parse(spec: str) -> tuple[str, int | None]:
    """``"commit:manifest.renamed@2"`` -> ``("commit:manifest.renamed", 2)``; raises ValueError on a bad round."""
    point, _, rnd = spec.strip().partition("@")
    if rnd and not rnd.isdigit():
        raise ValueError(f"{ENV}={spec!r}: the part after @ must be a round number, e.g. commit:manifest.renamed@2")
    return point, (int(rnd) if rnd else None)


def fault_point(where: str, step: str, round_number: int | None = None) -> None:
    """SIGKILL this process if ``FEDPLUG_FAULT_POINT`` names ``<where>:<step>`` (and this round)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, rnd = parse(spec)
    if point == f"{where}:{step}" and (rnd is None or rnd == round_number):
        os.kill(os.getpid(), signal.SIGKILL)
