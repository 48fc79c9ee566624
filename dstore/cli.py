"""The ``dstore`` command: ``serve --role gateway|storage``, ``up``, and client commands."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from dstore import config as cfg
from dstore.errors import ConfigError, DstoreError
from dstore.log import configure as configure_logging


def _add_config_flags(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("many"):
            parser.add_argument(
                flag,
                dest=f.name,
                action="append",
                default=None,
                help=f.metadata["help"] + " (repeatable)",
            )
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=f.metadata["help"])


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dstore", description="distributed streaming object store"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a server role")
    serve.add_argument("--role", choices=["storage"], required=True)
    serve.add_argument("--config", default=None, help="TOML file with settings")
    _add_config_flags(serve, cfg.StorageConfig)
    return parser


def _serve(args: argparse.Namespace) -> int:
    flags = vars(args)
    try:
        config = cfg.load(cfg.StorageConfig, flags, config_file=args.config)
    except ConfigError as exc:
        print(f"dstore: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    from dstore.storage.node import run_storage

    try:
        asyncio.run(run_storage(config))
    except DstoreError as exc:
        print(f"dstore: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dstore: cannot start storage node: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
