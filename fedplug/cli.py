"""``fedplug <subcommand>``: the commands that are not a Hydra run.

``fedplug`` with no subcommand (or with Hydra overrides) composes a run; a
first argument named here runs that command instead.  Each entry is
``"module:function"``, imported only when used, so a command's optional
dependencies cost nothing to the others.  The function takes the remaining
arguments and returns the exit status.
"""

from __future__ import annotations

import importlib
from typing import Callable

SUBCOMMANDS: dict[str, str] = {
    "plugins": "fedplug.app:plugins_command",
    "report": "fedplug.report:report_command",
    "compare": "fedplug.compare:compare_command",
    "credentials": "fedplug.credentials_cli:main",
}


def find(args: list[str]) -> Callable[[list[str]], int] | None:
    """The subcommand named by ``args[0]``, or None when ``args`` are a Hydra run's overrides."""
    if not args or args[0] not in SUBCOMMANDS:
        return None
    module, _, function = SUBCOMMANDS[args[0]].partition(":")
    return getattr(importlib.import_module(module), function)
