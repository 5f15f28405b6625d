"""pyproject.toml declares what mailer/ imports: nothing arrives only as someone else's dependency."""

from __future__ import annotations

import re
import sys
import tokenize
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_top_level_modules() -> set[str]:
    """Top-level names of every absolute import in mailer/.

    Read with `tokenize`, not `ast`: CPython 3.11's ast module now and then raises "AST
    constructor recursion depth mismatch" (gh-106905; seen in a fresh-clone run of this test),
    and a pattern over the text would also match prose in docstrings.
    """
    found: set[str] = set()
    for path in (ROOT / "mailer").rglob("*.py"):
        with path.open("rb") as source:
            tokens = [t for t in tokenize.tokenize(source.readline) if t.type not in _SKIPPED]
        for before, keyword, name in zip(tokens, tokens[1:], tokens[2:], strict=False):
            at_line_start = before.type in (
                tokenize.NEWLINE,
                tokenize.INDENT,
                tokenize.DEDENT,
                tokenize.ENCODING,
            )
            if at_line_start and keyword.string in ("import", "from") and name.type == tokenize.NAME:
                found.add(name.string)
                if keyword.string == "import":  # import a, b
                    found |= _more_names(tokens, tokens.index(name))
    return found


_SKIPPED = {tokenize.NL, tokenize.COMMENT}


def _more_names(tokens: list[tokenize.TokenInfo], at: int) -> set[str]:
    names: set[str] = set()
    for token in tokens[at + 1 :]:
        if token.type == tokenize.NEWLINE:
            break
        if token.type == tokenize.NAME and tokens[tokens.index(token) - 1].string == ",":
            names.add(token.string)
    return names


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
