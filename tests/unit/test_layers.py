"""The layer table, enforced: every import in `src/matchlock` against the allowed edges.

The scan reads every `import` and `from ... import` anywhere in a module (including lazy
imports inside functions and `TYPE_CHECKING` blocks), resolves relative imports, and treats
a string naming one of our modules as an import where it is used as one (`string_imports`).
A package may always import itself and stdlib/third-party libraries; the table lists what
else it may import. `docs/architecture.md` must show the same table.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "src" / "matchlock"
ARCHITECTURE_DOC = REPO / "docs" / "architecture.md"

# package -> the packages of ours it may import (the team's layer table, as data).
LAYERS: dict[str, frozenset[str]] = {
    "api": frozenset(),
    "util": frozenset({"api"}),
    "wire": frozenset(),  # runs in the guest: stdlib only
    "guest": frozenset({"wire"}),  # runs in the guest: stdlib only
    "jsonrpc": frozenset(),
    "policy": frozenset({"api"}),
    "vm": frozenset({"api", "util", "wire"}),
    "kernel": frozenset({"api", "util", "wire"}),
    "image": frozenset({"api", "util"}),
    "net": frozenset({"api", "util", "policy"}),
    "state": frozenset({"api", "util"}),
    "vfs": frozenset({"api", "util", "wire"}),
    "sandbox": frozenset({"api", "util", "wire", "vm", "kernel", "image", "net", "policy", "state", "vfs"}),
    "rpc": frozenset({"api", "util", "jsonrpc", "sandbox", "state", "image", "wire"}),
    "sdk": frozenset({"api", "jsonrpc"}),
    "build": frozenset({"api", "util", "wire", "image", "sandbox", "state", "policy"}),
    "cli": frozenset({"api", "util", "wire", "sandbox", "state", "image", "kernel", "vm", "rpc", "build"}),
}
# Top-level modules of the `matchlock` package itself. `__init__` may import these only lazily.
TOP_LEVEL: dict[str, frozenset[str]] = {
    "__init__": frozenset({"sdk", "api"}),  # the SDK's public names, resolved on first use
    "__main__": frozenset({"cli"}),
    # The published SDK's module paths (`from matchlock.client import Client`), re-exporting `sdk`.
    "builder": frozenset({"sdk"}),
    "client": frozenset({"sdk"}),
    "types": frozenset({"sdk"}),
}


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # dotted module name, e.g. "matchlock.vm.machine"
    eager: bool = True  # runs when the module is imported (not in a function or `if TYPE_CHECKING:`)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str, root: Path) -> bool:
    base = root.joinpath(*dotted.split(".")[1:])
    return base.with_suffix(".py").is_file() or base.is_dir()


def root_attributes(root: Path) -> set[str]:
    """Names bound by assignment or definition at the top level of `matchlock/__init__.py`.

    Names that a lazy module `__getattr__` resolves are not among them: importing one loads another layer.
    """
    names: set[str] = set()
    for node in ast.parse((root / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name != "__getattr__":
            names.add(node.name)
    return names


def imports_of(source: str, module: str, is_package: bool, root: Path) -> list[Import]:
    """Every reference from `module` to a module of ours (`matchlock` or below)."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    eager = {id(node) for node in _eager_statements(tree.body)}
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, alias.name, id(node) in eager) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level > len(parts):
                    raise AssertionError(f"{module}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(parts[: len(parts) - node.level + 1])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            for alias in node.names:
                # `from pkg import name` imports the submodule `pkg.name` when one exists; from the
                # root package, a plain attribute is recorded by name and checked against __init__.py.
                candidate = f"{origin}.{alias.name}"
                keep = origin == "matchlock" or is_module(candidate, root)
                found.append(Import(node.lineno, candidate if keep else origin, id(node) in eager))
    for node in string_imports(tree):
        if re.fullmatch(r"matchlock(\.\w+)+", node.value) and is_module(node.value, root):
            found.append(Import(node.lineno, node.value))
    return [imp for imp in found if imp.target == "matchlock" or imp.target.startswith("matchlock.")]


# Calls whose first argument is the name of a module they import.
IMPORT_CALLS = frozenset({"import_module", "__import__", "run_module"})


def _called(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def string_imports(tree: ast.Module) -> list[ast.Constant]:
    """The string constants of `tree` that are used as module names.

    That is the literal first argument of an import call (`importlib.import_module("matchlock.x")`,
    `__import__`, `runpy.run_module`) and the string after `"-m"` in a list or tuple (an argv that
    runs `python -m matchlock.x`). An import call whose argument is computed (cli/main.py reads its
    lazy command table) could import any module the file spells, so there every string counts.
    Elsewhere a string that merely spells a module (the VFS port is named `matchlock.vfs`, loggers
    are named after packages) is data.
    """
    used: dict[int, ast.Constant] = {}
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called(node.func) in IMPORT_CALLS and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                used[id(first)] = first
            else:
                dynamic = True
        elif isinstance(node, ast.List | ast.Tuple):
            for flag, value in zip(node.elts, node.elts[1:]):
                if isinstance(flag, ast.Constant) and flag.value == "-m" and isinstance(value, ast.Constant):
                    used[id(value)] = value
    if dynamic:
        used.update((id(node), node) for node in ast.walk(tree) if isinstance(node, ast.Constant))
    return [node for node in used.values() if isinstance(node.value, str)]


def _is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _eager_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements that run at import time: not inside functions or `if TYPE_CHECKING:` blocks."""
    found: list[ast.stmt] = []
    for node in body:
        found.append(node)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            found.extend(_eager_statements(node.orelse))
            continue
        for field in ("body", "orelse", "finalbody"):
            found.extend(_eager_statements(getattr(node, field, [])))
        for handler in getattr(node, "handlers", []):
            found.extend(_eager_statements(handler.body))
    return found


def layer_of(module: str) -> str:
    """`matchlock.vm.machine` -> `vm`; top-level modules keep their file name (`__init__`)."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def describe(allowed: frozenset[str]) -> str:
    return ", ".join(sorted(allowed)) if allowed else "nothing of ours (stdlib only)"


def violations(root: Path) -> list[str]:
    attributes = root_attributes(root)
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent)
        module = module_name(path, root)
        source_layer = layer_of(module)
        top_level = path.parent == root
        table = TOP_LEVEL if top_level else LAYERS
        if source_layer not in table:
            kind = "top-level module" if top_level else "package"
            problems.append(f"{relative}: {kind} `{source_layer}` has no row in the layer table")
            continue
        allowed = table[source_layer]
        source = path.read_text()
        for imp in imports_of(source, module, path.name == "__init__.py", root):
            if imp.target == "matchlock":
                continue  # the root package is loaded before any of its modules anyway
            target_layer = imp.target.split(".")[1]
            if not is_module(f"matchlock.{target_layer}", root):
                if target_layer not in attributes:
                    problems.append(
                        f"{relative}:{imp.line} imports {imp.target}, which is not a plain attribute of "
                        "matchlock/__init__.py (a lazy one loads another layer); import it from its own module"
                    )
                continue  # e.g. `from matchlock import __version__`
            if not top_level and target_layer == source_layer:
                continue
            if source_layer == "__init__" and imp.eager and target_layer in allowed:
                problems.append(
                    f"{relative}:{imp.line} imports {imp.target} at import time, but every module of the package "
                    "(the guest's too) loads matchlock/__init__.py: import it inside a function"
                )
                continue
            if target_layer not in allowed:
                problems.append(
                    f"{relative}:{imp.line} imports {imp.target}, but layer {source_layer} may import only "
                    f"{describe(allowed)}"
                )
    return problems


def test_every_import_follows_the_layer_table():
    problems = violations(ROOT)
    assert not problems, "layer table violations:\n  " + "\n  ".join(problems)


def _tree(tmp_path: Path, files: dict[str, str], init: str = '__version__ = "0"\n') -> Path:
    root = tmp_path / "matchlock"
    for name, text in {"__init__.py": init, **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"vm/__init__.py": "", "vm/x.py": "def f():\n    from ..image import store\n", "image/store.py": ""},
            "matchlock/vm/x.py:2 imports matchlock.image.store, but layer vm may import only api, util, wire",
        ),
        (
            {"wire/__init__.py": "", "wire/a.py": "import matchlock.api.errors\n", "api/errors.py": ""},
            "matchlock/wire/a.py:1 imports matchlock.api.errors, but layer wire may import only nothing of ours",
        ),
        (
            {"api/__init__.py": "from .. import debian\n", "debian.py": ""},
            "matchlock/debian.py: top-level module `debian` has no row in the layer table",
        ),
        (
            {"api/__init__.py": "from .. import debian\n", "debian.py": ""},
            "matchlock/api/__init__.py:1 imports matchlock.debian, but layer api may import only nothing of ours",
        ),
        (
            {
                "cli/m.py": 'import importlib\nTABLE = {"x": "matchlock.sdk.client"}\n'
                "def load(name):\n    return importlib.import_module(TABLE[name])\n",
                "sdk/client.py": "",
            },
            "matchlock/cli/m.py:2 imports matchlock.sdk.client, but layer cli may import only api, build, image",
        ),
        (
            {
                "vm/x.py": 'import importlib\nstore = importlib.import_module("matchlock.image.store")\n',
                "image/store.py": "",
            },  # fmt: skip
            "matchlock/vm/x.py:2 imports matchlock.image.store, but layer vm may import only api, util, wire",
        ),
        (
            {"wire/x.py": 'ARGV = ("python3", "-m", "matchlock.vfs.server")\n', "vfs/server.py": ""},
            "matchlock/wire/x.py:1 imports matchlock.vfs.server, but layer wire may import only nothing of ours",
        ),
        (
            {"__init__.py": "from .sdk import Client\n", "sdk/__init__.py": ""},
            "matchlock/__init__.py:1 imports matchlock.sdk at import time",
        ),
        (
            {"image/a.py": "from matchlock.state import db\n", "state/db.py": ""},
            "matchlock/image/a.py:1 imports matchlock.state.db, but layer image may import only api, util",
        ),
    ],
)
def test_the_scan_catches_violations(tmp_path, files, expected):
    problems = violations(_tree(tmp_path, files))
    assert any(p.startswith(expected) for p in problems), problems


def test_the_scan_accepts_allowed_edges(tmp_path):
    root = _tree(
        tmp_path,
        {
            "__main__.py": "from .cli.main import main\n",
            "cli/main.py": "from .. import __version__\nfrom ..api import errors\nfrom . import run\n",
            "cli/run.py": "def f():\n    from matchlock.sandbox.sandbox import Sandbox\n",
            "api/errors.py": "import os\n",
            "sandbox/sandbox.py": "from ..util.fs import lock\n",
            "util/fs.py": "",
            "sdk/__init__.py": "",
        },
        init=(
            "from typing import TYPE_CHECKING\n__version__ = '0'\nif TYPE_CHECKING:\n    from .sdk import Client\n"
            "def __getattr__(name):\n    from . import sdk\n    return getattr(sdk, name)\n"
        ),
    )
    assert violations(root) == []


def test_a_string_that_only_spells_a_module_is_not_an_import(tmp_path):
    # The guest-side contract names its VFS port after the package; wire may import nothing of ours.
    root = _tree(
        tmp_path,
        {
            "wire/boot.py": 'VFS_PORT_NAME = "matchlock.vfs"\nPORTS = {"vfs": "matchlock.vfs"}\n',
            "vm/x.py": 'import logging\nLOG = logging.getLogger("matchlock.sandbox")\n',
            "vfs/__init__.py": "",
            "sandbox/__init__.py": "",
        },
    )
    assert violations(root) == []


# One row of the doc's table: "| `vm` | what it does | `api`, `util`, `wire` |".
ROW = re.compile(r"^\|\s*`(\w+)`\s*\|[^|]*\|([^|]*)\|\s*$")


def documented_layers(text: str) -> dict[str, frozenset[str]]:
    """The rows of every Markdown table in `text` that has an `api` row (the layer table)."""
    tables: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip().startswith("|"):
            tables[-1].append(line.strip())
        elif tables[-1]:
            tables.append([])
    documented: dict[str, frozenset[str]] = {}
    for table in tables:
        rows = [m for m in map(ROW.match, table) if m]
        if not any(m.group(1) == "api" for m in rows):
            continue
        for match in rows:
            name, cell = match.group(1), match.group(2).strip()
            if cell.lower().startswith(("stdlib", "nothing")):
                documented[name] = frozenset()
            elif re.sub(r"`\w+`|[,\s]", "", cell):
                raise AssertionError(f"docs/architecture.md: cannot read the allowed imports of `{name}`: {cell!r}")
            else:
                documented[name] = frozenset(re.findall(r"`(\w+)`", cell))
    return documented


def test_architecture_doc_shows_the_same_table():
    assert ARCHITECTURE_DOC.is_file(), f"{ARCHITECTURE_DOC} is missing: it must show the layer table"
    documented = documented_layers(ARCHITECTURE_DOC.read_text())
    differences = [
        f"`{name}`: docs say {describe(documented.get(name, frozenset())) if name in documented else 'no row'}, "
        f"the enforced table says {describe(LAYERS[name]) if name in LAYERS else 'no row'}"
        for name in sorted(set(documented) | set(LAYERS))
        if documented.get(name) != LAYERS.get(name)
    ]
    assert not differences, "docs/architecture.md and tests/unit/test_layers.py disagree:\n  " + "\n  ".join(
        differences
    )


def test_doc_rows_are_read_exactly():
    layer_table = "| `api` | types | nothing of ours |\n| `vm` | QEMU | `api`, `util`, `wire` |\n| `wire` | codecs | stdlib only |"
    other_table = "| `MATCHLOCK_STATE_DIR` | state | `~/.matchlock` |"
    documented = documented_layers(f"{layer_table}\n\ntext\n\n{other_table}\n")
    assert documented == {"api": frozenset(), "vm": frozenset({"api", "util", "wire"}), "wire": frozenset()}
