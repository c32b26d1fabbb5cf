"""The API process: ``python -m service`` (what ``make run`` and the api image start).

Settings are read and checked first, so a bad ``DISTILL_*`` value stops the process at once
with one line naming it.
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from core import logs
from core.settings import settings_or_exit
from service.app import create_app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory service.main:app_factory``."""
    settings = settings_or_exit("distill api")
    logs.configure(settings.log_level)
    return create_app(settings)


def main() -> int:
    settings = settings_or_exit("distill api")
    logs.configure(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
