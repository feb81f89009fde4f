"""Small helpers shared by meshline's modules."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["call_hook", "single_exceptions"]


async def call_hook(
    hook: Callable[..., Any], name: str, *args: Any, logger: logging.Logger
) -> None:
    """Call an application hook (plain or async) with ``args``; an exception it
    raises is logged on ``logger`` as the ``name`` hook's failure, never raised."""
    try:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("the %s hook failed", name)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        else:
            leaves.append(exc)
    return leaves


@contextlib.contextmanager
def single_exceptions() -> Iterator[None]:
    """Re-raise an exception group holding exactly one exception as that exception.

    meshline's context managers run the caller's code inside nurseries (and inside
    trio-asyncio's loop), which wrap whatever escapes in an ``ExceptionGroup``. A
    caller who raised ``ValueError`` should catch ``ValueError``. Groups of several
    exceptions are real concurrency failures and propagate unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        only = leaves[0]
        raise only from only.__cause__
