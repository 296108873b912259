"""cancel_and_wait ends tasks that lose a cancel, as Python 3.11's wait_for can make them do."""

from __future__ import annotations

import asyncio

from analyzer.cancellation import cancel_and_wait


async def test_a_task_that_swallows_one_cancel_still_ends() -> None:
    never = asyncio.Event()
    waiting = asyncio.Event()
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        try:
            waiting.set()
            await never.wait()
        except asyncio.CancelledError:
            swallowed += 1  # what a lost cancel looks like from outside: the task runs on
        await never.wait()

    async def failing() -> None:
        raise RuntimeError("side task failed")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(failing())]
    await waiting.wait()  # `stubborn` is inside its first wait
    await asyncio.wait_for(cancel_and_wait(tasks, recheck=0.05), 10)
    assert swallowed == 1
    assert tasks[0].cancelled()
    assert isinstance(tasks[1].exception(), RuntimeError)
