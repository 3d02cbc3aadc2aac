"""The engine's hand-written wire formats (shardchat/node/engine/wire.py): what the fast
path parses and encodes itself must be what python-socketio would read and write, and
anything it declines must be left to python-socketio (None), never misread."""

from __future__ import annotations

import json
import struct

import pytest
from socketio import packet as sio_packet

from shardchat.node.engine import wire


def test_text_frame_uses_the_shortest_length_form():
    for size, header in ((0, b"\x81\x00"), (125, b"\x81\x7d"),
                         (126, b"\x81\x7e" + struct.pack("!H", 126)),
                         (65535, b"\x81\x7e" + struct.pack("!H", 65535)),
                         (65536, b"\x81\x7f" + struct.pack("!Q", 65536))):
        payload = b"x" * size
        assert wire.text_frame(payload) == header + payload, size


@pytest.mark.parametrize(("kind", "namespace", "data", "ack_id"), [
    (sio_packet.EVENT, "/", ["message", {"text": "hi"}], None),
    (sio_packet.EVENT, "/i1/room/abc", ["welcome", {"history": [], "n": 3}], None),
    (sio_packet.ACK, "/i1/room/abc", [{"ok": True, "seq": 7}], 12),
    (sio_packet.ACK, "/", [], 0),
    (sio_packet.EVENT, "/i1/room/abc", ["message", {"text": "Zoë 🚀 \u2028 \"quoted\""}], None),
])
def test_sio_payload_reads_back_as_the_packet_python_socketio_would_send(kind, namespace,
                                                                          data, ack_id):
    payload = wire.sio_payload(kind, namespace, data, ack_id)
    assert payload is not None and payload[:1] == b"4"  # an Engine.IO MESSAGE
    theirs = sio_packet.Packet(kind, namespace=namespace, data=data, id=ack_id)
    ours = sio_packet.Packet(encoded_packet=payload[1:].decode())
    assert (ours.packet_type, ours.namespace or "/", ours.id, ours.data) == (
        theirs.packet_type, namespace, ack_id, data)


@pytest.mark.parametrize("data", [["file", b"\x00\x01"], ["x", {1: "int key"}],
                                  ["big", 2 ** 70]])
def test_sio_payload_declines_what_orjson_would_write_differently(data):
    assert wire.sio_payload(sio_packet.EVENT, "/", data) is None


def test_json_size_is_the_bytes_on_the_wire():
    assert wire.json_size({"text": "é"}) == len('{"text":"é"}'.encode())  # UTF-8, no \u escape
    assert wire.json_size({1: "x"}) == len(json.dumps({1: "x"}, separators=(",", ":")))


@pytest.mark.parametrize(("frame", "parsed"), [
    (b'42["message",{"text":"hi"}]', ("/", None, ["message", {"text": "hi"}])),
    (b'42/i1/room/abc,["typing",{"typing":true}]',
     ("/i1/room/abc", None, ["typing", {"typing": True}])),
    (b'42/i1/room/abc,17["history",{"limit":5}]',
     ("/i1/room/abc", 17, ["history", {"limit": 5}])),
    (b'42' + b"9" * 18 + b'["message"]', ("/", int("9" * 18), ["message"])),
    (b'42["message",123456789012345678]', ("/", None, ["message", 123456789012345678])),
])
def test_parse_event_reads_plain_text_events(frame, parsed):
    assert wire.parse_event(frame) == parsed


@pytest.mark.parametrize("frame", [
    b'42' + b"9" * 19 + b'["message"]',          # an ack id beyond 63 bits
    b'42["message",1234567890123456789012]',    # a number orjson would read as a float
    b'42["message",NaN]',                       # not JSON: python-socketio reads it anyway
    b'42["message",{',                          # broken JSON: python-socketio answers it
    b'42[]', b'42[5]', b'42{"a":1}', b'42"message"',  # no event name first
    b'42/i1/room/abc["message"]',               # a namespace without its comma
    b'42/i1/room/abc?x=1,["message"]',          # a query in the namespace
    b'42/\xff\xfe,["message"]',                 # a namespace that is not UTF-8
    b'42["message","\\ud800"]',                 # a lone surrogate
    b'42' + b"[" * 2000 + b"]" * 2000,          # nested deeper than orjson goes
])
def test_parse_event_leaves_anything_odd_to_python_socketio(frame):
    assert wire.parse_event(frame) is None


@pytest.mark.parametrize(("data", "head"), [
    ('0/i1/room/abc,{"name": [[[', (sio_packet.CONNECT, "/i1/room/abc", None)),
    ("0/i1/room/abc?x=1,{", (sio_packet.CONNECT, "/i1/room/abc", None)),
    ("0{", (sio_packet.CONNECT, "/", None)),
    ('2/i1/room/abc,5["message",{', (sio_packet.EVENT, "/i1/room/abc", 5)),
    ('2["message",{', (sio_packet.EVENT, "/", None)),
    ("3/i1/room/abc,5[", None),  # an ACK has nobody to answer
    ("2/i1/room/abc,5{", None),  # not an array: not a plain header
    ("", None), (b"\x00\xff", None),
])
def test_packet_head_finds_who_to_answer_in_an_unreadable_packet(data, head):
    assert wire.packet_head(data) == head


def test_bounded_json_turns_deep_nesting_into_a_value_error():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nested too deeply"):
        wire.BoundedJson.loads(deep)
    assert wire.BoundedJson.loads('{"a": [1]}') == {"a": [1]}

