"""The ptys a Worker has open, by the id the caller chose, while their stream runs.

:meth:`PtyRegistry.open` registers a pty for as long as its ``async with`` lasts (the Worker's
``stream_pty`` generator); input, resize and kill reach it by id from other calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from rock_serve.errors import Conflict, NotFound
from rock_serve.rocklet.handle import PtyProcess, RockletHandle

__all__ = ["PtyRegistry"]


class PtyRegistry:
    """Open ptys by id."""

    def __init__(self) -> None:
        self._ptys: dict[str, PtyProcess] = {}

    def __len__(self) -> int:
        return len(self._ptys)

    @contextlib.asynccontextmanager
    async def open(
        self, pty_id: str, handle: RockletHandle, cols: int, rows: int
    ) -> AsyncIterator[PtyProcess]:
        """Start a pty through ``handle`` and hold it under ``pty_id`` until the block ends
        (which kills its process tree).

        Raises:
            Conflict: ``pty_id`` is open already.
        """
        if pty_id in self._ptys:
            raise Conflict(f"pty {pty_id!r} exists already")
        async with handle.pty(cols=cols, rows=rows) as p:
            self._ptys[pty_id] = p
            try:
                yield p
            finally:
                self._ptys.pop(pty_id, None)

    def get(self, pty_id: str) -> PtyProcess:
        """The open pty ``pty_id``.

        Raises:
            NotFound: no such pty (or it has ended).
        """
        p = self._ptys.get(pty_id)
        if p is None:
            raise NotFound(f"no pty {pty_id!r} (it has ended)")
        return p

    async def kill(self, pty_id: str) -> None:
        """Kill the pty's process tree (a no-op once it has ended)."""
        p = self._ptys.get(pty_id)
        if p is not None:
            await p.kill()
