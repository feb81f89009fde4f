"""Shared by the benchmark scripts: run one measurement in a fresh process.

Importing trio_asyncio changes asyncio's loop policy for the whole process, so the
asyncio baselines and meshline never share one; each measurement is a worker script
run on its own, which prints a JSON object as its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_worker(worker: Path, *arguments: object, timeout: float = 300) -> dict[str, Any]:
    """Run ``worker`` with ``arguments`` and return the JSON object it printed last."""
    output = subprocess.run(
        [sys.executable, str(worker), *map(str, arguments)],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=worker.parent,
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result
