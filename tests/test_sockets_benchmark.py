"""Smoke test of ``benchmarks/sockets.py``: its tiny profile, every section.

The figures are not checked (tests never assert on speed); what is checked is that
every measurement ran and measured what it claims, on both sides: the callers
completed calls and none failed, every fanout delivery arrived, every idle
connection was open (and, on meshline, had answered a heartbeat ping) when the
server's memory was read, and the last line has the documented format.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from .json_processes import run_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "sockets.py"
FLOAT = r"(nan|inf|\d+\.\d+)"
LAST_LINE = re.compile(rf"call_ratio={FLOAT} fanout_ratio={FLOAT} bytes_per_conn=-?\d+")

pytestmark = pytest.mark.slow


def test_tiny_profile_measures_everything(tmp_path: Path) -> None:
    output = tmp_path / "sockets.json"
    stdout = run_script(BENCHMARK, "--tiny", "--json", str(output))
    last = stdout.strip().splitlines()[-1]
    assert LAST_LINE.fullmatch(last), last
    assert "FAILED" not in stdout and "> " not in stdout, stdout
    figures = dict(pair.split("=") for pair in last.split())
    assert all(math.isfinite(float(value)) for value in figures.values()), last
    assert int(figures["bytes_per_conn"]) > 0

    results = json.loads(output.read_text())
    options = results["options"]
    for impl in ("baseline", "meshline"):
        (call,) = results["results"]["call"][impl]
        assert call["calls"] > 0 and call["rate"] > 0, (impl, call)

        (fanout,) = results["results"]["fanout"][impl]
        expected = options["fanout_connections"] * options["fanout_events"]
        assert fanout["received"] == fanout["expected"] == expected, (impl, fanout)
        assert fanout["queued"] == expected, (impl, fanout)

        (idle,) = results["results"]["idle"][impl]
        assert idle["connections"] == options["idle_connections"], (impl, idle)
        assert idle["rss_after"] > idle["rss_before"], (impl, idle)
    (idle,) = results["results"]["idle"]["meshline"]
    assert idle["ponged"] == options["idle_connections"], idle
    assert results["summary"]["bytes_per_conn"] == round(idle["bytes_per_conn"])
