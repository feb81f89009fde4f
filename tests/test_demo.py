"""``meshline demo`` runs end to end against its embedded server and exits cleanly."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_shows_each_feature() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshline", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for expected in [
        "gamma got b'hello from alpha'",
        "1000 concurrent requests answered",
        "fails at once: no responders",
        "beta's create lost",
        "beta saw 'leader' expire",
        "beta took over at once",
        "alpha asks gamma: 'gamma (node",
        "heard 'gamma is up' from",
        "took the lease after",
        "a request to the stopped node fails at once",
        "alpha invokes carol: 'carol (on beta) got notify: hi'",
        "alpha heard 'at 02:00'",
        "register says it left node",
        "orphaned clients: ['erin']",
        "alpha invokes frank: 'frank (on beta) got notify: welcome back'",
        "[cluster]",
        "ana calls add([1, 2, 3]): 6",
        "room 'lobby' emit to 2 members: ana got 'lunch at noon', bo got 'lunch at noon'",
        "the server asks cy 'deploy now?'; cy answers True",
        "closed it with 1013 (backpressure)",
        "[server] on_disconnect 'slow': backpressure, close code 1013",
        "was reaped with 4001 (reaped)",
        "[server] on_disconnect 'silent': reaped, close code 4001",
        "[server] on_disconnect 'cy': client_closed, close code 1000",
        "the socket server is stopped",
        "[hooks] ana is online (said by east, the leader)",
        "west emits to user ana, on both nodes: laptop got 'dinner at eight', phone got",
        "east asks ana's laptop (on west) 'sync now?': True",
        "bo's client stops for good (4501, terminal)",
        "[hooks] bo is offline",
        "ana's phone moved to west with the same client id; west sees ['laptop', 'phone']",
        "[hooks] ana is offline (said by west, the leader)",
        "the cluster is stopped",
        "the embedded server is stopped",
    ]:
        assert expected in result.stdout


def test_cli_requires_a_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshline"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "demo" in result.stderr
