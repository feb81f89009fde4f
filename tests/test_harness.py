"""The nats-server harness, and NATS transport behaviour across server failures."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import meshline
from meshline.testing import NatsServer, NatsServerError, restart_server

from .node_helpers import wait_until


async def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        await wait_until(predicate)


def test_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(NatsServerError, match=r"exited early|not found|No such file"):
        try:
            NatsServer(binary="/nonexistent/nats-server").start()
        except FileNotFoundError as exc:
            raise NatsServerError(str(exc)) from exc


def test_restart_keeps_port_and_jetstream_data(private_nats_server: NatsServer) -> None:
    server = private_nats_server
    url = server.url

    async def write() -> None:
        async with meshline.open_nats_transport(url) as transport:
            kv = await transport.key_value("durable")
            await kv.put("k", b"kept")

    async def read() -> bytes | None:
        async with meshline.open_nats_transport(url) as transport:
            kv = await transport.key_value("durable")
            entry = await kv.get("k")
            return None if entry is None else entry.value

    trio.run(write)
    server.kill()
    assert not server.running
    server.start()
    assert server.url == url
    assert trio.run(read) == b"kept"


async def test_subscriptions_and_requests_survive_a_server_restart(
    private_nats_server: NatsServer,
) -> None:
    server = private_nats_server
    async with (
        meshline.open_nats_transport(server.url) as responder,
        meshline.open_nats_transport(server.url) as client,
        responder.subscribe("svc") as subscription,
        trio.open_nursery() as nursery,
    ):

        async def serve() -> None:
            async for message in subscription:
                assert message.reply is not None
                await responder.publish(message.reply, b"pong")

        nursery.start_soon(serve)
        assert (await client.request("svc", b"ping", timeout=10)).data == b"pong"

        await trio.to_thread.run_sync(server.kill)
        await wait_for(lambda: not client.connected and not responder.connected)
        await trio.to_thread.run_sync(server.start)
        await wait_for(lambda: client.connected and responder.connected)

        # The responder re-subscribes on reconnect; retry until the SUB has landed.
        reply = None
        with trio.fail_after(20):
            while reply is None:
                try:
                    reply = await client.request("svc", b"ping", timeout=2)
                except (meshline.NoRespondersError, meshline.RequestTimeoutError):
                    await trio.sleep(0.1)
        assert reply.data == b"pong"
        nursery.cancel_scope.cancel()


async def test_a_server_restart_is_told_to_connection_listeners(
    private_nats_server: NatsServer,
) -> None:
    server = private_nats_server
    theirs: list[str] = []

    async def disconnected_cb() -> None:
        theirs.append("disconnected")

    async def reconnected_cb() -> None:
        theirs.append("reconnected")

    async with meshline.open_nats_transport(
        server.url, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb
    ) as transport:
        heard: list[meshline.ConnectionEventKind] = []
        transport.add_connection_listener(lambda event: heard.append(event.kind))
        await restart_server(server, 0.2)
        with trio.fail_after(20):
            await wait_until(lambda: meshline.ConnectionEventKind.RECONNECTED in heard)
        assert heard == [
            meshline.ConnectionEventKind.DISCONNECTED,
            meshline.ConnectionEventKind.RECONNECTED,
        ]
        assert transport.connected
        await wait_for(lambda: len(theirs) == 2)
        assert theirs == ["disconnected", "reconnected"]


async def test_data_and_headers_over_max_payload_are_refused_before_sending(
    private_nats_server: NatsServer,
) -> None:
    """The server counts headers too, and closes the connection over its limit: a
    KV write whose value fits but whose headers do not must fail before it is sent."""
    async with meshline.open_nats_transport(private_nats_server.url) as transport:
        kv = await transport.key_value("large")
        with pytest.raises(meshline.PayloadTooLargeError):
            await kv.put("k", b"x" * (1024 * 1024 - 4))
        assert transport.connected
        await kv.put("k", b"small")
        entry = await kv.get("k")
        assert entry is not None and entry.value == b"small"


def test_the_internals_check_names_what_is_missing() -> None:
    from meshline._transport._nats import _check_nats_internals

    with pytest.raises(meshline.TransportError, match="_pending_data_size"):
        _check_nats_internals(object())


async def test_unreachable_server_is_a_transport_error() -> None:
    from meshline.testing import free_port

    with pytest.raises(meshline.TransportError):
        async with meshline.open_nats_transport(
            f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5
        ):
            pass


async def test_cluster_routes_messages_and_replicates_kv(
    nats_servers3: list[NatsServer],
) -> None:
    first, _second, third = nats_servers3
    async with (
        meshline.open_nats_transport(first.url) as left,
        meshline.open_nats_transport(third.url) as right,
    ):
        async with right.subscribe("routed") as subscription:
            # Route interest propagates asynchronously: publish until it arrives.
            with trio.fail_after(20):
                while subscription.pending == 0:
                    await left.publish("routed", b"across")
                    await trio.sleep(0.05)
            assert (await subscription.receive()).data == b"across"
        # Clustered JetStream may still be settling its meta leader right after start.
        with trio.fail_after(30):
            while True:
                try:
                    kv_left = await left.key_value("shared")
                    break
                except meshline.TransportError:
                    await trio.sleep(0.2)
        await kv_left.put("k", b"v")
        kv_right = await right.key_value("shared")
        entry = await kv_right.get("k")
        assert entry is not None and entry.value == b"v"


AUTHORIZATION = """authorization {
  users = [{user: "meshline", password: "%s", permissions: {publish: {deny: ["forbidden.>"]}}}]
}"""


def authorized_server(password: str) -> NatsServer:
    return NatsServer(extra_config=AUTHORIZATION % password)


async def test_a_permissions_violation_is_a_server_error_and_user_callbacks_still_run() -> None:
    errors: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(exc)

    with authorized_server("secret") as server:
        url = server.url.replace("nats://", "nats://meshline:secret@")
        async with meshline.open_nats_transport(url, error_cb=error_cb) as transport:
            heard: list[meshline.ConnectionEvent] = []
            transport.add_connection_listener(heard.append)
            await transport.publish("forbidden.subject", b"x")
            await wait_for(lambda: bool(heard) and bool(errors), timeout=10)
            assert [event.kind for event in heard] == [meshline.ConnectionEventKind.SERVER_ERROR]
            assert "forbidden.subject" in heard[0].detail
            assert "forbidden.subject" in str(errors[0])
            assert transport.connected


async def test_a_connection_closed_for_good_is_told_as_a_server_error() -> None:
    """Revoked credentials: the server drops the client with an -ERR, and nats-py
    gives up instead of reconnecting. Listeners must not wait for RECONNECTED."""
    closed: list[bool] = []

    async def closed_cb() -> None:
        closed.append(True)

    with authorized_server("before") as server:
        url = server.url.replace("nats://", "nats://meshline:before@")
        async with meshline.open_nats_transport(url, closed_cb=closed_cb) as transport:
            heard: list[meshline.ConnectionEvent] = []
            transport.add_connection_listener(heard.append)
            server.extra_config = AUTHORIZATION % "after"
            server.reload()
            await wait_for(lambda: len(heard) == 2 and bool(closed), timeout=10)
            assert [event.kind for event in heard] == [
                meshline.ConnectionEventKind.DISCONNECTED,
                meshline.ConnectionEventKind.SERVER_ERROR,
            ]
            assert "closed for good" in heard[1].detail
            assert "authorization" in heard[1].detail
            assert not transport.connected
            with pytest.raises(meshline.TransportClosedError):
                await transport.publish("anything", b"x")


async def test_user_callbacks_must_be_async(nats_server: NatsServer) -> None:
    with pytest.raises(meshline.InvalidArgumentError, match="disconnected_cb"):
        async with meshline.open_nats_transport(nats_server.url, disconnected_cb=print):
            pass


async def test_a_slow_consumer_report_is_told_to_listeners(nats_server: NatsServer) -> None:
    import nats.errors
    import trio_asyncio

    from meshline._transport._nats import _ConnectionCallbacks

    reported: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        reported.append(exc)

    async with meshline.open_nats_transport(nats_server.url) as transport:
        heard: list[meshline.ConnectionEvent] = []
        transport.add_connection_listener(heard.append)
        callbacks = _ConnectionCallbacks({"error_cb": error_cb})
        callbacks.transport = transport
        slow = nats.errors.SlowConsumerError(subject="busy", reply="", sid=1, sub=None)
        await trio_asyncio.aio_as_trio(callbacks.error)(slow)
    assert [event.kind for event in heard] == [meshline.ConnectionEventKind.SLOW_CONSUMER]
    assert "busy" in heard[0].detail
    assert reported == [slow]


@pytest.mark.parametrize("shim", ["_BufferShim", "_InboxShim"])
async def test_the_connect_self_test_fails_loudly_when_a_fast_path_is_broken(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, shim: str
) -> None:
    import meshline._transport._nats

    monkeypatch.setattr(meshline._transport._nats, "SELF_TEST_TIMEOUT", 0.3)
    monkeypatch.setattr(getattr(meshline._transport._nats, shim), "deliver", lambda *args: None)
    with pytest.raises(meshline.TransportError, match="fast paths do not work"):
        async with meshline.open_nats_transport(nats_server.url):
            pass


def test_the_internals_check_covers_subscriptions_and_watchers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nats.aio.subscription
    import nats.js.client
    import nats.protocol.parser

    from meshline._transport._nats import _check_nats_internals

    class Client:
        def __init__(self) -> None:
            self._pending: list[bytes] = []
            self._pending_data_size = self._max_payload = self._max_pending_size = 0
            self._flush_queue = None
            self._subs: dict[int, object] = {}
            self._ps = nats.protocol.parser.Parser(self)

        async def _process_msg(self) -> None: ...
        async def _flush_pending(self) -> None: ...
        async def _send_ping(self, future: object = None) -> None: ...

    _check_nats_internals(Client())
    without_parser_state = Client()
    del without_parser_state._ps.state
    with pytest.raises(meshline.TransportError, match=r"Parser\.state"):
        _check_nats_internals(without_parser_state)
    subscription_init = nats.aio.subscription.Subscription.__init__
    ordered_init = nats.js.client.JetStreamContext._JSI.__init__

    def without_jsi(self: Any, *args: Any, **kwargs: Any) -> None:
        subscription_init(self, *args, **kwargs)
        del self._jsi

    def without_consumer_sequence(self: Any, *args: Any, **kwargs: Any) -> None:
        ordered_init(self, *args, **kwargs)
        del self._dseq

    monkeypatch.setattr(nats.aio.subscription.Subscription, "__init__", without_jsi)
    monkeypatch.setattr(nats.js.client.JetStreamContext._JSI, "__init__", without_consumer_sequence)
    with pytest.raises(meshline.TransportError) as info:
        _check_nats_internals(Client())
    assert "Subscription._jsi" in str(info.value)
    assert "JetStreamContext._JSI._dseq" in str(info.value)
    assert "_pending_queue" not in str(info.value)


async def test_a_failed_unsubscribe_is_logged_not_raised(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import nats.aio.subscription
    import nats.errors

    async def broken(self: object, limit: int = 0) -> None:
        raise nats.errors.Error("injected unsubscribe failure")

    async with meshline.open_nats_transport(nats_server.url) as transport:
        subscription = await transport.open_subscription("unsubscribe.fails")
        monkeypatch.setattr(nats.aio.subscription.Subscription, "unsubscribe", broken)
        await subscription.aclose()
    assert "injected unsubscribe failure" in caplog.text
