"""A server's count of accepted requests not yet answered, and whether it still accepts new ones: graceful shutdown
as the HTTP edge sees it, whatever runs it (the Ray runtime's ``lifecycle`` or the in-process server).

Example::

    drain = Drain()
    drain.admit()            # a request is accepted ...
    drain.release()          # ... and answered
    drain.draining = True    # from now on admit() raises NotReadyError
"""

from __future__ import annotations

import asyncio

from rmserve.model.errors import NotReadyError


class Drain:
    """A Gateway's count of accepted requests not yet answered, and whether it still accepts new ones."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self) -> None:
        """Count a new request in, or refuse it (503, retryable) once the server is shutting down."""
        if self.draining:
            raise NotReadyError("the server is shutting down; retry shortly (another replica may answer)")
        self.in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
