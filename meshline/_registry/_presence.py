"""A client registry wired to a mesh node: fenced cleanup, re-assertion, live views.

:func:`open_client_registry` adds what a registry needs to stay true in a cluster
where nodes crash, stall and lose their connection, and where writes can be lost:

- The leader removes the registrations of dead nodes and reports them to
  ``on_orphaned``, once per cleanup pass (usually one per dead node). Cleanup is
  fenced: it removes only records written by the incarnation that was declared
  dead, it waits while the leader's own view may be stale, and it stops as soon as
  the node is seen alive again.
- Every node re-asserts its own registrations against the server now and then, and
  at once after it re-asserted its liveness (when the leader may have cleaned up
  after it). Registrations it had to write again are reported to ``on_restored``.
- Queries leave out the clients of nodes that are not alive, even before the
  cleanup has run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar, overload

import attrs
import trio

from .._errors import InvalidArgumentError, TransportClosedError, TransportError
from .._mesh._membership import MembershipEvent, MembershipEventKind
from .._mesh._node import Node
from .._transport._seam import ConnectionEvent, ConnectionEventKind, check_timeout
from .._util import call_hook, single_exceptions
from ._core import (
    ClientRecord,
    ClientRegistry,
    MetadataT,
    ReassertOutcome,
    RegisteredClient,
    RegistryBackend,
    Reloadable,
    now_ms,
)
from ._kv import open_kv_registry_backend_in_namespace

__all__ = ["NodeClientRegistry", "OrphanHandler", "RestoredHandler", "open_client_registry"]

logger = logging.getLogger("meshline.registry")

OrphanHandler = Callable[[int, list[RegisteredClient[Any]]], Awaitable[None] | None]
"""Called on the leader as ``handler(dead_node_id, orphaned_clients)``."""

RestoredHandler = Callable[[int, list[RegisteredClient[Any]]], Awaitable[None] | None]
"""Called on a node as ``handler(node_id, restored_clients)`` for its registrations
that had gone missing and were written again."""

MAX_WRITES_IN_FLIGHT = 64
"""Registry writes one cleanup or re-assertion pass keeps in flight at once: that
many worker tasks, whatever the number of registrations (a task per registration
kept the node's event loop busy for close to a second at 10,000, long enough to
hold up its own heartbeat)."""

_RETRY_DELAY = 0.5
REMOVAL_GRACE = 1.0
"""Seconds a cleanup removal already sent may still take once the cleanup is
cancelled (the lead lost, the registry closing): so that a removal that landed
is known, and reported, rather than cut off with its answer."""
"""Seconds before a failed cleanup or removal is tried again."""

_UNCERTAIN_AFTER = 1.0
"""Seconds after a failed or cancelled register before its fate is looked up."""


T = TypeVar("T")


async def _in_workers(
    items: Iterable[T], action: Callable[[T], Awaitable[None]], limit: int = MAX_WRITES_IN_FLIGHT
) -> None:
    """Run ``action`` on each item, in ``limit`` worker tasks that take the items in
    turn, so a pass over many registrations costs ``limit`` tasks, not one each.

    A worker checkpoints after every item, so actions that finish without waiting
    (a write that fails at once on a lost connection) cannot hold the event loop,
    and with it this node's heartbeat, for the whole pass.

    ``action`` handles its own failures; an exception it lets through cancels the
    other workers and is raised. Cancellation cancels the workers; items not yet
    taken are not run.
    """
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await action(item)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(limit):
            nursery.start_soon(worker)


@attrs.define
class _Own:
    """One registration this node made, as it remembers it."""

    token: int
    metadata: bytes
    certain: bool
    """False while it is unknown whether the write landed (it failed, or was
    cancelled, mid-call); the next re-assertion pass finds out."""
    since: float


@attrs.frozen
class _Report:
    hook: str
    node_id: int
    records: list[ClientRecord]


class NodeClientRegistry(ClientRegistry[MetadataT], Generic[MetadataT]):
    """A :class:`ClientRegistry` bound to a live :class:`Node`.

    Reads leave out clients whose node is not alive in the node's membership view.
    Writes also keep a list of this node's own registrations (with their tokens),
    which re-assertion writes again if they went missing. That list stays right
    under cancellation: a register or unregister interrupted mid-call is resolved
    against the registry afterwards, and a removal that failed is retried.
    """

    def __init__(self, node: Node, backend: RegistryBackend, *, metadata_type: Any) -> None:
        super().__init__(node.id, backend, metadata_type=metadata_type)
        self.node = node
        self._own: dict[str, _Own] = {}
        self._removals: dict[str, int] = {}
        """Own registrations whose removal failed: client id -> token. Retried."""
        self._wake = trio.Event()
        self._reports: trio.MemorySendChannel[_Report] | None = None
        self.reassert_failures = 0
        """Re-assertion or removal writes that failed (they are retried)."""
        self.cleanup_pauses = 0
        """Times a cleanup of a dead node's registrations paused, on the leader,
        because this node's view could not be trusted (it resumes where it was)."""
        self.cleanup_restarts = 0
        """Times a cleanup pass ended with removals left undone (failed writes) and
        started over with a fresh listing of the dead node's registrations."""

    @property
    def incarnation(self) -> int:
        """The node's current incarnation, recorded with every write."""
        return self.node.incarnation

    def holds(self, client_id: str) -> bool:
        """Whether this node registered ``client_id`` and has not unregistered it."""
        return client_id in self._own

    # ------------------------------------------------------------------ writes

    async def _register_encoded(self, client_id: str, encoded: bytes, token: int) -> int | None:
        entry = _Own(token, encoded, certain=False, since=trio.current_time())
        self._own[client_id] = entry
        self._removals.pop(client_id, None)
        try:
            superseded = await super()._register_encoded(client_id, encoded, token)
        except BaseException:
            self._wake.set()
            raise
        entry.certain = True
        return superseded

    async def unregister(self, client_id: str, *, token: int | None = None) -> bool:
        """Remove the registration if this node owns it (and, with ``token``, only
        if it is that registration); return whether it did.

        If the call fails or is cancelled, the removal is retried in the background
        until it is done or the registration is no longer this node's.
        """
        entry = self._own.get(client_id)
        mine = entry is not None and (token is None or entry.token == token)
        if mine and entry is not None:
            del self._own[client_id]
        try:
            return await super().unregister(client_id, token=token)
        except BaseException:
            if mine and entry is not None:
                self._removals[client_id] = entry.token
                self._wake.set()
            raise

    async def _update_encoded(self, client_id: str, encoded: bytes, token: int | None) -> bool:
        entry = self._own.get(client_id)
        mine = entry is not None and (token is None or entry.token == token)
        if mine and entry is not None:
            entry.metadata = encoded
        updated = await super()._update_encoded(client_id, encoded, token)
        if not updated and mine and self._own.get(client_id) is entry:
            del self._own[client_id]
        return updated

    # ------------------------------------------------------------------ reads

    async def get_client(self, client_id: str) -> RegisteredClient[MetadataT] | None:
        client = await super().get_client(client_id)
        if client is None or not self.node.is_alive(client.node_id):
            return None
        return client

    async def list_clients(self) -> list[RegisteredClient[MetadataT]]:
        alive = self.node.alive_nodes()
        return [client for client in await super().list_clients() if client.node_id in alive]

    async def list_clients_for_node(
        self, node_id: int | None = None
    ) -> list[RegisteredClient[MetadataT]]:
        node = self.node.id if node_id is None else node_id
        if not self.node.is_alive(node):
            return []
        return await super().list_clients_for_node(node)

    async def count_clients_for_node(self, node_id: int | None = None) -> int:
        node = self.node.id if node_id is None else node_id
        if not self.node.is_alive(node):
            return 0
        return await super().count_clients_for_node(node)

    async def count_clients(self) -> int:
        """How many clients are registered on the alive nodes."""
        total = 0
        for node_id in self.node.alive_nodes():
            total += await self.backend.count_clients_for_node(node_id)
        return total

    # ------------------------------------------------------------------ re-assertion

    async def reassert(self) -> int:
        """Re-assert every own registration against the server; return how many
        had gone missing and were written again.

        Each write is authoritative (create where absent, compare-and-set where
        present) and carries the node's current incarnation, so a cleanup of an
        older incarnation cannot remove it. A registration that another node or a
        newer registration now holds is forgotten, never taken back. Restored ones
        are reported to ``on_restored`` as they land, in batches. A write that fails
        is counted and left for the next pass.

        :raises TransportError: some writes failed (the others went ahead).
        """
        incarnation = self.node.incarnation
        restored: list[ClientRecord] = []
        failures: list[TransportError] = []
        now = trio.current_time()

        async def reassert_one(client_id: str, entry: _Own) -> None:
            if self._own.get(client_id) is not entry:
                return
            try:
                if not entry.certain:
                    await self._resolve(client_id, entry)
                    return
                outcome = await self.backend.reassert(
                    client_id,
                    self.node_id,
                    entry.metadata,
                    token=entry.token,
                    incarnation=incarnation,
                )
            except TransportClosedError:
                raise
            except TransportError as exc:
                failures.append(exc)
                return
            if outcome is not ReassertOutcome.GONE and self._own.get(client_id) is not entry:
                # Unregistered while the write was in flight: an unregister that
                # found nothing to remove (a cleanup had) must not be undone by it.
                self._removals.setdefault(client_id, entry.token)
                await remove_one(client_id, entry.token)
                return
            if outcome is ReassertOutcome.RESTORED:
                record = ClientRecord(
                    client_id, self.node_id, now_ms(), entry.metadata, entry.token, incarnation
                )
                restored.append(record)
                self._report("on_restored", self.node_id, [record])
            elif outcome is ReassertOutcome.GONE and self._own.get(client_id) is entry:
                del self._own[client_id]

        async def remove_one(client_id: str, token: int) -> None:
            try:
                await ClientRegistry.unregister(self, client_id, token=token)
            except TransportClosedError:
                raise
            except TransportError as exc:
                failures.append(exc)
                return
            if self._removals.get(client_id) == token:
                del self._removals[client_id]

        async def one(item: tuple[str, _Own | int]) -> None:
            client_id, what = item
            if isinstance(what, _Own):
                await reassert_one(client_id, what)
            else:
                await remove_one(client_id, what)

        work: list[tuple[str, _Own | int]] = [
            (client_id, entry)
            for client_id, entry in self._own.items()
            if entry.certain or now - entry.since >= _UNCERTAIN_AFTER
        ]
        work.extend(self._removals.items())
        await _in_workers(work, one)
        if restored:
            logger.warning(
                "node %d: %d registrations had gone missing and were restored",
                self.node_id,
                len(restored),
            )
        if failures:
            self.reassert_failures += len(failures)
            raise TransportError(
                f"{len(failures)} registry writes failed while re-asserting: {failures[0]}"
            )
        return len(restored)

    async def _resolve(self, client_id: str, entry: _Own) -> None:
        """Find out whether a register that failed or was cancelled mid-call landed:
        keep it if the registry holds it under its token, else forget it."""
        record = await self.backend.get_client(client_id)
        if record is not None and record.node_id == self.node_id and record.token == entry.token:
            entry.certain = True
        elif self._own.get(client_id) is entry:
            del self._own[client_id]

    def _report(self, hook: str, node_id: int, records: list[ClientRecord]) -> None:
        if self._reports is None or not records:
            return
        try:
            self._reports.send_nowait(_Report(hook, node_id, records))
        except trio.ClosedResourceError:  # the registry closed; never raise from here
            logger.error(
                "node %d: %d client(s) of node %d for %s not reported: the registry had closed",
                self.node_id,
                len(records),
                node_id,
                hook,
            )

    async def _remove_own(self) -> None:
        """Remove every own registration (ownership- and token-safe), concurrently."""
        targets = {client_id: entry.token for client_id, entry in self._own.items()}
        targets.update(self._removals)
        failures: list[tuple[str, TransportError]] = []

        async def remove(target: tuple[str, int]) -> None:
            client_id, token = target
            try:
                await ClientRegistry.unregister(self, client_id, token=token)
            except TransportError as exc:
                failures.append((client_id, exc))

        try:
            await _in_workers(list(targets.items()), remove)
        finally:
            if failures:
                client_id, exc = failures[0]
                logger.warning(
                    "node %d: could not remove %d registrations on exit, %r the first (%s); "
                    "the leader's cleanup removes them once this node is seen dead",
                    self.node_id,
                    len(failures),
                    client_id,
                    exc,
                )
        self._own.clear()
        self._removals.clear()


@overload
def open_client_registry(
    node: Node,
    *,
    backend: RegistryBackend | None = None,
    metadata_type: type[MetadataT],
    on_orphaned: OrphanHandler | None = None,
    on_restored: RestoredHandler | None = None,
    reassert_interval: float = 10.0,
) -> AbstractAsyncContextManager[NodeClientRegistry[MetadataT]]: ...


@overload
def open_client_registry(
    node: Node,
    *,
    backend: RegistryBackend | None = None,
    on_orphaned: OrphanHandler | None = None,
    on_restored: RestoredHandler | None = None,
    reassert_interval: float = 10.0,
) -> AbstractAsyncContextManager[NodeClientRegistry[dict[Any, Any]]]: ...


@overload
def open_client_registry(
    node: Node,
    *,
    backend: RegistryBackend | None = None,
    metadata_type: Any,
    on_orphaned: OrphanHandler | None = None,
    on_restored: RestoredHandler | None = None,
    reassert_interval: float = 10.0,
) -> AbstractAsyncContextManager[NodeClientRegistry[Any]]: ...


@asynccontextmanager
async def open_client_registry(
    node: Node,
    *,
    backend: RegistryBackend | None = None,
    metadata_type: Any = dict,
    on_orphaned: OrphanHandler | None = None,
    on_restored: RestoredHandler | None = None,
    reassert_interval: float = 10.0,
) -> AsyncIterator[NodeClientRegistry[Any]]:
    """A client registry for ``node``, with cleanup and re-assertion, for the block.

    :param backend: where registrations live; by default the KV backend on the node's
        transport, in a bucket of the node's mesh.
    :param metadata_type: what metadata decodes into (see :class:`ClientRegistry`);
        the registry is typed after it (``NodeClientRegistry[Session]`` for
        ``metadata_type=Session``; ``dict`` by default).
    :param on_orphaned: called on the leader as ``(dead_node_id, clients)`` with the
        registrations it removed for a dead node: one call per cleanup pass, when
        the pass is over (or stopped: the node came back, this node lost the lead,
        or the registry closed): usually one per dead node; another pass follows
        when a removal failed, or when the node came back and died again.
        A client whose metadata does not decode is still reported, with the raw
        bytes as its metadata.
    :param on_restored: called on this node as ``(node_id, clients)`` with its own
        registrations that had gone missing (the leader cleaned up after a false
        death, or the store lost them) and were written again. With both hooks, a
        flap reads as offline then online, never silently.
    :param reassert_interval: seconds between re-assertions of this node's own
        registrations.

    Hooks run one call at a time in a task of their own, so a slow hook delays
    neither cleanup nor re-assertion; an exception from a hook is logged.

    On exit, this node's own registrations are removed (ownership- and
    token-safe), shielded, within 2 seconds.
    """
    check_timeout(reassert_interval)
    if backend is None:
        async with open_kv_registry_backend_in_namespace(
            node.transport, node.key, node.namespace
        ) as kv_backend:
            async with open_client_registry(
                node,
                backend=kv_backend,
                metadata_type=metadata_type,
                on_orphaned=on_orphaned,
                on_restored=on_restored,
                reassert_interval=reassert_interval,
            ) as kv_registry:
                yield kv_registry
        return
    if not isinstance(backend, RegistryBackend):
        raise InvalidArgumentError(f"{backend!r} does not implement RegistryBackend")
    registry: NodeClientRegistry[Any] = NodeClientRegistry(
        node, backend, metadata_type=metadata_type
    )
    hooks: dict[str, Callable[..., Any] | None] = {
        "on_orphaned": on_orphaned,
        "on_restored": on_restored,
    }
    # Unbounded on purpose: each report stands for registrations already removed or
    # restored, so dropping one would make the application's picture wrong, and the
    # backlog is bounded by the number of registrations.
    send_reports, receive_reports = trio.open_memory_channel[_Report](math.inf)
    registry._reports = send_reports

    reports_delivered = trio.Event()

    async def deliver_reports() -> None:
        try:
            await deliver_each_report()
        finally:
            reports_delivered.set()

    async def deliver_each_report() -> None:
        async for report in receive_reports:
            batch = [report]
            while True:
                try:
                    batch.append(receive_reports.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    # EndOfChannel: the registry is closing; deliver what was taken.
                    break
            grouped: dict[tuple[str, int], list[ClientRecord]] = {}
            for item in batch:
                grouped.setdefault((item.hook, item.node_id), []).extend(item.records)
            for (name, node_id), records in grouped.items():
                hook = hooks[name]
                if hook is None:
                    continue
                clients = [registry.decode_client(record, lenient=True) for record in records]
                await call_hook(hook, name, node_id, clients, logger=logger)

    cleaning: dict[int, int | None] = {}
    """Dead nodes being cleaned up now -> the incarnation being cleaned up."""

    async def clean_up(dead: int) -> None:
        """Remove the dead incarnation's records of ``dead``, reporting each pass.

        Each pass lists them and removes them (see :func:`clean_pass`); a pass that
        left failed removals behind is followed by a fresh one, and so is a pass
        during which ``dead`` came back and died again as a newer incarnation
        (:func:`start_cleanup` raised the incarnation to clean up to). Stops once
        ``dead`` is seen alive again. Cancellation (the term ends, or the registry
        closes) cancels the removals in flight; whatever was removed is reported.
        """
        try:
            while True:
                await node.wait_for_trustworthy_view()
                if node.is_alive(dead):
                    logger.info("node %d is alive again; its cleanup stops", dead)
                    return
                incarnation = cleaning[dead]
                targets = [
                    record
                    for record in await backend.list_clients_for_node(dead)
                    if incarnation is None or record.incarnation <= incarnation
                ]
                failed = await clean_pass(dead, incarnation, targets)
                if failed is None:
                    # Seen alive again: the loop's top stops, unless the node died
                    # again (as a newer incarnation) while removals were in flight.
                    continue
                if not failed:
                    if cleaning[dead] == incarnation:
                        return
                    # It came back and died again meanwhile, as a newer incarnation:
                    # the records that one re-asserted are left, so go on with them.
                    logger.info(
                        "node %d died again as incarnation %s during its cleanup; "
                        "cleaning up that incarnation too",
                        dead,
                        cleaning[dead],
                    )
                    continue
                registry.cleanup_restarts += 1
                logger.warning(
                    "node %d: %d removals of node %d's registrations failed; starting over "
                    "in %.1f s",
                    node.id,
                    failed,
                    dead,
                    _RETRY_DELAY,
                )
                await trio.sleep(_RETRY_DELAY)
        finally:
            del cleaning[dead]

    async def clean_pass(
        dead: int, incarnation: int | None, targets: list[ClientRecord]
    ) -> int | None:
        """Remove ``targets`` (fenced by ``incarnation``) and report what was
        removed; return how many removals failed, or None if ``dead`` was seen
        alive again meanwhile.

        What the pass removed is reported in one ``on_orphaned`` call when it ends
        (done, stopped, or cancelled), not in pieces as the removals land (the
        report task may still merge two passes' reports into one call). A removal
        already sent when the pass is cancelled gets :data:`REMOVAL_GRACE` seconds
        to end, shielded, so that one that landed is known and reported.

        :data:`MAX_WRITES_IN_FLIGHT` workers take the records in turn. While this
        node's view cannot be trusted they pause, and they go on where they were once
        it can: the pass is not started over for it (at 10,000 records, a pass
        started over with a task per record kept the event loop busy long enough to
        hold up this node's own heartbeat, which made the view untrustworthy again).
        Cancellation cancels the removals in flight.
        """
        failed = 0
        alive_again = False
        resumed: trio.Event | None = None

        async def wait_until_trusted() -> None:
            """Wait for a trustworthy view: the first worker to find it untrustworthy
            waits (and logs), the others wait for that one."""
            nonlocal resumed
            if resumed is not None:
                await resumed.wait()
                return
            resumed = trio.Event()
            registry.cleanup_pauses += 1
            logger.warning(
                "node %d: cleanup of node %d pauses: this node's view cannot be trusted "
                "now (disconnected, just reconnected, or its own heartbeat came back late)",
                node.id,
                dead,
            )
            try:
                await node.wait_for_trustworthy_view()
            finally:
                resumed.set()
                resumed = None
            logger.info("node %d: cleanup of node %d resumes", node.id, dead)

        async def remove(record: ClientRecord) -> None:
            nonlocal failed, alive_again
            while not node.view_is_trustworthy and not alive_again:
                await wait_until_trusted()
            if alive_again or node.is_alive(dead):
                alive_again = True
                return
            await trio.lowlevel.checkpoint_if_cancelled()  # no new removal once cancelled
            try:
                with trio.CancelScope(shield=True) as in_flight:
                    removals_in_flight.add(in_flight)
                    try:
                        record_removed = await backend.cleanup_client(
                            record.client_id, dead, incarnation=incarnation
                        )
                    finally:
                        removals_in_flight.discard(in_flight)
                if in_flight.cancelled_caught:  # its grace ran out: unknown, so failed
                    raise TransportError("the removal did not end in time")
            except TransportClosedError:
                raise
            except TransportError as exc:
                failed += 1
                # The first failure of a pass is a warning; the rest (a lost
                # connection fails every removal at once) are counted in the
                # pass's summary, not logged one by one.
                log = logger.warning if failed == 1 else logger.debug
                log("cleanup of a client of node %d failed (%s)", dead, exc)
                return
            if record_removed is not None:
                removed.append(record_removed)

        async def grace_once_cancelled() -> None:
            """When the pass is cancelled, give the removals in flight
            :data:`REMOVAL_GRACE` seconds to end (they are shielded until then)."""
            try:
                await trio.sleep_forever()
            finally:
                deadline = trio.current_time() + REMOVAL_GRACE
                for scope in removals_in_flight:
                    scope.deadline = min(scope.deadline, deadline)

        removed: list[ClientRecord] = []
        removals_in_flight: set[trio.CancelScope] = set()
        try:
            async with trio.open_nursery() as grace:
                grace.start_soon(grace_once_cancelled)
                await _in_workers(targets, remove)
                grace.cancel_scope.cancel()
        finally:
            registry._report("on_orphaned", dead, removed)
        return None if alive_again else failed

    duty_ended: trio.Event | None = None
    """Set once the running leader duty (its cleanups too) has ended."""

    async def leader_duty() -> None:
        nonlocal duty_ended
        ended = duty_ended = trio.Event()
        try:
            await lead()
        finally:
            ended.set()

    async def lead() -> None:
        async with node.membership_events() as events, trio.open_nursery() as nursery:

            def start_cleanup(dead: int, incarnation: int | None) -> None:
                if dead in cleaning:
                    current = cleaning[dead]
                    if current is not None and (incarnation is None or incarnation > current):
                        cleaning[dead] = incarnation  # the running cleanup picks it up
                    return
                cleaning[dead] = incarnation
                nursery.start_soon(clean_up, dead)

            await node.wait_for_trustworthy_view()
            # The by-node index, not a listing of every registration.
            owners = await backend.node_ids()
            for owner in sorted(owners - node.alive_nodes()):
                start_cleanup(owner, node.incarnation_of(owner))
            async for event in events:
                if event.kind is MembershipEventKind.DOWN and event.node_id is not None:
                    start_cleanup(event.node_id, event.incarnation)

    def on_event(event: MembershipEvent) -> None:
        if event.kind is MembershipEventKind.REASSERTED and event.node_id == node.id:
            registry._wake.set()

    def on_connection(event: ConnectionEvent) -> None:
        if event.kind is ConnectionEventKind.RECONNECTED and isinstance(backend, Reloadable):
            backend.request_reload()

    async def keep_asserting() -> None:
        while True:
            wake_up = registry._wake
            with trio.move_on_after(reassert_interval):
                await wake_up.wait()
            if wake_up.is_set():
                registry._wake = trio.Event()
            try:
                restored = await registry.reassert()
            except TransportClosedError:
                raise
            except TransportError as exc:
                logger.warning("node %d: re-asserting registrations failed (%s)", node.id, exc)
                await trio.sleep(_RETRY_DELAY)
                registry._wake.set()
                continue
            if restored:
                logger.info("node %d re-asserted %d registrations", node.id, restored)

    with single_exceptions():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver_reports)
            remove_handler = node.add_membership_handler(on_event)
            remove_listener = node.transport.add_connection_listener(on_connection)
            remove_duty = node.add_leader_duty(leader_duty)
            nursery.start_soon(keep_asserting)
            try:
                yield registry
            finally:
                remove_duty()
                remove_handler()
                remove_listener()
                with trio.move_on_after(2.0, shield=True):
                    if duty_ended is not None:  # its cleanups report what they removed
                        await duty_ended.wait()
                    await registry._remove_own()
                    send_reports.close()
                    await reports_delivered.wait()
                nursery.cancel_scope.cancel()
