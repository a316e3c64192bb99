"""A finding: one problem a check found (validation, alignment), never an exception."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Finding", "MAX_PER_KIND"]

#: Findings of one kind reported per shard before summarising the rest.
MAX_PER_KIND = 5


@dataclass(frozen=True)
class Finding:
    """One problem found by a check.

    Attributes:
        level: ``"error"`` (the set is wrong or unreadable) or ``"warning"`` (suspicious or
            incomplete, but what is there is consistent).
        where: ``manifest.json``, a shard name, or ``shard[image 12 'id']``.
        message: what was expected, what was found, what to do.
    """

    level: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"
