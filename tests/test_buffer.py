"""MessageBuffer with several receiving tasks: every item is taken exactly once."""

from __future__ import annotations

import trio
import trio.lowlevel

from meshline._transport._buffer import MessageBuffer, Overflow


async def test_several_receivers_share_the_items_without_loss() -> None:
    buffer: MessageBuffer[int] = MessageBuffer(10_000, Overflow.ERROR, "shared")
    taken: list[int] = []

    async def receiver() -> None:
        while True:
            try:
                taken.append(await buffer.receive())
            except StopAsyncIteration:
                return
            if len(taken) % 7 == 0:
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(receiver)
        for batch in range(50):
            for item in range(batch * 100, batch * 100 + 100):
                buffer.push(item)
            await trio.lowlevel.checkpoint()
        buffer.close()
    assert sorted(taken) == list(range(5000))
