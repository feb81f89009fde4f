"""Leader duties: tasks that run while this node leads, one nursery per term."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

__all__ = ["Duties", "Duty"]

logger = logging.getLogger("meshline.node")

Duty = Callable[[], Awaitable[None]]


class Duties:
    """The leader duties of one node, and the nursery of the term running them."""

    def __init__(self, *, retry_interval: float) -> None:
        self.node_id = 0
        self._retry_interval = retry_interval
        self._duties: list[Duty] = []
        self._scopes: dict[Duty, trio.CancelScope] = {}
        self._term: trio.Nursery | None = None

    @property
    def in_term(self) -> bool:
        """Whether a term's nursery is open (duties added now start at once)."""
        return self._term is not None

    def add(self, duty: Duty) -> Callable[[], None]:
        """Run ``duty`` in every term from now on, and in the current one at once.

        Returns a function that removes it and cancels it if it is running.
        """
        self._duties.append(duty)
        if self._term is not None:
            self._term.start_soon(self._run, duty)

        def remove() -> None:
            if duty in self._duties:
                self._duties.remove(duty)
            scope = self._scopes.pop(duty, None)
            if scope is not None:
                scope.cancel()

        return remove

    @asynccontextmanager
    async def term(self) -> AsyncIterator[None]:
        """Run every duty for the duration of the block: one term.

        Leaving the block cancels the duties, and waits until they have finished.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._term = nursery
                for duty in list(self._duties):
                    nursery.start_soon(self._run, duty)
                yield
                nursery.cancel_scope.cancel()
        finally:
            self._term = None

    async def _run(self, duty: Duty) -> None:
        """Run ``duty`` for the term; restart it after an error; stop when removed
        (also when it was removed after this task was started, before it ran)."""
        if duty not in self._duties:
            return
        with trio.CancelScope() as scope:
            self._scopes[duty] = scope
            try:
                while True:
                    try:
                        await duty()
                        return
                    except Exception:
                        logger.exception(
                            "node %d: leader duty %r failed; restarting it", self.node_id, duty
                        )
                    await trio.sleep(self._retry_interval)
            finally:
                if self._scopes.get(duty) is scope:
                    del self._scopes[duty]
