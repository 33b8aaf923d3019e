"""The README describes the real configuration: every setting has a row in its table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sds.config import SECRET_ENV, SECRET_FILE_ENV, SETTINGS, Config, Setting

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULTS = {field.name: field.default for field in dataclasses.fields(Config)}


def configuration_rows() -> list[str]:
    """The table rows of the README's "Configuration" section."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Configuration\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return [line for line in section.splitlines() if line.startswith("| `--")]


def default_text(value: object) -> str:
    """How the README table writes a default."""
    if value is None:
        return "none"
    if value == ():
        return "any"
    if isinstance(value, tuple):
        return ", ".join(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@pytest.mark.parametrize("setting", SETTINGS, ids=[setting.name for setting in SETTINGS])
def test_every_setting_is_in_the_readme_table(setting: Setting) -> None:
    rows = [row for row in configuration_rows() if row.split("`")[1].split()[0] == setting.option]
    assert len(rows) == 1, f"{setting.option} needs exactly one row in the README table"
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    for name in setting.env:
        assert f"`{name}`" in cells[1]
    assert f"`{default_text(DEFAULTS[setting.name])}`" in cells[2]


def test_readme_table_has_no_unknown_options() -> None:
    known = {setting.option for setting in SETTINGS} | {"--jwt-secret-file"}
    documented = {row.split("`")[1].split()[0] for row in configuration_rows()}
    assert documented == known


def test_secret_sources_are_documented() -> None:
    row = next(row for row in configuration_rows() if row.startswith("| `--jwt-secret-file"))
    assert f"`{SECRET_ENV}`" in row
    assert f"`{SECRET_FILE_ENV}`" in row


def test_quick_start_comes_first() -> None:
    text = README.read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Quick start", "## Configuration"]
    for heading in ("## Endpoints", "## CLI", "## Python API", "## Design choices"):
        assert heading in headings
