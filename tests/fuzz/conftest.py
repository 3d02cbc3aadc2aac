"""Fixtures of the fuzz suite: one real node per module, with its bystanders' harness.

Hypothesis runs derandomized and keeps no example database, so every run (a laptop's, CI's)
tries the same inputs in the same order and writes nothing into the work tree. Set
``SHARDCHAT_FUZZ_SCALE`` (default 1) to multiply every test's example count for a longer
local hunt, ``SHARDCHAT_FUZZ_RANDOM=1`` to draw fresh random inputs instead, and
``SHARDCHAT_FUZZ_SHRINK=0`` to report the first failing input as found, unshrunk.

Shrinking a failure replays it against the live node many times; it is capped at
``SHRINK_SECONDS`` so a failing run still ends within the test timeout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.internal.conjecture import engine

from tests.fuzz.harness import Harness, generous_limits
from tests.support import running_nodes

SCALE = float(os.environ.get("SHARDCHAT_FUZZ_SCALE", "1"))
SHRINK_SECONDS = 60
SHRINK = os.environ.get("SHARDCHAT_FUZZ_SHRINK", "1") != "0"

if hasattr(engine, "MAX_SHRINKING_SECONDS"):  # hypothesis' own cap is five minutes
    engine.MAX_SHRINKING_SECONDS = SHRINK_SECONDS

settings.register_profile(
    "shardchat-fuzz", deadline=None, database=None,
    derandomize=os.environ.get("SHARDCHAT_FUZZ_RANDOM", "0") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
    phases=list(Phase) if SHRINK else [p for p in Phase if p is not Phase.shrink],
    print_blob=False)
settings.load_profile("shardchat-fuzz")


def examples(n: int) -> settings:
    """``n`` examples (times SHARDCHAT_FUZZ_SCALE): each test's time budget in one place."""
    return settings(max_examples=max(1, int(n * SCALE)))


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Iterator[Harness]:
    """One node for the module, every rate limit out of reach, bystanders in a room."""
    tmp = tmp_path_factory.mktemp("fuzz")
    with running_nodes(tmp, 1, node=generous_limits()) as (node,):
        h = Harness(node)
        try:
            h.ready()
            yield h
        finally:
            h.close()
