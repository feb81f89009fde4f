"""Smoke tests of ``benchmarks/fanout.py`` (its tiny profile, every section) and of
``benchmarks/socket_kill.py``.

The figures are not checked (tests never assert on speed); what is checked is that
every measurement ran and measured what it claims: every fan-out and to_user
delivery arrived, on both sides, the socket requests and the node requests were
answered, and the last line has the documented format.

The python-socketio baseline needs the ``bench`` extra and Debian's redis-server,
which ``.ci/run`` installs. Where they are missing, the benchmark must say how to
install them and read ``nan`` for the figure measured against them (never a
number): the test checks whichever of the two this machine calls for, and the
message itself is checked separately, with the Redis binary hidden.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .json_processes import run_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCHMARK = BENCHMARKS / "fanout.py"
FLOAT = r"(nan|inf|\d+\.\d+)"
LAST_LINE = re.compile(rf"fanout_vs_socketio={FLOAT} request_ratio={FLOAT}")

pytestmark = pytest.mark.slow


def baseline_installed() -> bool:
    modules = ("socketio", "redis", "aiohttp")
    return shutil.which("redis-server") is not None and all(
        importlib.util.find_spec(module) is not None for module in modules
    )


def test_tiny_profile_measures_everything(tmp_path: Path) -> None:
    output = tmp_path / "fanout.json"
    stdout = run_script(BENCHMARK, "--tiny", "--json", str(output))
    last = stdout.strip().splitlines()[-1]
    assert LAST_LINE.fullmatch(last), last
    assert "FAILED" not in stdout and "> " not in stdout, stdout
    figures = {name: float(value) for name, value in (p.split("=") for p in last.split())}
    assert math.isfinite(figures["request_ratio"]), last

    results = json.loads(output.read_text())
    options = results["options"]
    impls = ["meshline"]
    if baseline_installed():
        impls.append("baseline")
        assert results["baseline_missing"] is None
        assert math.isfinite(figures["fanout_vs_socketio"]), last
    else:
        assert "MISSING" in stdout and "pip install -e '.[bench]'" in stdout, stdout
        assert math.isnan(figures["fanout_vs_socketio"]), last
        for section in ("fanout", "users"):
            assert all("missing" in run for run in results["results"][section]["baseline"])

    for impl in impls:
        (fanout,) = results["results"]["fanout"][impl]
        expected = options["clients"] * options["fanout_events"]
        assert fanout["received"] == fanout["expected"] == expected, (impl, fanout)
        (users,) = results["results"]["users"][impl]
        expected = options["clients"] // 2 * options["user_rounds"]
        assert users["received"] == users["expected"] == expected, (impl, users)
    for impl in ("baseline", "meshline"):  # node requests, then socket requests
        (requests,) = results["results"]["requests"][impl]
        assert requests["requests"] > 0 and requests["rate"] > 0, (impl, requests)
    for ceiling in ("websocket_echo", "tcp_echo"):  # bare round trips, for the ceilings
        (echo,) = results["results"][ceiling]["meshline"]
        assert echo["requests"] > 0 and echo["rate"] > 0, (ceiling, echo)
    assert "trio-websocket echo (the WebSocket leg alone)" in stdout, stdout
    for impl in ("baseline", "meshline"):  # room emits, then presence diffs, to the watchers
        (presence,) = results["results"]["presence"][impl]
        expected = 2 * options["presence_watchers"] * options["presence_joins"]
        assert presence["received"] == presence["expected"] == expected, (impl, presence)


def test_socket_kill_benchmark_checks_the_hooks() -> None:
    """``benchmarks/socket_kill.py``, one small round: it measured every time, and
    the hooks it saw were the truth (one orphan report, the right users offline)."""
    stdout = run_script(BENCHMARKS / "socket_kill.py", "--tiny")
    last = stdout.strip().splitlines()[-1]
    match = re.fullmatch(rf"gone_s={FLOAT} orphaned_s={FLOAT} wrong_hooks=(\d+)", last)
    assert match is not None, stdout
    assert math.isfinite(float(match[1])) and math.isfinite(float(match[2])), stdout
    assert match[3] == "0", stdout


def test_a_missing_baseline_says_how_to_install_it() -> None:
    environment = {**os.environ, "MESHLINE_BENCH_REDIS_SERVER": "/nonexistent/redis-server"}
    stdout = subprocess.run(
        [sys.executable, "-c", "import fanout; print(fanout.baseline_problem())"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=BENCHMARKS,
        env=environment,
    ).stdout
    assert "redis-server not found" in stdout, stdout
    assert "pip install -e '.[bench]'" in stdout and "apt-get install redis-server" in stdout
