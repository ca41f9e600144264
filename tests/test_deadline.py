"""The self re-arming deadline behind the idle and upstream read timeouts."""

from __future__ import annotations

import asyncio

from gateway.deadline import Deadline

STEP = 0.05


async def expiry_times(actions) -> list[float]:
    """Run ``actions`` on a new deadline; return when it expired, from the start."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    expired: list[float] = []
    deadline = Deadline(loop, lambda: expired.append(loop.time() - started))
    await actions(deadline)
    return expired


async def test_deadline_expires_once():
    async def actions(deadline):
        deadline.start(STEP)
        await asyncio.sleep(STEP * 4)

    expired = await expiry_times(actions)

    assert len(expired) == 1
    assert expired[0] >= STEP


async def test_deadline_moved_expires_later():
    async def actions(deadline):
        deadline.start(STEP * 2)
        await asyncio.sleep(STEP)
        deadline.start(STEP * 2)
        await asyncio.sleep(STEP * 5)

    expired = await expiry_times(actions)

    assert len(expired) == 1
    assert expired[0] >= STEP * 3


async def test_deadline_cleared_never_expires():
    async def actions(deadline):
        deadline.start(STEP)
        deadline.clear()
        await asyncio.sleep(STEP * 3)

    assert await expiry_times(actions) == []


async def test_deadline_restarted_after_clear():
    async def actions(deadline):
        deadline.start(STEP)
        deadline.clear()
        await asyncio.sleep(STEP * 2)
        deadline.start(STEP)
        await asyncio.sleep(STEP * 3)

    expired = await expiry_times(actions)

    assert len(expired) == 1
    assert expired[0] >= STEP * 3


async def test_deadline_stopped_never_expires():
    async def actions(deadline):
        deadline.start(STEP)
        deadline.stop()
        await asyncio.sleep(STEP * 3)

    assert await expiry_times(actions) == []
