"""Writing several WebSocket messages with one write (``meshline._sockets._batch``)."""

from __future__ import annotations

import trio
import trio.testing
import trio_websocket

from meshline._sockets._batch import BATCHING, send_messages


class CountedStream(trio.abc.HalfCloseableStream):
    """A stream that counts the writes made to it."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_the_installed_trio_websocket_batches() -> None:
    """An upgrade of trio-websocket that renames what batching needs fails here."""
    assert BATCHING


async def test_a_batch_is_one_write_and_arrives_whole_and_in_order() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    counted = CountedStream(server_stream)
    messages: list[bytes | str] = [b"one", "two \u2605", b"", "x" * 70_000, b"\x00" * 3]
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            request = await trio_websocket.wrap_server_stream(nursery, counted)
            ws = await request.accept()
            before = counted.writes
            await send_messages(ws, messages)
            assert counted.writes == before + 1
            await ws.aclose()

        nursery.start_soon(serve)
        client = await trio_websocket.wrap_client_stream(nursery, client_stream, "h", "/")
        received = [await client.get_message() for _ in messages]
        assert received == messages
