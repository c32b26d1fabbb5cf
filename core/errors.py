"""Job errors the failure callback names precisely. No heavy imports: the API process loads it."""

from __future__ import annotations

import errno


class InsufficientSpace(OSError):
    """The data volume cannot hold the job's archive (found before sampling started)."""

    def __init__(self, detail: str) -> None:
        super().__init__(errno.ENOSPC, detail)
        self.detail = detail
