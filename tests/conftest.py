"""Fixtures: real nats-server processes, and transports of both kinds.

``transport_kind`` parametrises behaviour tests over ``memory`` and ``nats``. Tests
that take ``clock`` run on ``MockClock(autojump_threshold=0)`` for memory and on the
real clock for NATS, so sleeps are instant on memory and real on NATS.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio.testing
from hypothesis import settings

import meshline
from meshline.testing import NatsServer, nats_cluster

_names = itertools.count()

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One JetStream server shared by the whole session. Do not stop it."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def private_nats_server() -> Iterator[NatsServer]:
    """A server of this test's own, free to stop, kill and restart."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def nats_servers3() -> Iterator[list[NatsServer]]:
    """A 3-server routed cluster with clustered JetStream."""
    with nats_cluster(3) as servers:
        yield servers


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Make names unique per test, so tests can share one server."""

    def make(prefix: str) -> str:
        return f"{prefix}{next(_names)}"

    return make


@pytest.fixture(params=["memory", "nats"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock(transport_kind: str) -> trio.abc.Clock | None:
    if transport_kind == "memory":
        return trio.testing.MockClock(autojump_threshold=0)
    return None


OpenTransport = Callable[[], AbstractAsyncContextManager[meshline.Transport]]


@pytest.fixture
def open_transport(transport_kind: str, request: pytest.FixtureRequest) -> OpenTransport:
    """Open another transport on the same hub (memory) or server (NATS)."""
    if transport_kind == "memory":
        hub = meshline.MemoryHub()
        return lambda: meshline.open_memory_transport(hub)
    server: NatsServer = request.getfixturevalue("nats_server")
    return lambda: meshline.open_nats_transport(server.url)


@pytest.fixture
async def transport(open_transport: OpenTransport) -> AsyncIterator[meshline.Transport]:
    async with open_transport() as opened:
        yield opened


@pytest.fixture(params=["direct", "get_message"])
def reading_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a socket test twice: with messages handed over in trio-websocket's
    reader task (the default), and read with ``get_message`` (what happens with a
    trio-websocket whose internals are not the expected ones)."""
    if request.param == "get_message":
        from meshline._sockets import _client, _connection

        def refuse(*args: object) -> None:
            return None

        monkeypatch.setattr(_connection, "deliver_directly", refuse)
        monkeypatch.setattr(_client, "deliver_directly", refuse)
    return str(request.param)
