"""A flush that times out (the server stalled) leaves the NATS connection working.

nats-py's own ``flush`` leaves its PONG future behind when it is cancelled or times
out, and the late PONG then ends nats-py's read loop: the transport would say it is
connected and receive nothing (found by a review: the cluster layer subscribes with
such a flush, and retries through stalls)."""

from __future__ import annotations

import pytest
import trio

import meshline
from meshline.testing import NatsServer


@pytest.mark.slow
async def test_a_subscribe_that_timed_out_on_a_stalled_server_leaves_the_connection_working(
    private_nats_server: NatsServer,
) -> None:
    async with meshline.open_nats_transport(private_nats_server.url) as transport:
        private_nats_server.pause()  # SIGSTOP: stalled, not disconnected
        try:
            with pytest.raises(meshline.TransportError):
                await transport.open_subscription("stalled.subject")  # its flush times out
        finally:
            private_nats_server.resume()
        with trio.fail_after(30):
            while True:  # once the server caught up, a new subscription hears a publish
                async with transport.subscribe("after.stall") as subscription:
                    await transport.publish("after.stall", b"x")
                    with trio.move_on_after(1):
                        assert (await subscription.receive()).data == b"x"
                        break
        assert transport.connected
