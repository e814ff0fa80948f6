"""Polling helpers for tests: wait for a condition with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, overload

T = TypeVar("T")

Message = str | Callable[[], str]


def _text(message: Message) -> str:
    # A callable message is evaluated only on failure, so it can show the state at that moment.
    return message() if callable(message) else message


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    message: Message = "condition not met",
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; AssertionError at the deadline.

    The predicate is always tried once more at the deadline, so a slow machine fails only when the
    condition really did not hold in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{_text(message)} (waited {timeout:g}s)")
        time.sleep(min(interval, remaining))


@overload
def async_wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,
    interval: float = ...,
    message: Message = ...,
) -> Coroutine[Any, Any, T]: ...


@overload
def async_wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = ...,
    message: Message = ...,
) -> Coroutine[Any, Any, T]: ...


def async_wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.02,
    message: Message = "condition not met",
) -> Coroutine[Any, Any, Any]:
    """``wait_until`` for async tests: ``await async_wait_until(...)``; the predicate may be async.

    A plain function returning the coroutine, so the deadline starts when it is called.
    """
    return _poll(predicate, time.monotonic() + timeout, f"{timeout:g}s", interval, message)


async def _poll(
    predicate: Callable[[], Any],
    deadline: float,
    budget: str,
    interval: float,
    message: Message,
) -> Any:
    while True:
        result: Any = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{_text(message)} (waited {budget})")
        await asyncio.sleep(min(interval, remaining))
