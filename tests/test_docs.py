"""The docs match the code: wire format, settings table, .env.example, Makefile commands."""

from __future__ import annotations

import re

import pytest
from bales_producer import KeySpace, wire

from bales_stream.settings import Settings

from .conftest import ROOT

pytestmark = pytest.mark.unit  # no redis-server: the unit tier (make test-unit)

WIRE_DOC = (ROOT / "docs" / "wire-format.md").read_text()
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
ENV_EXAMPLE = (ROOT / ".env.example").read_text()


def test_every_wire_field_and_code_is_documented() -> None:
    fields = [v for k, v in vars(wire).items() if k.startswith("FIELD_")]
    assert len(fields) == 9
    for name in [*fields, *wire.ERROR_CODES, *wire.ENCODINGS, *wire.REPLY_ENCODINGS]:
        assert f"`{name}`" in WIRE_DOC, name


def test_documented_keys_match_the_key_space() -> None:
    keys = KeySpace()
    documented = [
        *keys.streams,
        keys.dead_letter,
        keys.reply("<request_id>"),
        keys.inbox("<name>"),
        keys.desired_models,
        keys.control_channel,
    ]
    for key in documented:
        assert f"`{key}`" in WIRE_DOC or key in WIRE_DOC, key


def settings_rows(text: str) -> set[str]:
    return set(re.findall(r"^\| `([A-Z_]+)` \|", text, flags=re.MULTILINE))


def test_every_setting_is_in_the_configuration_table_and_env_example() -> None:
    names = {name.upper() for name in Settings.model_fields}
    assert settings_rows(CONFIGURATION) == names
    assert settings_rows(README) < names  # the README shows the ones used most
    for name in names:
        assert re.search(rf"^#? ?{name}=", ENV_EXAMPLE, flags=re.MULTILINE), name


def test_documented_defaults_match_the_code(monkeypatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    defaults = Settings().public_view()
    for name, value in defaults.items():
        if name in {"consumer_name", "sidecar_token", "weights_dir"}:
            continue
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        cell = f"`{shown}`" if shown else "(empty)"
        assert f"| `{name.upper()}` | {cell} |" in CONFIGURATION, name
        if name.upper() in settings_rows(README):
            assert f"| `{name.upper()}` | {cell} |" in README, name


def test_the_two_readme_commands_exist_in_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "make run" in README and "make test" in README
    assert re.search(r"^run:", makefile, flags=re.MULTILINE)
    assert re.search(r"^test:", makefile, flags=re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
