"""The nats-server harness, and NATS transport behaviour across server failures."""

from __future__ import annotations

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
    async with meshline.open_nats_transport(server.url) as transport:
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
    from meshline._nats import _check_nats_internals

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
