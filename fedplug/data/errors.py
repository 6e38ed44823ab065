"""The one error every data loader raises for bad input.

A missing folder, a split file that is not there, unreadable XML/JSON, a class
name the run does not know: each is reported as a :class:`DatasetError` whose
message names the path and says what was expected, so the run stops at
start-up with something a user can act on instead of a traceback deep inside
a ``DataLoader`` worker.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset is missing, malformed or does not match the configuration."""
