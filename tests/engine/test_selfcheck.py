"""The fast engine's start-up self-check (shardchat/node/engine/__init__.py): it passes on
the pinned libraries, and a library release that lost something the engine relies on
stops the node at start-up with one line naming it, instead of a failure deep inside a
request later. The stock engine is not checked: it relies on nothing private."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import socketio
from engineio.async_socket import AsyncSocket
from engineio.base_socket import BaseSocket

from shardchat.config import NodeSettings
from shardchat.node import engine
from shardchat.node.engine import EngineIncompatible, check_internals
from tests.support import ROOT, make_cluster_config


def test_the_installed_libraries_have_everything_the_fast_engine_uses():
    assert check_internals() == []  # not even an optional one is missing
    built = engine.build(NodeSettings())
    assert built.kind == "fast"


def test_a_missing_private_method_is_named_with_the_installed_version(monkeypatch):
    monkeypatch.delattr(AsyncSocket, "_send_ping")
    with pytest.raises(EngineIncompatible) as info:
        check_internals()
    message = str(info.value)
    assert "engineio.async_socket.AsyncSocket._send_ping does not exist" in message
    assert f"python-engineio {importlib.metadata.version('python-engineio')}" in message
    assert 'engine = "stock"' in message, "the way out must be in the message"
    assert message.count("does not exist") == 1, "only what is missing is named"


def test_a_missing_instance_attribute_is_found_on_a_probe(monkeypatch):
    built_by_engineio = BaseSocket.__init__

    def without_last_ping(self, *args, **kwargs):
        built_by_engineio(self, *args, **kwargs)
        del self.last_ping

    monkeypatch.setattr(BaseSocket, "__init__", without_last_ping)
    with pytest.raises(EngineIncompatible, match=r"AsyncSocket\.last_ping does not exist"
                                                 r" in python-engineio \d"):
        check_internals()


def test_an_overridden_method_whose_parameters_changed_is_refused(monkeypatch):
    async def handle_connect(self, eio_sid, namespace, auth):  # "data" renamed
        return None

    monkeypatch.setattr(socketio.AsyncServer, "_handle_connect", handle_connect)
    with pytest.raises(EngineIncompatible, match="_handle_connect no longer takes data"):
        check_internals()


def test_a_missing_optional_saving_is_reported_but_not_fatal(monkeypatch):
    built_by_socketio = socketio.AsyncServer.__init__

    def without_environ(self, *args, **kwargs):
        built_by_socketio(self, *args, **kwargs)
        del self.environ

    monkeypatch.setattr(socketio.AsyncServer, "__init__", without_environ)
    problems = check_internals()
    assert len(problems) == 1 and "AsyncServer.environ does not exist" in problems[0]


def test_the_stock_engine_is_not_checked(monkeypatch):
    monkeypatch.delattr(AsyncSocket, "_send_ping")
    with pytest.raises(EngineIncompatible):
        engine.build(NodeSettings())
    assert engine.build(NodeSettings(engine="stock")).kind == "stock"


def test_a_node_that_fails_the_check_exits_1_with_one_line_and_no_traceback(tmp_path):
    """The whole node command, with python-engineio's ping task method gone."""
    cfg, _ = make_cluster_config(tmp_path, 1)
    script = ("import sys; import engineio.async_socket as m; del m.AsyncSocket._send_ping; "
              "from shardchat.cli import main; sys.argv = ['shardchat', 'node', '--config', "
              f"{str(cfg)!r}, '--instance', '1']; main()")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "instance 1 cannot start" in output and "AsyncSocket._send_ping" in output, output
    assert "Traceback" not in output, output
    assert "serving" not in output, "nothing may listen before the check"
