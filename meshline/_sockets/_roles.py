"""Roles: what each kind of connection may call and emit, and the handlers that answer.

A :class:`Role` is declared once, before the server starts::

    user = Role("user", data=UserData)

    @user.call("chat.send", input=ChatIn, output=ChatOut)
    async def send(conn: Connection, data: ChatIn) -> ChatOut: ...

    @user.on("typing", Typing)
    async def typing(conn: Connection, data: Typing) -> None: ...

The ``authenticate`` hook gives every connection its role by name. A call is
answered by the handler its role declares; a call that only other roles declare
is ``forbidden``, one nobody declares is ``unknown_call``. Input is decoded
with msgspec straight from the frame's payload into the declared type (a
msgspec ``Struct``, an attrs class, a dataclass, a ``TypedDict``, builtins, or
``Any``); a payload that does not fit is a ``bad_input`` error answer, never a
closed connection.

This module also holds the small checks every public name goes through:
:func:`check_name` (call, event, room and topic names, client ids: any string
up to :data:`MAX_NAME_BYTES` UTF-8 bytes).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from .._errors import InvalidArgumentError
from ._codes import ErrorCode

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = [
    "MAX_NAME_BYTES",
    "TOO_MANY_CALLS",
    "CallSpec",
    "EventSpec",
    "Role",
    "RoleTable",
    "check_name",
    "check_timeout",
]

MAX_NAME_BYTES = 1024
"""The longest call, event, room or topic name, or client id, in UTF-8 bytes.

Names are otherwise arbitrary: dots, ``*``, ``>``, spaces, newlines, any script.
They never go into a NATS subject as they are (the cluster layer encodes them)."""

TOO_MANY_CALLS = ErrorCode.TOO_MANY_CALLS
"""The error code of a call refused because the connection already has
``max_concurrent_calls`` handlers running."""

In = TypeVar("In")
Out = TypeVar("Out")

CallHandler = Callable[["Connection", Any], Awaitable[Any]]
EventHandler = Callable[["Connection", Any], Awaitable[None] | None]


def check_name(value: object, what: str = "name") -> str:
    """``value`` if it is a string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes.

    :raises InvalidArgumentError: not a string, empty, too long, or holding lone
        surrogates (which no encoding can carry).
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string: {value!r}")
    if not value:
        raise InvalidArgumentError(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{what} holds lone surrogates: {value!r}") from None
    if size > MAX_NAME_BYTES:
        raise InvalidArgumentError(
            f"{what} is {size} UTF-8 bytes long, over the limit of {MAX_NAME_BYTES}"
        )
    return value


def check_timeout(value: object, what: str = "timeout", *, allow_none: bool = True) -> None:
    """Check a timeout in seconds: a positive number (``math.inf`` allowed), or None.

    :raises InvalidArgumentError: anything else.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"{what} must be a number of seconds: {value!r}")
    if math.isnan(value) or value <= 0:
        raise InvalidArgumentError(f"{what} must be positive: {value!r}")


@attrs.frozen
class CallSpec:
    """A client-to-server call declared by a role."""

    name: str
    input: Any
    """The type the payload is decoded into."""
    output: Any
    """The type the handler returns (documentation for clients; encoded as returned)."""
    handler: CallHandler
    timeout: float | None
    """This call's own timeout in seconds (None: the server's ``call_timeout``)."""


@attrs.frozen
class EventSpec:
    """A client-to-server event a role may send."""

    name: str
    data_type: Any
    handler: EventHandler | None
    """Called with the connection and the decoded data (sync or async), or None
    to accept the event and do nothing with it."""
    is_async: bool


class Role:
    """A kind of connection: the calls it may make, the events it may send, its data.

    ``name`` is what ``authenticate`` returns in its :class:`Admission`. ``data``
    is an attrs class (or any class whose constructor takes no arguments):
    each connection of this role gets a fresh instance as :attr:`Connection.data
    <meshline.Connection.data>`.

    Declare calls with :meth:`call` and events with :meth:`on`, before the server
    starts; the server checks the declarations when it opens.

    :raises InvalidArgumentError: a bad name, or ``data`` that is not a class.
    """

    def __init__(self, name: str, *, data: type[Any] | None = None) -> None:
        self.name = check_name(name, "role name")
        if data is not None and not isinstance(data, type):
            raise InvalidArgumentError(f"data must be a class: {data!r}")
        self.data_type = data
        self._calls: dict[str, CallSpec] = {}
        self._events: dict[str, EventSpec] = {}

    @property
    def calls(self) -> Mapping[str, CallSpec]:
        """The calls this role may make, by name."""
        return dict(self._calls)

    @property
    def events(self) -> Mapping[str, EventSpec]:
        """The events this role may send, by name."""
        return dict(self._events)

    def new_data(self) -> Any:
        """A fresh :attr:`Connection.data <meshline.Connection.data>` for a connection
        of this role (None when the role declares no data class)."""
        return None if self.data_type is None else self.data_type()

    def call(
        self,
        name: str,
        *,
        input: Any = Any,
        output: Any = Any,
        timeout: float | None = None,
    ) -> Callable[
        [Callable[[Connection, In], Awaitable[Out]]], Callable[[Connection, In], Awaitable[Out]]
    ]:
        """Declare the call ``name``: decorates ``async def handler(conn, data) -> output``.

        The payload is decoded into ``input`` before the handler runs. The handler
        answers by returning (the value is encoded as it is), or by raising
        :class:`~meshline.SocketError` (an application error with its own code);
        any other exception is logged with its traceback and answered with error
        code ``internal``. ``timeout`` overrides the server's ``call_timeout`` for
        this call (``math.inf``: none).

        The handler runs in its own task, concurrently with the connection's other
        calls. It is cancelled when the client cancels the call (answered
        ``cancelled``), when its timeout passes (answered ``timeout``), and when
        the connection ends (not answered: there is nobody left).

        :raises InvalidArgumentError: a bad name, a name already declared on this
            role, a handler that is not an async function, or a bad timeout.
        """
        check_name(name, "call name")
        check_timeout(timeout)
        if name in self._calls:
            raise InvalidArgumentError(f"role {self.name!r} already declares call {name!r}")

        def decorate(
            handler: Callable[[Connection, In], Awaitable[Out]],
        ) -> Callable[[Connection, In], Awaitable[Out]]:
            if not inspect.iscoroutinefunction(handler):
                raise InvalidArgumentError(
                    f"the handler of call {name!r} must be an async function: {handler!r}"
                )
            self._calls[name] = CallSpec(name, input, output, handler, timeout)
            return handler

        return decorate

    def on(
        self, event: str, data_type: Any = Any
    ) -> Callable[[Callable[[Connection, In], Any]], Callable[[Connection, In], Any]]:
        """Declare that this role may send the event ``event``: decorates
        ``handler(conn, data)``, a plain or an async function.

        The data is decoded into ``data_type``. A plain handler runs at once, in
        the connection's reader (so events are handled in the order they came,
        and a slow handler holds up the connection's other frames); an async one
        runs in its own task, concurrently with everything else. An event the role
        does not declare, or whose data does not fit, is dropped, counted on the
        connection and logged at debug level: events are never answered.
        Exceptions from the handler are logged and dropped.

        :raises InvalidArgumentError: a bad name, or one already declared on this role.
        """
        check_name(event, "event name")
        if event in self._events:
            raise InvalidArgumentError(f"role {self.name!r} already declares event {event!r}")

        def decorate(
            handler: Callable[[Connection, In], Any],
        ) -> Callable[[Connection, In], Any]:
            if not callable(handler):
                raise InvalidArgumentError(f"the handler of event {event!r} must be callable")
            self._events[event] = EventSpec(
                event, data_type, handler, inspect.iscoroutinefunction(handler)
            )
            return handler

        return decorate

    def __repr__(self) -> str:
        return f"<Role {self.name!r} calls={sorted(self._calls)} events={sorted(self._events)}>"


class RoleTable:
    """The roles of one server, with the indexes that answer a call in one lookup.

    :raises InvalidArgumentError: no roles, something that is not a :class:`Role`,
        or two roles of the same name.
    """

    def __init__(self, roles: object) -> None:
        if isinstance(roles, Role):
            roles = [roles]
        if isinstance(roles, Mapping):
            roles = list(roles.values())
        if not isinstance(roles, list | tuple | set | frozenset):
            raise InvalidArgumentError(f"roles must be a list of Role: {roles!r}")
        by_name: dict[str, Role] = {}
        for role in roles:
            if not isinstance(role, Role):
                raise InvalidArgumentError(f"not a Role: {role!r}")
            if role.name in by_name:
                raise InvalidArgumentError(f"two roles are named {role.name!r}")
            by_name[role.name] = role
        if not by_name:
            raise InvalidArgumentError("a socket server needs at least one role")
        self.by_name: Mapping[str, Role] = by_name
        self.declared_calls: frozenset[str] = frozenset(
            name for role in by_name.values() for name in role.calls
        )
        """Every call name some role declares (to tell ``forbidden`` from ``unknown_call``)."""
        self.calls: Mapping[str, Mapping[str, CallSpec]] = {
            name: role.calls for name, role in by_name.items()
        }
        self.events: Mapping[str, Mapping[str, EventSpec]] = {
            name: role.events for name, role in by_name.items()
        }

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    @property
    def only(self) -> Role | None:
        """The single role, when there is exactly one."""
        if len(self.by_name) == 1:
            return next(iter(self.by_name.values()))
        return None
