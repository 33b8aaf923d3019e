"""The storage seam: only the backends (and SQLite file maintenance) know a concrete backend."""

from __future__ import annotations

import ast
from pathlib import Path

import sds

PACKAGE = Path(sds.__file__).parent
CONCRETE = ("sds.backends.sqlite", "sds.backends.postgres")
MAY_IMPORT_SQLITE = {
    "maintenance.py",
    "backup.py",
    "ownership.py",
    "pg_ownership.py",
    "cluster.py",
}
"""Maintenance and backup work on SQLite store files on disk (as does the CLI, in sds/cli);
ownership uses the lock records (on one machine, the lock files' flock), which cluster
status reads."""


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_module_outside_the_backends_imports_a_concrete_backend() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "backends":
            continue
        allowed = (
            {"sds.backends.sqlite"}
            if (relative.parts[0] == "cli" or str(relative) in MAY_IMPORT_SQLITE)
            else set()
        )
        for name in imported_modules(path):
            if any(name.startswith(c) for c in CONCRETE) and not any(
                name.startswith(a) for a in allowed
            ):
                offenders.append(f"{relative}: {name}")
    assert offenders == []


def test_the_serving_path_uses_only_the_storage_interface() -> None:
    for name in (
        "relay.py",
        "ws_handler.py",
        "value_answers.py",
        "admin_api.py",
        "app.py",
        "health.py",
        "metrics.py",
        "connections.py",
    ):
        imported = imported_modules(PACKAGE / name)
        assert not {n for n in imported if n.startswith(CONCRETE)}, name
        assert "sds.storage" not in imported, name
