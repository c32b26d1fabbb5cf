"""``python -m client``: the ``distill`` command line."""

from __future__ import annotations

from client.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
