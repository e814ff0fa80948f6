"""The import arrows: ``docs/architecture.md``'s module table against the code.

The table is the record other developers read; this keeps it true. A module may import
only the ``forwarder`` modules its row lists, every module has a row, the rows form no
cycle, and a module marked pure imports nothing that does I/O.
"""

from __future__ import annotations

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "forwarder"
TABLE = ROOT / "docs" / "architecture.md"

ROW_RE = re.compile(r"^\| `forwarder/(\w+)\.py` \|[^|]*\| *(pure)? *\|([^|]*)\|\s*$")
NAME_RE = re.compile(r"`(\w+)`")
ALWAYS_ALLOWED = {"__init__"}  # the version; __init__.py imports nothing

# What a pure module must not import: the network, processes, the event loop, and the
# libraries that exist to do I/O (metrics exposition, log output).
IO_MODULES = {
    "asyncio",
    "http",
    "nats",
    "nkeys",
    "prometheus_client",
    "socket",
    "ssl",
    "structlog",
    "subprocess",
    "urllib",
    "uvloop",
}


def table() -> dict[str, tuple[bool, set[str]]]:
    """module -> (pure, the forwarder modules it may import), from the document."""
    rows: dict[str, tuple[bool, set[str]]] = {}
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        m = ROW_RE.match(line)
        if m is not None:
            name, pure, allowed = m.groups()
            assert name not in rows, f"{name} has two rows"
            rows[name] = (pure is not None, set(NAME_RE.findall(allowed)))
    return rows


def imports(module: str) -> tuple[set[str], set[str]]:
    """(the forwarder modules, the other top-level packages) that ``module`` imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    own: set[str] = set()
    other: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level > 0 or (node.module or "").split(".")[0] == "forwarder":
                base = (node.module or "").removeprefix("forwarder").lstrip(".")
                # ``from . import x`` and ``from .x import y`` both name a module of ours
                own |= {base.split(".")[0]} if base else {alias.name for alias in node.names}
            else:
                other.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "forwarder":
                    own.add(alias.name.split(".")[1] if "." in alias.name else "__init__")
                else:
                    other.add(top)
    # ``from . import __version__`` names an attribute of the package itself
    own = {"__init__" if name == "__version__" else name for name in own}
    return own - {module}, other


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_the_table_has_a_row_for_every_module_and_no_other() -> None:
    rows = table()
    assert len(rows) > 20, "the table was not found or not parsed"
    assert sorted(rows) == MODULES


def test_the_table_names_only_modules_that_exist() -> None:
    unknown = {f"{m}: {sorted(a - set(MODULES))}" for m, (_, a) in table().items() if a - set(MODULES)}
    assert not unknown


def test_the_arrows_in_the_table_point_one_way() -> None:
    graph = {module: allowed for module, (_, allowed) in table().items()}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"the table has a cycle: {exc.args[1]}", pytrace=False)


@pytest.mark.parametrize("module", MODULES)
def test_a_module_imports_only_what_its_row_allows(module: str) -> None:
    _, allowed = table()[module]
    own, _ = imports(module)
    assert own - allowed - ALWAYS_ALLOWED == set(), f"forwarder/{module}.py imports beyond its row"


@pytest.mark.parametrize("module", [m for m, (pure, _) in table().items() if pure])
def test_a_pure_module_does_no_io(module: str) -> None:
    _, other = imports(module)
    assert other & IO_MODULES == set()


def test_the_import_reader_sees_relative_absolute_and_package_imports() -> None:
    """The reader itself, on modules whose imports are known: it must be able to fail."""
    assert {"cluster", "pipeline", "source"} <= imports("acking")[0]
    assert imports("metrics")[0] >= {"__init__", "stats"}
    assert "nats" in imports("cluster")[1]
    assert imports("hashring")[0] == set()
