"""Run every benchmark: ``python -m bench [name ...]`` (``ab`` and ``getab``, which compare
two builds or settings, only when named)."""

from __future__ import annotations

import asyncio
import importlib
import sys

BENCHES = [
    "protocol",
    "gateway",
    "ttfb",
    "smallcpu",
    "overheads",
    "failures",
    "repair",
    "startup",
    "engines",
    "s3",
]


def main() -> None:
    names = sys.argv[1:] or BENCHES
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        asyncio.run(module.main())


main()
