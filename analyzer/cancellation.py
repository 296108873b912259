"""Cancelling tasks so that they really end.

On Python 3.11 a cancel can be lost: when it lands just as an `asyncio.wait_for` inside a library
finishes (redis-py wraps every send in one when a socket timeout is set), `wait_for` returns the
result instead of raising (CPython gh-86296, fixed in 3.12). The task then runs on and whoever
awaits it waits forever, e.g. a SIGTERM that never stops the process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, recheck: float = 1.0) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again any that ran on."""
    tasks = list(tasks)
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=recheck)  # a condition wait; re-cancel what is left
    # All done: collect their outcomes so that none is reported as "never retrieved".
    await asyncio.gather(*tasks, return_exceptions=True)
