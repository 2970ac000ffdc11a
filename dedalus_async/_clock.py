"""Time, injected: the session and the fake server read time only through a ``Clock``.

Tests hand both the same :class:`dedalus_async.testing.FakeClock`, so a ten-minute wait
runs in a millisecond and its exact sleep schedule can be asserted.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """What the library needs to know about time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (deadlines are measured on it)."""
        ...

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware (compared with ``expires_at``)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds``; must be cancellable."""
        ...


class SystemClock:
    """The real clock: :func:`time.monotonic`, UTC wall time and :func:`asyncio.sleep`."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"
