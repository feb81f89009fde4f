"""Child processes for the process tests and benchmarks.

:class:`Process` speaks JSON lines: commands go in on stdin, one JSON object a
line; every line the child prints is kept, as a dict, with ``"arrived"``: the
parent's ``time.monotonic()`` when it was read (one clock for every process on
the machine). :func:`run_script` runs a benchmark script to its end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

POLL = 0.05
"""Seconds between two looks at a condition."""
ROOT = Path(__file__).resolve().parents[1]


class Process:
    """A child process that speaks JSON lines; everything it prints is kept."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self._answers: list[dict[str, Any]] = []
        self._answered = 0
        self._arrived = trio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    fields = json.loads(line)
                    if "answer" in fields:
                        self._answers.append(fields)
                    self.lines.append({**fields, "arrived": time.monotonic()})
            self._arrived.set()
            self._arrived = trio.Event()

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == kind]

    async def until(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await trio.sleep(POLL)

    async def ask(self, **command: Any) -> dict[str, Any]:
        """Send ``command``; return the child's next answer, as it printed it."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")
        with trio.fail_after(30):
            while len(self._answers) <= self._answered:
                await self._arrived.wait()
        self._answered += 1
        return self._answers[self._answered - 1]

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)


@asynccontextmanager
async def spawn(nursery: trio.Nursery, *args: str) -> AsyncIterator[Process]:
    process = await trio.lowlevel.open_process(
        [sys.executable, *args],
        stdin=-1,  # subprocess.PIPE
        stdout=-1,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    child = Process(process)
    nursery.start_soon(child.read)
    try:
        yield child
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


def run_script(script: Path, *arguments: str) -> str:
    """Run the Python script ``script`` with ``arguments`` (at most 300 s); its
    standard output. :raises subprocess.CalledProcessError: it failed."""
    return subprocess.run(
        [sys.executable, str(script), *arguments],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
