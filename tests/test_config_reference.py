"""docs/configuration.md against the settings model it is generated from."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate_config_reference.py"
REFERENCE = ROOT / "docs" / "configuration.md"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_config_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return load_generator()


def all_keys() -> list[str]:
    return [
        f"{section}.{item.name}"
        for section, cls in config.SECTIONS.items()
        for item in dataclasses.fields(cls)
    ]


def test_reference_is_current():
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    committed = REFERENCE.read_text(encoding="utf-8")
    assert result.stdout == committed, (
        "docs/configuration.md is out of date; run: .venv/bin/python "
        "scripts/generate_config_reference.py > docs/configuration.md"
    )


def test_reference_lists_every_key(generator):
    keys = [row["key"] for row in generator.reference_rows()]
    assert keys == all_keys()


def test_every_key_has_meaning(generator):
    missing = [row["key"] for row in generator.reference_rows() if not row["meaning"]]
    assert not missing, (
        "add a comment above these fields in gateway/config.py, or an entry "
        f"in HELP in scripts/generate_config_reference.py: {missing}"
    )


def test_help_names_existing_keys(generator):
    stale = set(generator.HELP) - set(all_keys())
    assert not stale


def test_types_are_named(generator):
    for row in generator.reference_rows():
        assert row["type"] in generator.TYPE_NAMES.values(), row["key"]


def test_listed_variables_are_accepted(generator, tmp_path):
    """Every variable in the reference is one that load_settings reads."""
    for row in generator.reference_rows():
        if row["variable"] == "config file only":
            continue
        section, key = row["key"].split(".", 1)
        default = getattr(config.SECTIONS[section](), key)
        if isinstance(default, bool):
            text = str(default).lower()
        elif isinstance(default, tuple):
            text = ",".join(default)
        else:
            text = str(default)
        for name in row["variable"].replace("`", "").split(", "):
            environ = {"HOME": str(tmp_path), name: text}
            settings = config.load_settings(environ=environ)
            assert getattr(getattr(settings, section), key) is not None, name


def test_file_only_keys_rejected_as_variables(generator, tmp_path):
    """Keys marked "config file only" cannot be set from the environment."""
    for row in generator.reference_rows():
        if row["variable"] != "config file only":
            continue
        section, key = row["key"].split(".", 1)
        name = f"MISSKEY_GATEWAY_{section.upper()}_{key.upper()}"
        environ = {"HOME": str(tmp_path), name: "x"}
        with pytest.raises(config.ConfigError):
            config.load_settings(environ=environ)
