"""Declared request and broadcast types: a wire name bound to Python types; and the
handlers registered for them.

Declaring a type once and passing the declaration to both sides lets a type checker
see that the sender's data, the handler's parameter and the reply all agree, and lets
msgspec validate payloads on arrival. Plain strings work too; their payloads decode
into msgspec's generic values (dicts, lists, strings, numbers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs

from .._transport._names import check_name

__all__ = [
    "BroadcastType",
    "Handler",
    "RequestType",
    "call_handler",
    "qualified_name",
    "resolve_name",
]

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
DataT = TypeVar("DataT")


def _check_type_name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_name(value, "message type")


@attrs.frozen
class RequestType(Generic[RequestT, ResponseT]):
    """A node request type: its name, the type of its data, and the type of its answer.

    ``request`` and ``response`` are anything msgspec can decode into: a
    ``msgspec.Struct``, an attrs class, a dataclass, a builtin, or ``typing.Any``.

    .. code-block:: python

        class Add(msgspec.Struct):
            a: int
            b: int

        ADD = meshline.RequestType("add", Add, int)
    """

    name: str = attrs.field(validator=_check_type_name)
    request: type[RequestT]
    response: type[ResponseT]


@attrs.frozen
class BroadcastType(Generic[DataT]):
    """A broadcast type: its name and the type of its data.

    .. code-block:: python

        CONFIG_CHANGED = meshline.BroadcastType("config-changed", list[str])
    """

    name: str = attrs.field(validator=_check_type_name)
    data: type[DataT]


_checked_names: set[str] = set()
"""Plain type names already validated: checking costs a UTF-8 encode per call."""
_CHECKED_NAMES_LIMIT = 4096


def resolve_name(kind: str | RequestType[Any, Any] | BroadcastType[Any]) -> str:
    """The wire name of a declaration or a plain string type name."""
    if kind.__class__ is str and kind in _checked_names:
        return kind
    if isinstance(kind, RequestType | BroadcastType):
        return kind.name
    name = check_name(kind, "message type")
    if len(_checked_names) < _CHECKED_NAMES_LIMIT:
        _checked_names.add(name)
    return name


class Handler:
    """A registered handler and the type its data decodes into."""

    __slots__ = ("data_type", "function", "is_async")

    def __init__(self, function: Callable[..., Any], data_type: Any) -> None:
        self.function = function
        self.data_type = data_type
        self.is_async = inspect.iscoroutinefunction(function)
        """Known coroutine functions are awaited directly; anything else goes
        through :func:`call_handler`, which also copes with plain functions."""


async def call_handler(function: Callable[..., Any], *args: Any) -> Any:
    """Call a handler that may be a plain function or a coroutine function."""
    result = function(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def qualified_name(exc: BaseException) -> str:
    """The name of ``exc``'s class as error replies carry it (builtins unqualified)."""
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
