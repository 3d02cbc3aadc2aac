"""Where library internals may be touched: only in shardchat/node/engine/, only the ones
its self-check lists, and never by the stock engine. Read from the source (its syntax
tree), so a new reach into a library cannot slip in unlisted."""

from __future__ import annotations

import ast
from pathlib import Path

from shardchat.node.engine import INTERNALS
from tests.support import ROOT

PACKAGE = ROOT / "shardchat"
ENGINE = PACKAGE / "node" / "engine"
# Private names of the standard library that are its documented API.
DOCUMENTED = {"_exit"}  # os._exit


def private_names(path: Path) -> set[str]:
    """Every ``x._name`` (x not self or cls) and ``getattr(x, "_name")`` in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            name, owner = node.attr, node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
        else:
            continue
        if name.startswith("_") and not name.startswith("__") and name not in DOCUMENTED:
            names.add(name)
    return names


def test_nothing_outside_the_engine_touches_a_private_attribute():
    outside = {str(path.relative_to(ROOT)): private_names(path)
               for path in PACKAGE.rglob("*.py") if ENGINE not in path.parents}
    assert {path: names for path, names in outside.items() if names} == {}


def test_the_self_check_lists_every_private_name_the_fast_engine_uses():
    listed = {item.name for item in INTERNALS}
    used = {path.name: private_names(path) - listed for path in ENGINE.glob("*.py")}
    assert {name: names for name, names in used.items() if names} == {}


def test_the_stock_engine_uses_no_private_attribute():
    assert private_names(ENGINE / "stock.py") == set()
    assert private_names(ENGINE / "wire.py") == set()


def test_the_stock_classes_override_and_read_nothing_private_of_their_libraries():
    """``self._x`` in a subclass may be the library's own: none of the stock engine's is."""
    import socketio

    from shardchat.node.engine import stock

    library = [socketio.AsyncServer(async_mode="aiohttp"), socketio.AsyncNamespace("/"),
               socketio.packet.Packet()]
    own = set()
    for node in ast.walk(ast.parse((ENGINE / "stock.py").read_text())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "self" and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            own.add(node.attr)
    for cls in (stock.StockServer, stock.StockRoutes, stock.StockPacket):
        own |= {name for name in vars(cls) if name.startswith("_") and not name.startswith("__")}
    assert own, "the scan found the stock engine's own private names"
    assert {name for name in own if any(hasattr(obj, name) for obj in library)} == set()


def test_the_engine_sits_below_the_rest_of_the_node():
    """It may import ``config`` and ``refusal`` and itself: nothing of the node around it
    (rooms, store, listeners) or above it, so those can change without it."""
    from tests.test_layering import imported_modules, under

    allowed = ("shardchat.config", "shardchat.refusal", "shardchat.node.engine")
    wrong = sorted(f"{path.name}: {name}" for path in ENGINE.glob("*.py")
                   for name in imported_modules(path)
                   if under(name, ("shardchat", "provisioner"))
                   and not under(name, allowed))
    assert wrong == []
