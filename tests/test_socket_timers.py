"""The socket layer's timers: many deadlines watched by one task, on a MockClock."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from meshline._sockets._timers import Timers


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_callbacks_run_at_their_deadlines_in_order_and_may_ask_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = Timers()
    seen: list[tuple[str, float]] = []
    beats = iter([2.5, 4.0, None])

    def beat(now: float) -> float | None:
        seen.append(("beat", now))
        return next(beats)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        timers.add(start + 3, lambda now: seen.append(("three", now)) and None)
        timers.add(start + 1, beat)
        await trio.sleep(0.5)
        timers.add(start + 0.75, lambda now: seen.append(("early", now)) and None)  # wakes it
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [(what, when - start) for what, when in seen] == [
        ("early", 0.75),
        ("beat", 1.0),
        ("beat", 2.5),
        ("three", 3.0),
        ("beat", 4.0),
    ]
    assert len(timers) == 0


async def test_withdrawn_timers_never_run_and_the_heap_stays_small(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = Timers()
    ran: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        for index in range(10_000):
            timer = timers.add(trio.current_time() + 30, lambda now, index=index: ran.append(index))
            if index % 1_000:
                timers.withdraw(timer)
                timers.withdraw(timer)  # twice does nothing
        assert len(timers) == 10
        assert len(timers._heap) < 100  # rebuilt without the withdrawn ones
        await trio.sleep(31)
        nursery.cancel_scope.cancel()
    assert ran == list(range(0, 10_000, 1_000))


async def test_a_callback_that_raises_is_logged_and_the_others_run(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    timers = Timers()
    ran: list[str] = []

    def broken(now: float) -> float | None:
        raise ZeroDivisionError

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        timers.add(trio.current_time() + 1, broken)
        timers.add(trio.current_time() + 1, lambda now: ran.append("after") and None)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert ran == ["after"]
    records = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert records and records[0].exc_info is not None


async def test_a_deadline_due_again_at_once_waits_for_the_next_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = Timers()
    calls: list[float] = []
    seen_by_others: list[int] = []

    def again_now(now: float) -> float | None:
        calls.append(now)
        return now if len(calls) < 1_000 else None

    async def other() -> None:
        while not calls:
            await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        seen_by_others.append(len(calls))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        timers.add(trio.current_time(), again_now)
        nursery.start_soon(other)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert seen_by_others and seen_by_others[0] < 10  # the timer task let others run


async def test_the_handle_of_a_repeating_timer_stays_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = Timers()
    beats: list[float] = []

    def beat(now: float) -> float:
        beats.append(now)
        return now + 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        start = trio.current_time()
        handle = timers.add(start + 1, beat)
        await trio.sleep(2.5)
        timers.withdraw(handle)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert [when - start for when in beats] == [1.0, 2.0]
    assert len(timers) == 0
