"""Small asyncio helpers: a one-shot wake-up for protocol callbacks (one coroutine waits until a
callback calls `wake()`), and stopping a background task.

asyncio.Event would do, but it keeps a set of waiters and a flag; here a wake with nobody waiting is
simply dropped (the waiter re-checks its condition before it waits again), which is what the
gateway's connections need on their hot path.
"""

from __future__ import annotations

import asyncio


class Waiter:
    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] | None = None

    def wake(self) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self) -> None:
        self.future = self.loop.create_future()
        try:
            await self.future
        finally:
            self.future = None


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancels a background task and waits until it has ended (its cancellation is not an error)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
