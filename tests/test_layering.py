"""The layers import only downwards, and no module imports itself round a circle.

``urls``, ``config`` and the small shared modules < ``node/`` < ``cluster/`` < ``cli``; the
peer contract (``internal_api.py``), the process end (``lifecycle.py``) and where rooms live
(``whereabouts.py``) sit below both the node and the cluster, so that each side can use
them without importing the other; the node is wired to the cluster in exactly one place,
``node/main.py``. ``aws/`` sits below the node and the provisioner, and the provisioner
never needs the node.

Imports are read with ``ast`` from every file, anywhere in it: an import inside a function
closes a circle just the same, only later, when the function first runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("shardchat", "provisioner")


def module_name(path: Path, root: Path = ROOT) -> str:
    """``shardchat/node/http.py`` -> ``shardchat.node.http``; a package is its ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every name ``path`` imports, wherever in the file it does: ``from a.b import c``
    counts as ``a.b`` and ``a.b.c`` (``c`` may be a module); relative imports are resolved
    against the file's own package."""
    tree = ast.parse(path.read_text())
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[:len(package) - (node.level - 1)]
                base = ".".join([*up, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def under(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is one of ``prefixes`` or inside one (``shardchat.node`` is not
    ``shardchat.nodes``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def sources(where: str) -> list[Path]:
    target = ROOT / where
    return [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))


# (files, what they must not import, files exempt)
RULES = [
    ("shardchat/aws", ("shardchat.node", "shardchat.cluster", "provisioner"), ()),
    ("provisioner", ("shardchat.node",), ()),
    ("shardchat/cluster", ("shardchat.node",), ()),
    ("shardchat/node", ("shardchat.cluster",), ("shardchat/node/main.py",)),
    ("shardchat/internal_api.py", ("shardchat.node", "shardchat.cluster"), ()),
    ("shardchat/lifecycle.py", ("shardchat.node", "shardchat.cluster"), ()),
    ("shardchat/whereabouts.py", ("shardchat.node", "shardchat.cluster"), ()),
    ("shardchat/refusal.py", ("shardchat", "provisioner"), ()),
]


@pytest.mark.parametrize(("where", "forbidden", "exempt"), RULES,
                         ids=[rule[0] for rule in RULES])
def test_layers_import_only_downwards(where, forbidden, exempt):
    files = [p for p in sources(where) if str(p.relative_to(ROOT)) not in exempt]
    assert files, f"{where} has no Python files: the rule checks nothing"
    wrong = sorted(f"{p.relative_to(ROOT)}: {m}" for p in files
                   for m in imported_modules(p) if under(m, forbidden))
    assert wrong == []


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of this project it imports. Left out: names that are not
    modules (a function in ``from a import f``), and a module's own packages: Python has
    begun importing those before the module runs, so ``from pkg import sibling`` inside
    ``pkg`` is an edge to the sibling, not back to ``pkg``."""
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imported_modules(path)
                   if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None when it has none."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_no_module_imports_itself_round_a_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_node_is_wired_to_the_cluster_in_one_place():
    """``node/main.py`` builds the placer; nothing else of the node may (see RULES), and
    main.py really does, so the exemption is not a dead letter."""
    assert "shardchat.cluster.placement" in imported_modules(ROOT / "shardchat/node/main.py")


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The circle this test guards against was held together by an import inside a
    function; a relative import must not slip past either."""
    fake = tmp_path / "shardchat" / "cluster" / "peers.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def create():\n    from shardchat.node.http import PublicApp\n"
                    "    from ..node import internal\n")
    found = imported_modules(fake, root=tmp_path)
    assert {"shardchat.node.http", "shardchat.node.internal"} <= found
    assert under("shardchat.node.http", ("shardchat.node",))
    assert not under("shardchat.nodes", ("shardchat.node",))


def test_a_package_importing_its_own_submodules_is_no_circle():
    graph = import_graph()
    assert "shardchat.node.store.schema" in graph["shardchat.node.store.checkpoint"]
    assert "shardchat.node.store" not in graph["shardchat.node.store.checkpoint"]


def test_a_circle_is_found_however_long():
    graph = {"app": {"placement"}, "placement": {"peers"}, "peers": {"internal", "config"},
             "internal": {"app"}, "config": set()}
    assert find_cycle(graph) == ["app", "placement", "peers", "internal", "app"]
    graph["internal"] = {"config"}
    assert find_cycle(graph) is None
