"""docs/plugins.md documents every hook of fedplug/hooks.py, with its exact parameters.

A hook added to (or a parameter renamed in) the spec module fails this test until
the guide is updated.
"""

import inspect
import re
from pathlib import Path

import pytest

from fedplug import hooks, plugins, testing

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
SPECS = sorted(name for name, obj in vars(hooks).items() if name.startswith("fedplug_") and inspect.isfunction(obj))


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.exists(), f"{DOC} is missing"
    return DOC.read_text(encoding="utf-8")


def test_hook_specs_are_found():
    # The test below is only as good as this list: it must hold every role's hooks.
    assert {"fedplug_aggregate", "fedplug_build_model", "fedplug_select_clients", "fedplug_run_end"} <= set(SPECS)
    assert len(SPECS) >= 13


@pytest.mark.parametrize("name", SPECS)
def test_every_hook_has_a_section_and_its_signature(doc, name):
    assert re.search(rf"^#+ `{name}`\s*$", doc, re.MULTILINE), f"docs/plugins.md has no heading for {name}"
    signatures = re.findall(rf"\b{name}\(([^)]*)\)", doc)
    assert signatures, f"docs/plugins.md does not show the signature {name}(...)"
    expected = list(inspect.signature(getattr(hooks, name)).parameters)
    shown = [[p.strip().split(":")[0].split("=")[0].strip() for p in sig.split(",") if p.strip()] for sig in signatures]
    assert expected in shown, f"{name}: the spec's parameters are {expected}; docs/plugins.md shows {shown}"


def test_entry_point_groups_and_suites_are_documented(doc):
    for group in [*plugins.ROLE_GROUPS.values(), "fedplug.conf"]:
        assert f"`{group}`" in doc, f"entry-point group {group} is not documented"
    for suite in testing.__all__:
        assert suite in doc, f"fedplug.testing.{suite} is not documented"
    for topic in ("plugins.disable", "# @package _global_", "fedplug.testing.plugin", "EmptyRoundError"):
        assert topic in doc, f"{topic} is not documented"


@pytest.mark.parametrize("topic", [
    # RoundRecord.per_client's shape and keys
    "`record.per_client`", "`train_size`", "`test_size`",
    # unknown round-settings keys
    "settings.extra",
    # when fedplug_aggregate starts
    "before any update has arrived",
    # the label convention of one-stage detectors
    "num_classes=K + 1", "labels\"] + 1",
    # logging, public API, test helpers, the values hooks exchange
    'logging.getLogger("fedplug.', "fedplug_plugins.detectors.engine", "register_object", "`ResourceDecision`",
    # the search path and config-file checks
    "SearchPathPlugin", "test_config_file_composes",
])
def test_plugin_author_topics_are_documented(doc, topic):
    assert topic in doc, f"docs/plugins.md does not mention {topic!r}"


def test_aggregate_docstring_says_when_it_starts():
    text = inspect.getdoc(hooks.fedplug_aggregate)
    assert "first update has been accepted" not in text  # the server starts it before any update
    assert "request_update" in text and "before" in text
