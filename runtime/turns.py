"""Who may compute now. A process that hosts one participant (`serve`, `join`) lets it compute whenever
it likes (FREE_TURNS); the simulation engine hosts the server and every device in one process and gives
the turns in a fixed order, so that a run is the same every time (simulation/engine.py)."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol

SERVER = "server"
"""The name the server takes its turns under (devices take theirs under their client id)."""
JOINING = -1
"""The phase of a device's turn in which it joins and builds its model (rounds are phases 0, 1, ...)."""


class Turns(Protocol):
    def take(self, who: str, phase: int) -> ContextManager[None]:
        """Held while `who` (SERVER or a client id) computes in `phase` (JOINING or a round)."""

    def deliver(self, who: str, phase: int) -> ContextManager[None]:
        """Held while device `who` sends what it computed in round `phase` (its upload)."""


class FreeTurns:
    """Everyone computes at once: one participant per process."""

    def take(self, who: str, phase: int) -> ContextManager[None]:
        return contextlib.nullcontext()

    def deliver(self, who: str, phase: int) -> ContextManager[None]:
        return contextlib.nullcontext()


FREE_TURNS = FreeTurns()
