"""Requests awaiting a reply by id: register a future, wait, always remove; one teardown fails them all."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class PendingCalls(Generic[K, V]):
    """``with calls.expect(key) as answer: send(); await asyncio.wait_for(answer, t)``; replies ``resolve`` it.

    ``fail_all`` (on a lost connection) ends every waiter at once with the real cause; safe to call twice.
    """

    def __init__(self) -> None:
        self._waiting: dict[K, asyncio.Future[V]] = {}

    @contextlib.contextmanager
    def expect(self, key: K) -> Iterator[asyncio.Future[V]]:
        """A future for the reply to ``key``, registered while the block runs and removed after, always."""
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        try:
            yield future
        finally:
            if self._waiting.get(key) is future:
                del self._waiting[key]
            if future.done() and not future.cancelled():
                future.exception()  # failed while the caller was not awaiting it: seen, not "never retrieved"

    def resolve(self, key: K, value: V) -> bool:
        """Hand ``value`` to the waiter of ``key``; False when nobody waits (a late or unknown reply)."""
        future = self._open(key)
        if future is not None:
            future.set_result(value)
        return future is not None

    def fail(self, key: K, exc: BaseException) -> bool:
        """End the waiter of ``key`` with ``exc``; False when nobody waits."""
        future = self._open(key)
        if future is not None:
            future.set_exception(exc)
        return future is not None

    def fail_all(self, exc: BaseException) -> int:
        """End every waiter with ``exc`` (the connection is gone); returns how many there were."""
        failed = 0
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(exc)
                failed += 1
        return failed

    def __len__(self) -> int:
        return len(self._waiting)

    def _open(self, key: K) -> asyncio.Future[V] | None:
        future = self._waiting.get(key)
        return None if future is None or future.done() else future
