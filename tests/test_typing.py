"""The public API as a type checker sees it: mypy --strict on a small typed program.

``open_client_service`` and ``open_client_registry`` are typed after their
``metadata_type``, and nothing private shows in a public signature.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import meshline

ROOT = Path(meshline.__file__).parent.parent

PROGRAM = """
from typing import Any

import attrs
import meshline


@attrs.frozen
class Session:
    user: str


async def client_invoke(client_id: str, kind: str, data: Any, timeout: float) -> Any:
    return None


async def main(transport: meshline.Transport) -> None:
    async with meshline.open_node(transport, "typed") as node:
        async with meshline.open_client_registry(node, metadata_type=Session) as sessions:
            reveal_type(sessions)
            registration = await sessions.register("c", Session("ann"))
            reveal_type(registration)
            client = await sessions.get_client("c")
            assert client is not None
            reveal_type(client.metadata)
        async with meshline.open_client_registry(node) as plain:
            reveal_type(plain)
        async with meshline.open_client_registry(node, metadata_type=int | None) as loose:
            reveal_type(loose)
    async with meshline.open_client_service(
        transport, "typed", client_invoke=client_invoke, metadata_type=Session, ttl=3
    ) as service:
        reveal_type(service)
        await service.register_client("c", Session("bob"))
        await service.register_client("c", {"user": "bob"})  # E: wrong metadata
    async with meshline.open_client_service(
        transport, "typed", client_invoke=client_invoke
    ) as plain_service:
        reveal_type(plain_service)
    async with meshline.open_client_service(
        transport, "typed", client_invoke=client_invoke, tll=3  # E: no such option
    ):
        pass
"""

EXPECTED = [
    'Revealed type is "meshline._registry._presence.NodeClientRegistry[program.Session]"',
    'Revealed type is "meshline._registry._core.Registration"',
    'Revealed type is "program.Session"',
    'Revealed type is "meshline._registry._presence.NodeClientRegistry[dict[Any, Any]]"',
    'Revealed type is "meshline._registry._presence.NodeClientRegistry[Any]"',
    'Revealed type is "meshline._service._service.ClientService[program.Session]"',
    'error: Argument 2 to "register_client" of "ClientService" has incompatible type',
    'Revealed type is "meshline._service._service.ClientService[dict[Any, Any]]"',
    'error: Unexpected keyword argument "tll" for overloaded function "open_client_service"',
    'error: No overload variant of "open_client_service" matches argument types',
]


@pytest.mark.slow
def test_metadata_types_flow_through_the_service_and_the_registry(tmp_path: Path) -> None:
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("needs a source checkout of meshline")
    (tmp_path / "program.py").write_text(PROGRAM)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--hide-error-context",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "program.py",
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    found = [
        re.sub(r"^program\.py:\d+: (note: )?", "", line)
        for line in result.stdout.splitlines()
        if "Revealed type" in line or ": error:" in line
    ]
    assert len(found) == len(EXPECTED), result.stdout
    for line, expected in zip(found, EXPECTED, strict=True):
        assert line.startswith(expected), result.stdout


def test_no_private_keyword_in_a_public_signature() -> None:
    for name in dir(meshline):
        value = getattr(meshline, name)
        if not callable(value):
            continue
        functions = [value, *(getattr(value, "__dict__", {}).values())]
        for function in functions:
            try:
                parameters = inspect.signature(function).parameters
            except (TypeError, ValueError):
                continue
            private = [p for p in parameters if p.startswith("_") and not p.startswith("__")]
            assert private == [], f"{name}.{getattr(function, '__name__', '?')}: {private}"
