"""pyproject.toml declares what mailer/ imports: nothing arrives only as someone else's dependency."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_top_level_modules() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "mailer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = (re.match(r"[A-Za-z0-9._-]+", spec) for spec in project["dependencies"])
    return {canonical(m.group(0)) for m in names if m}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_of_mailer_is_a_declared_dependency() -> None:
    """Each module mailer/ imports is the standard library, mailer itself, or comes from a
    distribution listed in [project] dependencies."""
    third_party = imported_top_level_modules() - set(sys.stdlib_module_names) - {"mailer"}
    providers = packages_distributions()
    declared = declared_distributions()
    undeclared = {
        module: providers.get(module, ["(not installed)"])
        for module in sorted(third_party)
        if not {canonical(d) for d in providers.get(module, [])} & declared
    }
    assert not undeclared, f"imported by mailer/ but not declared in pyproject.toml: {undeclared}"
