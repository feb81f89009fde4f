"""Smoke test of ``benchmarks/scale.py``: its tiny profile and a tiny simulation.

The figures are not checked (tests never assert on speed); what is checked is that
every measurement ran and measured what it claims: the filled buckets hold the
clients they should, the churn unregistered every churned client, the cleanup
removed exactly the dead node's clients, the plot is well-formed SVG, and the last
line has the documented format.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from .json_processes import run_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
LAST_LINE = re.compile(
    r"fresh_open_100k_churned_s=(nan|inf|\d+\.\d+) cleanup_10k_s=(nan|inf|\d+\.\d+) "
    r"bytes_per_client=-?\d+"
)

pytestmark = pytest.mark.slow


def run(*arguments: str) -> str:
    return run_script(BENCHMARK, *arguments)


def test_tiny_profile_measures_everything(tmp_path: Path) -> None:
    output, svg = tmp_path / "scale.json", tmp_path / "scale.svg"
    stdout = run("--tiny", "--json", str(output), "--svg", str(svg))
    assert LAST_LINE.fullmatch(stdout.strip().splitlines()[-1])
    assert "FAILED" not in stdout

    results = json.loads(output.read_text())
    (opened,) = results["open"]
    clients = opened["clients"]
    assert opened["fill"]["filled"] == clients
    assert opened["churn"]["unregistered"] == clients
    for state in ("live", "churned"):
        (run_,) = opened[state]["runs"]
        assert run_["loaded"] == clients, state
        assert opened[state]["baseline"]["values"] == clients, state
    assert opened["churned"]["baseline"]["markers"] >= clients

    (cleanup,) = results["cleanup"]
    (cleaned,) = cleanup["runs"]
    assert cleaned["before"] == cleaned["removed"] == cleanup["clients"]
    assert cleaned["left"] == 0
    assert cleanup["baseline"]["deleted"] == cleanup["clients"]

    for rate in results["rate"]:
        (measured,) = rate["runs"]
        assert measured["registered"] == rate["nodes"] * rate["per_node"]
        (baseline,) = rate["baselines"]
        assert baseline["registered"] == measured["registered"]

    drawing = ElementTree.parse(svg).getroot()
    assert drawing.tag == "{http://www.w3.org/2000/svg}svg"
    assert drawing.findall(".//{http://www.w3.org/2000/svg}circle")

    replot = tmp_path / "again.svg"
    run("--plot", str(output), "--svg", str(replot))
    assert replot.read_text() == svg.read_text()


def test_tiny_simulation_converges(tmp_path: Path) -> None:
    output = tmp_path / "simulation.json"
    run("--simulate", "--nodes", "3", "--clients", "20", "--json", str(output))
    simulation = json.loads(output.read_text())["simulation"]
    assert simulation["orphaned"] == 20
    assert simulation["false_orphans"] == 0
    for phase in ("startup", "detect", "cleanup", "converge"):
        assert simulation[phase]["virtual_s"] >= 0, phase
