"""Drive client-service nodes in processes of their own through faults, and measure.

Each node is ``tests/fault_service_process.py`` (see its docstring for the line
protocol). :func:`open_fault_cluster` starts them against one NATS server, then polls
every node's view from the outside every :data:`POLL_INTERVAL` seconds for as long as
the cluster is open, keeping every answer in :attr:`FaultCluster.history`. The hook
calls the nodes report (``on_orphaned`` / ``on_restored``) are kept in
:attr:`FaultCluster.reports`.

The scenario functions (:func:`restart_scenario`, :func:`stall_scenario`,
:func:`kill_scenario`) inject one fault, wait until the cluster has settled (or a
deadline passes) and return what they measured. They never assert: the tests assert
on the results, and ``benchmarks/faults.py`` prints them.

Times are wall-clock (``time.time()``) on both sides, so a hook call in a child can
be compared with the moment the driver injected a fault. A view's time is the
moment the child read it, not when its answer arrived.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from meshline.testing import NatsServer

SCRIPT = Path(__file__).with_name("fault_service_process.py")

POLL_INTERVAL = 0.05
"""Seconds between two status requests to one running node."""

STATUS_TIMEOUT = 2.0
"""Seconds a node gets to answer one status request before the round goes on."""

ProcessState = Literal["running", "stopped", "killed"]


@attrs.frozen
class Status:
    """One node's view, as it answered a ``status`` request."""

    index: int
    """Which process of the cluster answered."""
    node_id: int
    t: float
    """Wall clock in the child when it read its view."""
    connected: bool
    trustworthy: bool | None
    """None when the library does not say (no ``Node.view_is_trustworthy``)."""
    leader: bool
    leader_id: int | None
    incarnation: int | None
    alive: frozenset[int]
    counts: Mapping[int, int]
    """Visible clients per alive node."""
    clients: Mapping[str, int] | None = None
    """Every visible client and its node (full status only)."""

    @classmethod
    def from_message(cls, index: int, message: Mapping[str, Any]) -> Status:
        clients = message.get("clients")
        return cls(
            index=index,
            node_id=int(message["id"]),
            t=float(message["t"]),
            connected=bool(message["connected"]),
            trustworthy=message["trustworthy"],
            leader=bool(message["leader"]),
            leader_id=message["leader_id"],
            incarnation=message["incarnation"],
            alive=frozenset(int(node) for node in message["alive"]),
            counts={int(node): int(count) for node, count in message["counts"].items()},
            clients=None if clients is None else {str(c): int(n) for c, n in clients},
        )

    def missing(self, expected: Mapping[int, int]) -> int:
        """How many of the ``expected`` clients (count per node) this view lacks."""
        return sum(max(0, count - self.counts.get(node, 0)) for node, count in expected.items())

    def whole(self, expected: Mapping[int, int]) -> bool:
        """Whether this view is connected and shows exactly the ``expected`` nodes
        alive, each with its expected number of clients."""
        return (
            self.connected
            and self.alive == frozenset(expected)
            and all(self.counts.get(node, 0) == count for node, count in expected.items())
        )


@attrs.frozen
class HookReport:
    """One call of ``on_orphaned`` or ``on_restored`` in one of the processes."""

    kind: str
    """``orphaned`` or ``restored``."""
    reporter: int
    """The index of the process whose hook was called."""
    node_id: int
    clients: tuple[str, ...]
    incarnations: tuple[int, ...]
    t: float
    """Wall clock in the child when the hook was called."""


@attrs.define(eq=False)
class _Pending:
    done: trio.Event = attrs.Factory(trio.Event)
    status: Status | None = None


class NodeProcess:
    """One ``fault_service_process.py`` child and what the driver knows of it."""

    def __init__(self, index: int, prefix: str, count: int, log_path: Path) -> None:
        self.index = index
        self.prefix = prefix
        self.clients = [f"{prefix}{number}" for number in range(count)]
        self.log_path = log_path
        self.process: trio.Process | None = None
        self.node_id = -1
        self.state: ProcessState = "running"
        self.latest: Status | None = None
        self.streak_since: float | None = None
        """When its current run of whole, trustworthy views began (None: not whole)."""
        self.ready = trio.Event()
        self.exited = trio.Event()
        self.stray_lines: list[str] = []
        self._pending: dict[int, _Pending] = {}
        self._sequence = itertools.count()
        self._stdin_lock = trio.Lock()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the child wrote to stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def status(self, *, full: bool = False, timeout: float = STATUS_TIMEOUT) -> Status | None:
        """Ask for this node's view; None if it does not answer within ``timeout``
        (it is stopped, busy or gone)."""
        if self.process is None or self.process.stdin is None or self.exited.is_set():
            return None
        sequence = next(self._sequence)
        pending = self._pending[sequence] = _Pending()
        try:
            command = f"status {sequence}{' full' if full else ''}\n".encode()
            try:
                async with self._stdin_lock:
                    await self.process.stdin.send_all(command)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            with trio.move_on_after(timeout):
                await pending.done.wait()
            return pending.status
        finally:
            del self._pending[sequence]

    def send_signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            os.kill(self.process.pid, sig)

    async def read_lines(self, on_message: Callable[[NodeProcess, dict[str, Any]], None]) -> None:
        """Read the child's stdout to its end, handing each JSON line to ``on_message``."""
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        try:
            while chunk := await self.process.stdout.receive_some(1 << 16):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        message = json.loads(line)
                    except ValueError:
                        self.stray_lines.append(line.decode(errors="replace"))
                        continue
                    self._dispatch(message, on_message)
        finally:
            self.exited.set()

    def _dispatch(
        self,
        message: dict[str, Any],
        on_message: Callable[[NodeProcess, dict[str, Any]], None],
    ) -> None:
        event = message.get("event")
        if event == "ready":
            self.node_id = int(message["id"])
            self.ready.set()
        elif event == "status":
            pending = self._pending.get(int(message["seq"]))
            if pending is not None:
                pending.status = Status.from_message(self.index, message)
                pending.done.set()
            return
        on_message(self, message)


class FaultCluster:
    """Node processes on one server, their views over time and their hook reports."""

    def __init__(
        self,
        server: NatsServer,
        key: str,
        *,
        nodes: int,
        clients: int,
        ttl: int,
        reassert_interval: float,
        log_dir: Path,
    ) -> None:
        self.server = server
        self.key = key
        self.ttl = ttl
        self.reassert_interval = reassert_interval
        self.log_dir = log_dir
        self.processes = [
            NodeProcess(index, f"n{index}-c", clients, log_dir / f"{key}-node{index}.log")
            for index in range(nodes)
        ]
        self.history: list[Status] = []
        self.reports: list[HookReport] = []
        self._round = trio.Event()

    # ------------------------------------------------------------------ processes

    async def _start(self, nursery: trio.Nursery, process: NodeProcess) -> None:
        command = [
            sys.executable,
            str(SCRIPT),
            self.server.url,
            self.key,
            str(len(process.clients)),
            process.prefix,
            "--ttl",
            str(self.ttl),
            "--reassert-interval",
            str(self.reassert_interval),
        ]
        async with await trio.open_file(process.log_path, "ab") as log:
            process.process = await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log.wrapped,
                    check=False,
                )
            )
        nursery.start_soon(process.read_lines, self._on_message)

    def _on_message(self, process: NodeProcess, message: dict[str, Any]) -> None:
        if message.get("event") in ("orphaned", "restored"):
            self.reports.append(
                HookReport(
                    kind=str(message["event"]),
                    reporter=process.index,
                    node_id=int(message["node_id"]),
                    clients=tuple(message["clients"]),
                    incarnations=tuple(message.get("incarnations", ())),
                    t=float(message["t"]),
                )
            )
        else:
            process.stray_lines.append(json.dumps(message))

    async def _wait_ready(self, process: NodeProcess) -> None:
        async with trio.open_nursery() as nursery:

            async def exited() -> None:
                await process.exited.wait()
                if not process.ready.is_set():
                    raise RuntimeError(
                        f"node process {process.index} exited before it was ready; "
                        f"its log ({process.log_path}):\n{process.log_tail()}"
                    )

            nursery.start_soon(exited)
            await process.ready.wait()
            nursery.cancel_scope.cancel()

    def running(self) -> list[NodeProcess]:
        """The processes neither stopped nor killed."""
        return [process for process in self.processes if process.state == "running"]

    def expected(self) -> dict[int, int]:
        """Clients per node that every view should show: the nodes not killed."""
        return {
            process.node_id: len(process.clients)
            for process in self.processes
            if process.state != "killed"
        }

    def held_clients(self) -> dict[str, int]:
        """Every client a node not killed holds, with that node's id."""
        return {
            client: process.node_id
            for process in self.processes
            if process.state != "killed"
            for client in process.clients
        }

    def by_node_id(self, node_id: int) -> NodeProcess:
        return next(process for process in self.processes if process.node_id == node_id)

    def stop(self, process: NodeProcess) -> None:
        """SIGSTOP ``process``: it keeps its connection but does nothing."""
        process.state = "stopped"
        process.streak_since = None
        process.send_signal(signal.SIGSTOP)

    def resume(self, process: NodeProcess) -> None:
        """SIGCONT a stopped ``process``."""
        process.send_signal(signal.SIGCONT)
        process.state = "running"

    def kill(self, process: NodeProcess) -> None:
        """SIGKILL ``process``: a crash."""
        process.state = "killed"
        process.streak_since = None
        process.send_signal(signal.SIGKILL)

    def _kill_all(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGKILL)

    def logs(self) -> str:
        """Every process's stderr tail, for a failure message."""
        return "\n".join(
            f"--- node process {process.index} (node {process.node_id}, "
            f"{process.log_path}):\n{process.log_tail()}"
            for process in self.processes
        )

    # ------------------------------------------------------------------ polling

    def _record(self, process: NodeProcess, status: Status | None) -> None:
        """Keep one answer (None: no answer) of a process that is running."""
        process.latest = status
        if status is None:
            process.streak_since = None
        else:
            self.history.append(status)
            if status.whole(self.expected()) and status.trustworthy is not False:
                if process.streak_since is None:
                    process.streak_since = status.t
            else:
                process.streak_since = None
        self._round.set()
        self._round = trio.Event()

    async def _poll_forever(self, process: NodeProcess) -> None:
        """Ask ``process`` for its view every :data:`POLL_INTERVAL` s while it runs.

        Each process has a loop of its own, so one that does not answer (stopped,
        starved) delays nobody else's views.
        """
        while not process.exited.is_set():
            started = trio.current_time()
            if process.state == "running":
                status = await process.status()
                if process.state == "running":
                    self._record(process, status)
            await trio.sleep_until(started + POLL_INTERVAL)
        if process.state == "running":
            self._record(process, None)

    async def next_round(self) -> None:
        """Wait until the next view (or missing answer) is recorded."""
        await self._round.wait()

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait, view after view, until ``condition()`` holds; False on ``timeout``."""
        with trio.move_on_after(timeout):
            while not condition():
                await self.next_round()
            return True
        return False

    def all_whole(self, *, trustworthy: bool = False) -> bool:
        """Whether every running process's latest view is whole (and trustworthy)."""
        expected = self.expected()
        return all(
            process.latest is not None
            and process.latest.whole(expected)
            and (process.latest.trustworthy is not False or not trustworthy)
            for process in self.running()
        )

    async def wait_settled(self, since: float, *, stable_for: float, timeout: float) -> bool:
        """Wait until every running process has shown whole, trustworthy views
        without a break for ``stable_for`` seconds, counted from ``since`` at the
        earliest; False if that has not happened within ``timeout``."""

        def settled() -> bool:
            now = time.time()
            return all(
                process.streak_since is not None
                and now - max(process.streak_since, since) >= stable_for
                for process in self.running()
            )

        return await self.wait_for(settled, timeout)

    async def full_views(self, timeout: float = 20.0) -> list[Status]:
        """Every running process's full view (with client ids)."""
        views: list[Status] = []

        async def ask(process: NodeProcess) -> None:
            status = await process.status(full=True, timeout=timeout)
            if status is None:
                raise RuntimeError(
                    f"node process {process.index} did not answer a full status "
                    f"within {timeout} s; its log:\n{process.log_tail()}"
                )
            views.append(status)

        async with trio.open_nursery() as nursery:
            for process in self.running():
                nursery.start_soon(ask, process)
        return sorted(views, key=lambda view: view.index)

    # ------------------------------------------------------------------ measures

    def recovery_time(self, since: float) -> float | None:
        """Seconds from ``since`` until the last running process's views were whole
        for good: for each process, its first whole view after its last view that
        was not whole (after ``since``). None if some process never got there."""
        expected = self.expected()
        worst = 0.0
        for process in self.running():
            views = [v for v in self.history if v.index == process.index and v.t >= since]
            broken = [view.t for view in views if not view.whole(expected)]
            after = max(broken, default=since)
            whole = [view.t for view in views if view.t >= after and view.whole(expected)]
            if not whole:
                return None
            worst = max(worst, min(whole) - since)
        return worst

    def worst_missing(self, since: float, until: float | None = None) -> int:
        """The most expected clients any view lacked between ``since`` and ``until``."""
        expected = self.expected()
        return max(
            (
                view.missing(expected)
                for view in self.history
                if view.t >= since and (until is None or view.t <= until)
            ),
            default=0,
        )

    def reports_since(self, since: float, kind: str) -> list[HookReport]:
        return [report for report in self.reports if report.kind == kind and report.t >= since]

    def lost(self, views: Iterable[Status]) -> set[str]:
        """Clients held by a node not killed that some full view lacks (or shows
        on the wrong node)."""
        held = self.held_clients()
        lost: set[str] = set()
        for view in views:
            assert view.clients is not None
            lost.update(client for client, node in held.items() if view.clients.get(client) != node)
        return lost

    def online_from_hooks(self) -> set[str]:
        """The online set an application would keep from the hooks alone: every
        client registered at the start, minus those reported orphaned, plus those
        reported restored, applied in the order the hooks were called."""
        online = {client for process in self.processes for client in process.clients}
        for report in sorted(self.reports, key=lambda report: report.t):
            if report.kind == "orphaned":
                online.difference_update(report.clients)
            else:
                online.update(report.clients)
        return online

    def leader(self) -> NodeProcess | None:
        """The running process whose latest view says it holds the lease."""
        leaders = [p for p in self.running() if p.latest is not None and p.latest.leader]
        return leaders[0] if len(leaders) == 1 else None

    def was_leader(self, index: int, at: float) -> bool:
        """Whether process ``index``'s view said it led around ``at``: its last view
        at or before ``at``, or its first one after (the lease may have been won
        between two polls)."""
        views = [view for view in self.history if view.index == index]
        before = [view for view in views if view.t <= at]
        after = [view for view in views if view.t > at]
        return (bool(before) and before[-1].leader) or (bool(after) and after[0].leader)

    def dump(self, path: Path) -> None:
        """Write every recorded view and hook report to ``path``, one JSON object a
        line, in time order, with ``t`` relative to the first view: the timeline to
        read when a scenario went wrong."""
        start = min((view.t for view in self.history), default=0.0)
        entries: list[tuple[float, dict[str, Any]]] = []
        for view in self.history:
            entry = attrs.asdict(view, recurse=False)
            entry.update(alive=sorted(view.alive), counts=dict(view.counts), clients=None)
            entries.append((view.t, {"kind": "view", **entry}))
        for report in self.reports:
            entry = attrs.asdict(report)
            entry["clients"] = len(report.clients)
            entries.append((report.t, {**entry, "kind": "report", "hook": report.kind}))
        with path.open("w") as out:
            for t, entry in sorted(entries, key=lambda item: item[0]):
                entry["t"] = round(t - start, 3)
                out.write(json.dumps(entry) + "\n")

    def crashed(self) -> list[NodeProcess]:
        """Processes that exited although no fault was meant to end them."""
        return [p for p in self.processes if p.state != "killed" and p.exited.is_set()]


@asynccontextmanager
async def open_fault_cluster(
    server: NatsServer,
    key: str,
    *,
    log_dir: Path,
    nodes: int = 3,
    clients: int = 1000,
    ttl: int = 2,
    reassert_interval: float = 10.0,
    start_timeout: float = 90.0,
) -> AsyncIterator[FaultCluster]:
    """Start ``nodes`` processes with ``clients`` clients each, wait until every
    view is whole and trustworthy and a leader is known, and poll them until the
    block ends. Leaving the block SIGKILLs every process (after a SIGCONT) and
    writes the timeline (:meth:`FaultCluster.dump`) to ``log_dir/<key>-timeline.jsonl``
    next to the processes' stderr logs.

    :raises RuntimeError: a process exited before it was ready (with its log).
    :raises trio.TooSlowError: the cluster was not whole within ``start_timeout``.
    """
    await trio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    cluster = FaultCluster(
        server,
        key,
        nodes=nodes,
        clients=clients,
        ttl=ttl,
        reassert_interval=reassert_interval,
        log_dir=log_dir,
    )
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(start_timeout):
                for process in cluster.processes:
                    await cluster._start(nursery, process)
                async with trio.open_nursery() as starting:
                    for process in cluster.processes:
                        starting.start_soon(cluster._wait_ready, process)
                for process in cluster.processes:
                    nursery.start_soon(cluster._poll_forever, process)
                while not (cluster.all_whole(trustworthy=True) and cluster.leader()):
                    await cluster.next_round()
            yield cluster
        finally:
            cluster._kill_all()
            nursery.cancel_scope.cancel()
            cluster.dump(log_dir / f"{key}-timeline.jsonl")


# ---------------------------------------------------------------------- scenarios


@attrs.frozen
class RestartResult:
    downtime_s: float
    """Seconds from the kill of the server until it answered health checks again."""
    settled: bool
    """Whether every view was whole and trustworthy for ``ttl + 1`` s in a row."""
    recovery_s: float | None
    """Seconds from the server's return until every view was whole for good."""
    false_orphans: int
    """Client entries reported to ``on_orphaned`` (no node died, so all are false)."""
    restored: int
    """Client entries reported to ``on_restored`` (registrations that went missing)."""
    lost: int
    """Held clients missing from some view once settled (or at the deadline)."""
    worst_missing: int
    """The most clients any view lacked from the fault until the end."""
    crashed: int
    """Node processes that exited on their own."""


async def restart_scenario(
    cluster: FaultCluster, downtime: float, *, timeout: float = 60.0
) -> RestartResult:
    """Kill the server, keep it down for ``downtime`` s, start it again on the same
    port and store, and wait until every view has been whole and trustworthy for
    ``ttl + 1`` s (at most ``timeout`` s)."""
    server = cluster.server
    fault = time.time()
    await trio.to_thread.run_sync(server.kill)
    await trio.sleep(downtime)
    await trio.to_thread.run_sync(server.start)
    back = time.time()
    settled = await cluster.wait_settled(back, stable_for=cluster.ttl + 1, timeout=timeout)
    views = await cluster.full_views()
    return RestartResult(
        downtime_s=back - fault,
        settled=settled,
        recovery_s=cluster.recovery_time(back),
        false_orphans=sum(len(r.clients) for r in cluster.reports_since(fault, "orphaned")),
        restored=sum(len(r.clients) for r in cluster.reports_since(fault, "restored")),
        lost=len(cluster.lost(views)),
        worst_missing=cluster.worst_missing(fault),
        crashed=len(cluster.crashed()),
    )


@attrs.frozen
class StallResult:
    stall_s: float
    settled: bool
    recovery_s: float | None
    """Seconds from SIGCONT until every view (the stalled node's too) was whole for good."""
    seen_dead: bool
    """Whether some other node dropped the stalled node from its view meanwhile."""
    orphaned: int
    """The stalled node's client entries reported to ``on_orphaned``."""
    restored: int
    """The stalled node's client entries reported to ``on_restored``."""
    false_orphans: int
    """Other nodes' client entries reported to ``on_orphaned``."""
    lost: int
    hooks_mismatch: int
    """Clients on which the online set kept from the hooks and the registry disagree."""
    unrestored: int
    """The stalled node's clients reported orphaned more often than restored."""
    crashed: int


async def stall_scenario(
    cluster: FaultCluster, stall: float, *, timeout: float = 60.0
) -> StallResult:
    """SIGSTOP a node that does not lead for ``stall`` s, SIGCONT it, and wait until
    every view has been whole and trustworthy for ``ttl + 1`` s (at most ``timeout``)."""
    leader = cluster.leader()
    victim = next(process for process in cluster.running() if process is not leader)
    fault = time.time()
    cluster.stop(victim)
    await trio.sleep(stall)
    cluster.resume(victim)
    resumed = time.time()
    settled = await cluster.wait_settled(resumed, stable_for=cluster.ttl + 1, timeout=timeout)
    views = await cluster.full_views()
    orphaned = collections.Counter(
        client
        for report in cluster.reports_since(fault, "orphaned")
        if report.node_id == victim.node_id
        for client in report.clients
    )
    restored = collections.Counter(
        client
        for report in cluster.reports_since(fault, "restored")
        if report.node_id == victim.node_id
        for client in report.clients
    )
    seen_dead = any(
        victim.node_id not in view.alive
        for view in cluster.history
        if view.index != victim.index and view.t >= fault
    )
    online = cluster.online_from_hooks()
    return StallResult(
        stall_s=resumed - fault,
        settled=settled,
        recovery_s=cluster.recovery_time(resumed),
        seen_dead=seen_dead,
        orphaned=sum(orphaned.values()),
        restored=sum(restored.values()),
        false_orphans=sum(
            len(report.clients)
            for report in cluster.reports_since(fault, "orphaned")
            if report.node_id != victim.node_id
        ),
        lost=len(cluster.lost(views)),
        hooks_mismatch=len(online ^ set(cluster.held_clients())),
        unrestored=sum(1 for client, count in orphaned.items() if count > restored[client]),
        crashed=len(cluster.crashed()),
    )


@attrs.frozen
class KillResult:
    victim_was_leader: bool
    settled: bool
    views_detect_s: float | None
    """Seconds from SIGKILL until the last other view dropped the node."""
    orphan_report_s: float | None
    """Seconds from SIGKILL until its last client had been reported orphaned."""
    reported_once: int
    """The killed node's clients reported orphaned exactly once."""
    duplicates: int
    """Extra reports of the killed node's clients, beyond the first."""
    unreported: int
    """The killed node's clients never reported orphaned."""
    reported_by_leader: bool
    """Whether every report came from a process whose view said it led."""
    false_orphans: int
    lost: int
    crashed: int


async def kill_scenario(
    cluster: FaultCluster,
    *,
    victim_role: Literal["follower", "leader"] = "follower",
    timeout: float = 60.0,
) -> KillResult:
    """SIGKILL a node (one that does not lead, or the leader), wait until its
    clients have all been reported orphaned and every other view dropped it, then
    until the views have been whole and trustworthy for ``ttl + 1`` s (to catch
    late duplicate reports)."""
    leader = cluster.leader()
    assert leader is not None
    if victim_role == "leader":
        victim = leader
    else:
        victim = next(process for process in cluster.running() if process is not leader)
    victim_clients = set(victim.clients)
    killed = time.time()
    cluster.kill(victim)

    def orphans() -> list[HookReport]:
        return [
            report
            for report in cluster.reports_since(killed, "orphaned")
            if report.node_id == victim.node_id
        ]

    def reported_all() -> bool:
        return victim_clients <= {client for report in orphans() for client in report.clients}

    await cluster.wait_for(lambda: reported_all() and cluster.all_whole(), timeout)
    settled = await cluster.wait_settled(time.time(), stable_for=cluster.ttl + 1, timeout=timeout)
    views = await cluster.full_views()

    detected: list[float | None] = [
        min(
            (
                view.t
                for view in cluster.history
                if view.index == process.index
                and view.t >= killed
                and victim.node_id not in view.alive
            ),
            default=None,
        )
        for process in cluster.running()
    ]
    views_detect_s = (
        max(t for t in detected if t is not None) - killed
        if detected and None not in detected
        else None
    )

    counts = collections.Counter(client for report in orphans() for client in report.clients)
    covered: set[str] = set()
    completed_at: float | None = None
    for report in sorted(orphans(), key=lambda report: report.t):
        covered.update(report.clients)
        if completed_at is None and victim_clients <= covered:
            completed_at = report.t
    return KillResult(
        victim_was_leader=victim is leader,
        settled=settled,
        views_detect_s=views_detect_s,
        orphan_report_s=None if completed_at is None else completed_at - killed,
        reported_once=sum(1 for client in victim_clients if counts[client] == 1),
        duplicates=sum(count - 1 for count in counts.values() if count > 1),
        unreported=sum(1 for client in victim_clients if counts[client] == 0),
        reported_by_leader=all(cluster.was_leader(r.reporter, r.t) for r in orphans()),
        false_orphans=sum(
            len(report.clients)
            for report in cluster.reports_since(killed, "orphaned")
            if report.node_id != victim.node_id
        ),
        lost=len(cluster.lost(views)),
        crashed=len(cluster.crashed()),
    )
