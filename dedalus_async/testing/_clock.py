"""A fake clock for tests: sleeping advances time instantly and is recorded."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock"]


class FakeClock:
    """A :class:`~dedalus_async.Clock` whose time moves only when someone sleeps.

    ``await clock.sleep(s)`` adds ``s`` to both the monotonic and the wall clock, records
    ``s`` in :attr:`sleeps` and yields to the event loop once, so a ten-minute wait runs in
    a millisecond. Give the same clock to :class:`FakeDedalus` and to the ``Session`` so
    the server's scripted executions progress with the client's sleeps.

    With several tasks sleeping at once each sleep still advances the shared clock, so time
    runs faster than any one task's schedule: exact schedules are for sequential flows.
    """

    def __init__(self, start: datetime | None = None, *, monotonic_start: float = 1000.0) -> None:
        self._wall = start or datetime(2026, 1, 1, tzinfo=UTC)
        if self._wall.tzinfo is None:
            raise ValueError("FakeClock start must be timezone-aware")
        self._mono = monotonic_start
        #: every duration passed to :meth:`sleep`, in order
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return self._wall

    def advance(self, seconds: float) -> None:
        """Move time forward without sleeping (e.g. to simulate work elsewhere)."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._mono += seconds
        self._wall += timedelta(seconds=seconds)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)

    @property
    def slept(self) -> float:
        """Total seconds slept so far."""
        return sum(self.sleeps)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._wall.isoformat()}, sleeps={len(self.sleeps)})"
