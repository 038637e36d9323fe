"""What a scrub answers, embedded or over the network: `VerifyReport`.

Owns: the result type of `Database.verify()` (built by the engine's scrub)
and of a client's `verify()` (rebuilt from a VERIFY answer), so both return
the same type. Must never: import the engine (the clients load it in a
client-only install).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["VerifyReport"]


@dataclass
class VerifyReport:
    """A scrub of every checksum, ID, footer and file. `damage` holds the engine's located damage
    (embedded only; a client's report carries the same `problems` lines and an empty `damage`)."""

    ok: bool
    records_checked: int
    problems: list[str]
    damage: list[Any] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok
