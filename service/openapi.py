"""Write the API contract: ``python -m service.openapi openapi/openapi.json`` (``make openapi``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from core.settings import Settings
from service.app import create_app


def document() -> dict[str, Any]:
    """The OpenAPI document of the app, independent of the local environment."""
    spec: dict[str, Any] = create_app(Settings()).openapi()
    return spec


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else Path("openapi/openapi.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
