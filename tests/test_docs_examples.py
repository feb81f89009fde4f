"""The complete examples on the docs pages run and print what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).parent.parent / "docs"


@pytest.mark.parametrize("page", ["service.rst", "cluster.rst"])
def test_page_example_runs_as_documented(tmp_path: Path, page: str) -> None:
    text = (DOCS / page).read_text()
    block = text.split(".. code-block:: python\n\n", 1)[1].split("\nIt prints::", 1)[0]
    code = "\n".join(line.removeprefix("    ") for line in block.splitlines())
    expected = text.split("It prints::\n\n", 1)[1].split("\n\n", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == [line.strip() for line in expected.splitlines()]
