"""Shared by the benchmark scripts: run one measurement in a fresh process
(:func:`run_worker`), or keep a worker process to talk to (:class:`Worker`).

Importing trio_asyncio changes asyncio's loop policy for the whole process, so the
asyncio baselines and meshline never share one; each measurement is a worker script
run on its own, which prints a JSON object as its last line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).parent


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


class WorkerFailed(Exception):
    """A worker crashed, said something unexpected, or was too slow."""

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout


class Worker:
    """One worker process: commands to its stdin, JSON lines from its stdout (read
    by a thread, so that reads can time out), stderr to a file."""

    profile_dir: Path | None = None
    log_dir: Path = Path(tempfile.gettempdir())

    def __init__(self, name: str, script: Path, *arguments: object) -> None:
        self.name = name
        command = [sys.executable, str(script), *map(str, arguments)]
        if Worker.profile_dir is not None:
            out = Worker.profile_dir / f"{name}.txt"
            command = ["py-spy", "record", "-f", "raw", "-r", "200", "-o", str(out), "--", *command]
        self.stderr_path = Worker.log_dir / f"{name}.stderr"
        self._stderr: TextIO = self.stderr_path.open("w")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=HERE,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stray: list[str] = []
        """Lines on stdout that are not JSON objects (shown with the stderr tail)."""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self._lines.put(line)
            elif line.strip() and not line.startswith("py-spy>"):
                self.stray.append(line.rstrip())  # someone's print(): not an answer
        self._lines.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON object the worker prints.

        :raises WorkerFailed: it exited, printed something else, or took longer.
        """
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise WorkerFailed(
                f"{self.name}: no answer within {timeout:g} s", timeout=timeout
            ) from None
        if line is None:
            self.process.wait()
            raise WorkerFailed(f"{self.name}: exited with status {self.process.returncode}")
        try:
            result: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            raise WorkerFailed(f"{self.name}: printed {line.strip()!r}") from None
        return result

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the worker's Python process used so far."""
        return cpu_seconds(self.pid)

    @property
    def pid(self) -> int:
        pid = self.process.pid
        if Worker.profile_dir is not None:  # the worker is py-spy's child
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            pid = int(children[0]) if children else pid
        return pid

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise WorkerFailed(f"{self.name}: gone before {command!r}") from None

    def stop(self) -> None:
        """Close its stdin (it exits at once), wait a little, then kill it."""
        with contextlib.suppress(BrokenPipeError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30 if Worker.profile_dir else 5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.close()

    def stderr_tail(self, lines: int = 12) -> list[str]:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            text = ""
        shown = [f"(stdout) {line}" for line in self.stray[-lines:]]
        return shown + [line for line in text.strip().splitlines() if line.strip()][-lines:]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Turns:
    """``--lock``: the file measurements take in turn, so that two benchmarks (or a
    benchmark and a pytest run) never measure at once."""

    def __init__(self) -> None:
        self.path: Path | None = None
        """The lock file (None: no locking)."""
        self.waited = 0.0
        """Seconds spent waiting for it (left out of a run's time)."""

    @contextlib.contextmanager
    def turn(self, owner: str) -> Iterator[None]:
        """Hold the lock for one measurement: wait until no one else holds it and no
        pytest runs, create it (naming ``owner``), and remove it afterwards
        (whatever happens)."""
        if self.path is None:
            yield
            return
        announced, began = False, time.monotonic()
        while self.path.exists() or others_testing():
            if not announced:
                print(f"waiting for {self.path} (or a pytest run) to go away ...", file=sys.stderr)
                announced = True
            time.sleep(5)
        self.waited += time.monotonic() - began
        self.path.write_text(f"{owner}\n")
        try:
            yield
        finally:
            self.path.unlink(missing_ok=True)


TURNS = Turns()


def others_testing() -> bool:
    found = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True).stdout
    return any(int(pid) != os.getpid() for pid in found.split())


def report(headline: str, workers: list[Worker]) -> None:
    """Print ``headline`` and the last lines of each worker's stderr (on stderr)."""
    print(headline, file=sys.stderr)
    for worker in workers:
        tail = worker.stderr_tail()
        if tail:
            print(f"  {worker.name} stderr:", file=sys.stderr)
            for line in tail:
                print(f"    {line}", file=sys.stderr)


def median(runs: list[dict[str, Any]], field: str) -> float:
    """The median of ``field`` over the runs: ``nan`` if there are none or any failed."""
    if not runs or any(field not in run for run in runs):
        return math.nan
    return float(statistics.median(run[field] for run in runs))


def failure(runs: list[dict[str, Any]]) -> str | None:
    """How the runs failed (MISSING baseline, over time, FAILED), or None."""
    for run in runs:
        if "missing" in run:
            return "MISSING"
        if "timeout" in run:
            return f"> {run['timeout']:g} s"
        if "error" in run:
            return "FAILED"
    return None


def cell(runs: list[dict[str, Any]], field: str, show: Callable[[float], str]) -> str:
    return failure(runs) or show(median(runs, field))


def runs_cell(runs: list[dict[str, Any]], field: str, show: Callable[[float], str]) -> str:
    return "[" + ", ".join(failure([run]) or show(run[field]) for run in runs) + "]"
