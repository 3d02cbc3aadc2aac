"""The router routes exactly as an ALB with the same listener rules would.

ALB path patterns are case-sensitive, whole-path, ``*`` = zero or more characters, ``?`` =
exactly one, compared with the path as the client sent it (no decoding, no normalising) and
never with the query string; rules are tried lowest priority first, first match wins, and the
default action takes the rest. The table is checked on the matcher and, for the paths whose
raw form matters, on the wire through a running router.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from shardchat.cluster.router import Router
from shardchat.cluster.rules import Rule, RuleSet, build_rules, pattern_matches
from tests.test_router import EchoTarget, start_router

DEFAULT = None  # the default action

# (raw request path, instance its rule sends it to, or DEFAULT)
TABLE = [
    ("/i1/x", 1),
    ("/i10/x", 10),
    ("/i100/room/abc", 100),
    ("/i1/", 1),                     # * matches zero characters
    ("/i1", DEFAULT),                # no slash: "/i1/*" needs one
    ("/i10", DEFAULT),
    ("/i1x/y", DEFAULT),
    ("/i01/x", DEFAULT),
    ("/i1000/x", DEFAULT),           # no instance 1000 configured
    ("/I1/x", DEFAULT),              # case-sensitive
    ("/i1/x?to=/i10/", 1),           # the query string never takes part
    ("/x?/i1/y", DEFAULT),
    ("/%69%31/x", DEFAULT),          # encoded "i1" is not decoded before matching
    ("/i1/a%2Fb", 1),
    ("/i1//x", 1),                   # double slashes are kept as sent
    ("//i1/x", DEFAULT),
    ("/i10/../i1/x", 10),            # no dot-segment removal either
    ("/", DEFAULT),
    ("/api/rooms", DEFAULT),
]

RULES = build_rules([1, 10, 100])


@pytest.mark.parametrize(("path", "expected"), TABLE)
def test_matcher_agrees_with_alb(path, expected):
    rule = RULES.match(path)
    assert (rule.instance if rule else None) == expected


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("/a?c", "/abc", True),
    ("/a?c", "/ac", False),
    ("/a?c", "/abbc", False),
    ("/img/*/pics", "/img/x/y/pics", True),   # * in the middle spans slashes
    ("/img/*/pics", "/img//pics", True),
    ("/img/*/pics", "/img/pics", False),
    ("/img/*/pics", "/img/x/pics/more", False),
    ("/a.b", "/axb", False),                  # regex characters are literals
    ("/a+b", "/a+b", True),
    ("/a(b)", "/a(b)", True),
    ("/A/*", "/a/x", False),
])
def test_pattern_wildcards(pattern, path, matches):
    assert pattern_matches(pattern, path) is matches


def test_lowest_priority_wins_whatever_the_list_order():
    rules = RuleSet(rules=(Rule(20, "/api/*", 1), Rule(5, "/api/special/*", 2),
                           Rule(10, "/api/special/x", 3)), default_instances=(1, 2, 3))
    router = Router(rules, {n: ("127.0.0.1", 1) for n in (1, 2, 3)})
    assert router.pick("/api/special/x") == 2   # 5 beats 10 and 20 although listed second
    assert router.pick("/api/other") == 1
    reordered = RuleSet(rules=tuple(reversed(rules.rules)), default_instances=(1, 2, 3))
    assert Router(reordered, router.targets).pick("/api/special/x") == 2


def test_first_match_wins_between_overlapping_patterns():
    rules = RuleSet(rules=(Rule(1, "/i1*", 7), Rule(2, "/i1/*", 1)), default_instances=(1,))
    router = Router(rules, {1: ("127.0.0.1", 1), 7: ("127.0.0.1", 2)})
    assert router.pick("/i1/x") == 7
    assert router.pick("/i10/x") == 7


def test_two_rules_with_one_priority_are_refused():
    rules = RuleSet(rules=(Rule(3, "/a/*", 1), Rule(3, "/b/*", 2)), default_instances=(1,))
    with pytest.raises(ValueError, match="share priority 3"):
        Router(rules, {1: ("127.0.0.1", 1)})


async def _raw_get(base: str, target: str) -> tuple[int, dict]:
    """Send the request line byte for byte, so no client library normalises the path."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: chat.test\r\nConnection: close\r\n\r\n"
                 .encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_raw_paths_route_and_arrive_unchanged_on_the_wire():
    numbers = [1, 10, 100]
    targets = {n: await EchoTarget(n).start() for n in numbers}
    router, runner, base = await start_router(
        build_rules(numbers), {n: ("127.0.0.1", t.port) for n, t in targets.items()})
    try:
        for path, expected in TABLE:
            status, body = await _raw_get(base, path)
            assert status == 200, path
            assert body["raw"] == path, path  # passed through unchanged, query included
            if expected is not None:
                assert body["instance"] == expected, path
        assert router.healthy() == numbers
    finally:
        await runner.cleanup()
        for t in targets.values():
            await t.stop()
