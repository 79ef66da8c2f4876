"""The one pending-call helper: waiters are always removed, replies find them, a teardown fails them all."""

import asyncio

import pytest

from deviced.calls import PendingCalls
from deviced.errors import BrokerLost


async def test_a_reply_finds_its_waiter_and_the_waiter_is_always_removed() -> None:
    calls: PendingCalls[str, int] = PendingCalls()
    with calls.expect("a") as answer:
        assert len(calls) == 1 and calls.resolve("a", 7)
        assert await answer == 7
        assert not calls.resolve("a", 8)  # answered once
    assert len(calls) == 0 and not calls.resolve("a", 9)  # a late reply finds nobody
    with pytest.raises(TimeoutError), calls.expect("b") as answer:
        await asyncio.wait_for(answer, 0.01)
    assert len(calls) == 0


async def test_teardown_fails_every_waiter_with_the_real_cause_and_is_safe_twice() -> None:
    calls: PendingCalls[str, int] = PendingCalls()

    async def wait(key: str) -> BaseException | None:
        with calls.expect(key) as answer:
            try:
                await asyncio.wait_for(answer, 10)
            except BrokerLost as exc:
                return exc
        return None

    waiters = [asyncio.create_task(wait(k)) for k in "xyz"]
    await asyncio.sleep(0)
    assert calls.fail_all(BrokerLost("broker connection lost")) == 3
    assert calls.fail_all(BrokerLost("again")) == 0  # already failed: nothing twice
    errors = await asyncio.gather(*waiters)
    assert [str(e) for e in errors] == ["broker connection lost"] * 3
    assert len(calls) == 0
