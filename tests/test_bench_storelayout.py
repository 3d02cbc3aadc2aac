"""The store-layout benchmark runs both layouts on real SQLite files and prints its table;
only the plumbing is checked, never a speed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.timeout(120)


def test_the_layout_benchmark_prints_both_layouts_and_their_ratio() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.storelayout", "--rounds", "1",
                          "--history", "3000"], cwd=ROOT, capture_output=True, text=True,
                         timeout=100, check=True).stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()
            if line.startswith("| ") and "messages held" not in line}
    memory = rows.pop("the newest 50 from memory (a join's welcome once its room was read)")
    assert set(rows) == {"arrival order", "clustered by room"}, out
    for line in rows.values():
        write_us, read_us = (float(x) for x in line.strip("| \n").split("|")[1:])
        assert write_us > 0 and read_us > 0
    assert float(memory.strip("| \n").split("|")[-1]) > 0
    assert "arrival order / clustered: writes" in out
