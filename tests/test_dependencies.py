"""What mailer/ imports: declared in pyproject.toml, and between folders only downwards (README, Layout)."""

from __future__ import annotations

import itertools
import re
import sys
import tokenize
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    """The dotted names of every absolute import in one module (`from a.b import c` gives a.b.c and a.b).

    Read with `tokenize`, not `ast`: CPython 3.11's ast module now and then raises "AST
    constructor recursion depth mismatch" (gh-106905; seen in a fresh-clone run of this test),
    and a pattern over the text would also match prose in docstrings.
    """
    found: set[str] = set()
    with path.open("rb") as source:
        tokens = [t for t in tokenize.tokenize(source.readline) if t.type not in _SKIPPED]
    for at, (before, keyword) in enumerate(itertools.pairwise(tokens)):
        at_line_start = before.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
        if at_line_start and keyword.string in ("import", "from"):
            found |= _statement_imports(keyword.string, tokens[at + 2 :])
    return found


def _statement_imports(keyword: str, rest: list[tokenize.TokenInfo]) -> set[str]:
    """The names one import statement brings in; `rest` starts after its keyword."""
    words: list[str] = []
    for token in rest:
        if token.type == tokenize.NEWLINE:
            break
        words.append(token.string)
    statement = re.sub(r"\s*\.\s*", ".", " ".join(words))
    if keyword == "import":  # import a.b, c as d
        return {item.split()[0] for item in statement.split(",")}
    module, _, names = statement.partition(" import ")
    if module.startswith("."):
        return set()  # mailer imports absolutely; a relative import would need its own rule
    items = [item.split() for item in re.sub(r"[()]", " ", names).split(",")]
    return {module} | {f"{module}.{item[0]}" for item in items if item}


def imported_top_level_modules() -> set[str]:
    """Top-level names of every absolute import in mailer/."""
    return {name.split(".")[0] for path in (ROOT / "mailer").rglob("*.py") for name in imports_of(path)}


_SKIPPED = {tokenize.NL, tokenize.COMMENT}


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


# The layers of mailer/, top to bottom (README, Layout). A module may import from its own
# folder and from any layer below its own, never from one above or beside it. The entry
# points wire everything together; the base modules are the vocabulary every layer shares.
ENTRY_POINTS = {"mailer.__main__", "mailer.cli", "mailer.worker", "mailer.jobs"}
LAYERS: list[set[str]] = [
    {"mailer.web"},  # the HTTP boundary: intake and ops over HTTP
    {"mailer.ops"},
    {"mailer.intake", "mailer.delivery"},  # the two ends of the flow; neither knows the other
    {"mailer.content"},
    {"mailer.lifecycle"},
    {"mailer.state"},
]
BASE = {
    "mailer.settings",
    "mailer.errors",
    "mailer.clock",
    "mailer.constants",
    "mailer.durations",
    "mailer.events",
}


def unit_of(module: str) -> str:
    """The folder package or top-level module a dotted mailer name belongs to."""
    parts = module.split(".")
    return ".".join(parts[:2])


def rank(unit: str) -> float:
    """Lower is higher up; base modules rank below every layer."""
    if unit in ENTRY_POINTS:
        return -1
    for position, layer in enumerate(LAYERS):
        if unit in layer:
            return position
    if unit in BASE:
        return len(LAYERS)
    raise AssertionError(f"{unit} has no place in LAYERS; add it where it belongs (and to the README)")


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_violations() -> list[str]:
    """Every import in mailer/ that runs up the layers or sideways between two folders."""
    found = []
    for path in sorted((ROOT / "mailer").rglob("*.py")):
        importer = unit_of(module_name(path))
        names = imports_of(path)
        for imported in sorted(names):
            if not imported.startswith("mailer.") or imported == "mailer":
                continue
            target = unit_of(imported)
            if target == importer or target == "mailer" or importer == "mailer":
                continue
            if imported.rpartition(".")[0] in names and imported.rpartition(".")[0] != "mailer":
                continue  # `from a.b import c`: a.b is reported, not each name
            if importer in BASE and target in BASE:
                continue
            if rank(target) <= rank(importer) and importer not in ENTRY_POINTS:
                found.append(f"{module_name(path)} imports {imported}")
    return found


def test_every_module_has_a_layer() -> None:
    """A new folder or top-level module must be given its place in the layers first."""
    for path in (ROOT / "mailer").rglob("*.py"):
        unit = unit_of(module_name(path))
        if unit != "mailer":
            rank(unit)


def test_imports_run_down_the_layers_only() -> None:
    """intake and delivery use content, lifecycle and state; nothing imports a layer above it
    or the folder beside it, and the base modules import only each other."""
    assert import_violations() == []


def test_an_import_up_the_layers_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check reads real import statements: a state module importing the sender is caught."""
    module = ROOT / "mailer" / "state" / "_layer_probe.py"
    module.write_text("from mailer.delivery.sender import Sender\n")
    try:
        assert import_violations() == ["mailer.state._layer_probe imports mailer.delivery.sender"]
    finally:
        module.unlink()
