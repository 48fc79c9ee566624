"""The ``dstore`` command: ``serve --role gateway|storage``, ``up``, and client commands."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import mimetypes
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from dstore import config as cfg
from dstore.config import StorageConfig
from dstore.errors import ConfigError, DstoreError
from dstore.log import configure as configure_logging
from dstore.tuning import tune_malloc

ROLES: dict[str, type[Any]] = {"gateway": cfg.GatewayConfig, "storage": cfg.StorageConfig}


def _role_parser(role: str) -> argparse.ArgumentParser:
    cls = ROLES[role]
    parser = argparse.ArgumentParser(prog=f"dstore serve --role {role}")
    parser.add_argument("--config", default=None, help="TOML file with settings")
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
    return parser


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dstore", description="distributed streaming object store"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a server role (see --role R --help)", add_help=False)
    serve.add_argument("--role", choices=sorted(ROLES), required=True)

    up = sub.add_parser("up", help="a gateway and N storage nodes on this machine")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--port", type=int, default=8080)
    up.add_argument("--data-dir", default="./data")
    up.add_argument(
        "--auth", action="store_true", help="require tokens: an admin token is made in DATA_DIR"
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="HTTPS and mutual TLS on node links, with a private CA made in DATA_DIR/tls",
    )
    up.add_argument(
        "--s3-port",
        type=int,
        default=None,
        help="port of the S3 API on 127.0.0.1 (default 9000; with --port 0, a free one;"
        " -1: off); its key pair is made in DATA_DIR/s3-credentials",
    )
    up.add_argument(
        "--follow",
        action="store_true",
        help="show every process's log here, interleaved, each line prefixed with its process",
    )
    up.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="N > 1: N gateway processes on one PostgreSQL database, behind haproxy on --port",
    )
    up.add_argument(
        "--metadata",
        default=os.environ.get("DSTORE_METADATA"),
        help="postgresql:// URL of the metadata database (default: SQLite for one gateway,"
        " a private PostgreSQL in DATA_DIR/pg for several)",
    )

    migrate = sub.add_parser(
        "migrate-metadata",
        help="copy a stopped gateway's SQLite metadata into an empty PostgreSQL database",
    )
    migrate.add_argument(
        "--data-dir", default="./data/gateway", help="the gateway's data dir (its meta.db)"
    )
    migrate.add_argument(
        "--to",
        default=os.environ.get("DSTORE_METADATA"),
        help="postgresql:// URL of the target (default: DSTORE_METADATA)",
    )

    def client_options(p: argparse.ArgumentParser, default: Any) -> None:
        """--url, --token, --ca and --json, accepted before the command and after it (the
        command's own, given, win): ``default`` is the top parser's defaults, or
        SUPPRESS on a command's (so an option not given there keeps the top one)."""

        def given(value: Any) -> Any:
            return argparse.SUPPRESS if default is argparse.SUPPRESS else value

        p.add_argument(
            "--url", default=given(os.environ.get("DSTORE_URL", "http://127.0.0.1:8080"))
        )
        p.add_argument("--token", default=given(os.environ.get("DSTORE_TOKEN")))
        p.add_argument(
            "--ca",
            default=given(os.environ.get("DSTORE_CA")),
            help="CA file an https gateway is checked against (dstore up --tls: data/tls/ca.pem)",
        )
        p.add_argument(
            "--json",
            action="store_true",
            default=given(False),
            help="print JSON for scripts instead of tables",
        )

    client_options(parser, None)

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        client_options(p, argparse.SUPPRESS)
        return p

    put = client_command("put", "upload a file (FILE or - for stdin)")
    put.add_argument("source")
    put.add_argument("name", nargs="?")
    put.add_argument(
        "--content-type", default=None, help="the file's type (default: from its name)"
    )
    get = client_command("get", "download a file")
    get.add_argument("name")
    get.add_argument("-o", "--output", default=None, help="FILE or - for stdout")
    ls = client_command("ls", "list files")
    ls.add_argument("prefix", nargs="?", default="")
    ls.add_argument(
        "-d",
        "--delimiter",
        default="",
        help="roll names up to the next DELIMITER into folders (-d / lists one level)",
    )
    ls.add_argument("-l", "--long", action="store_true", help="sizes, ages and ETags too")
    rm = client_command("rm", "delete a file")
    rm.add_argument("name")
    stat = client_command("stat", "show a file's metadata")
    stat.add_argument("name")
    client_command("cluster", "show the storage nodes")
    fsck = client_command(
        "fsck", "check files against the nodes: under-replicated, corrupt, lost (read-only)"
    )
    fsck.add_argument("prefix", nargs="?", default="")
    fsck.add_argument(
        "--verify", action="store_true", help="read every replica and check its checksum too"
    )
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"dstore: {message}", file=sys.stderr)
    return code


def _s3_port(asked: int | None, port: int) -> int | None:
    """The S3 port ``dstore up`` serves on (with several gateways, haproxy does): 9000, a
    free one beside a gateway on a free one, none when asked (-1)."""
    if asked == -1:
        return None
    if asked is None:
        return 0 if port == 0 else 9000
    return asked


def keep_private(data_dir: os.PathLike[str] | str) -> None:
    """What a server writes is its own: files 0600 and folders 0700 from here on (the
    umask, inherited by the processes ``dstore up`` starts), and the data dir itself 0700
    even if an older version made it 0755 (nothing below it can then be reached)."""
    os.umask(0o077)
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def _serve(role: str, argv: Sequence[str]) -> int:
    args = _role_parser(role).parse_args(argv)
    try:
        config = cfg.load(ROLES[role], vars(args), config_file=args.config)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    configure_logging(config.log_format, config.log_level, cache=True)
    tune_malloc()
    try:
        keep_private(config.data_dir)
        if role == "storage":
            from dstore.storage.node import run_storage

            asyncio.run(run_storage(config, _joiner(config)))
        else:
            from dstore.gateway.app import run_gateway

            asyncio.run(run_gateway(config))
    except DstoreError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot start {role}: {exc.strerror or exc}")
    return 0


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False))


async def _client_main(args: argparse.Namespace) -> int:
    from dstore import present
    from dstore.client import Client
    from dstore.present import Progress

    out = present.console()
    async with Client(args.url, args.token, ca=Path(args.ca) if args.ca else None) as client:
        if args.command == "put":
            name = args.name or (None if args.source == "-" else os.path.basename(args.source))
            if not name:
                return _fail("a NAME is needed when reading from stdin", 2)
            content_type = args.content_type or _guess_type(
                args.source if args.source != "-" else name
            )
            started = time.monotonic()
            if args.source == "-":
                progress = Progress(f"put {name}", None)
                result = await client.put(
                    name, sys.stdin.buffer, progress=progress, content_type=content_type
                )
            else:
                with open(args.source, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    progress = Progress(f"put {name}", size)
                    result = await client.put(
                        name, f, size=size, progress=progress, content_type=content_type
                    )
            progress.close()
            if args.json:
                _print_json(result)
            else:
                out.print(present.put_line(result, time.monotonic() - started), markup=False)
        elif args.command == "get":
            output = args.output or os.path.basename(args.name) or "download"
            progress = Progress(f"get {args.name}", None)
            if output == "-":
                await client.get(args.name, sys.stdout.buffer, progress=progress)
                sys.stdout.buffer.flush()
            elif _is_special(output):
                # a device or a pipe (/dev/null, a FIFO): written to as it is; a partial
                # file renamed over it would replace it with a plain file
                with open(output, "wb") as sink:
                    await client.get(args.name, sink, progress=progress)
            else:
                tmp = f"{output}.dstore-partial"
                try:
                    with open(tmp, "wb") as sink:
                        await client.get(args.name, sink, progress=progress)
                    os.replace(tmp, output)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            progress.close()
        elif args.command == "ls":
            await _list(client, args, out)
        elif args.command == "rm":
            await client.delete(args.name)
        elif args.command == "stat":
            headers = await client.head(args.name)
            if args.json:
                keep = ("Content-Length", "ETag", "Last-Modified", "Content-Type")
                _print_json({"name": args.name} | {k: headers.get(k) for k in keep})
            else:
                present.stat_view(args.name, headers, out)
        elif args.command == "cluster":
            info = await client.cluster()
            if args.json:
                print(json.dumps(info, indent=2, ensure_ascii=False))
            else:
                present.cluster_view(info, out)
        elif args.command == "fsck":
            return await _fsck(client, args, out)
    return 0


def _guess_type(path: str) -> str | None:
    """A file's Content-Type from its name (``photo.jpg`` → ``image/jpeg``); None if
    unknown (the gateway then stores application/octet-stream)."""
    guessed, encoding = mimetypes.guess_type(path, strict=False)
    return None if encoding else guessed


async def _list(client: Any, args: argparse.Namespace, out: Any) -> None:
    from dstore import present

    after = ""
    everything: list[dict[str, Any]] = []
    while True:
        page = await client.list(args.prefix, after, delimiter=args.delimiter)
        rows = [{"prefix": p} for p in page.get("prefixes", [])] + list(page["files"])
        rows.sort(key=lambda r: r.get("prefix") or r["name"])  # (folders among the names)
        if args.json or args.long:
            everything.extend(rows)
        else:
            for row in rows:
                shown = "DIR" if "prefix" in row else str(row["size"])
                print(f"{shown:>14}  {row.get('prefix') or row['name']}")
        if not page["next"]:
            break
        after = page["next"]
    if args.json:
        _print_json(everything)
    elif args.long:
        present.listing_view(everything, out)


async def _fsck(client: Any, args: argparse.Namespace, out: Any) -> int:
    """``dstore fsck``: exit status 2 when a file is unrecoverable."""
    from dstore import present

    files: list[dict[str, Any]] = []
    totals: dict[str, Any] = {}
    async for line in client.fsck(args.prefix, verify=args.verify):
        if args.json:
            _print_json(line)
        if "file" in line:
            files.append(line["file"])
        else:
            totals = line["totals"]
    if not totals:
        return _fail("the gateway's fsck report ended early")
    if not args.json:
        present.fsck_view(files, totals, out)
    return 2 if totals["unrecoverable"] else 0


def _is_special(path: str) -> bool:
    """Whether ``path`` exists as something other than a plain file or a folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        role_parser = argparse.ArgumentParser(prog="dstore serve", add_help=False)
        role_parser.add_argument("--role", choices=sorted(ROLES), required=True)
        role_args, rest = role_parser.parse_known_args(argv[1:])
        return _serve(role_args.role, rest)
    args = _build_parser().parse_args(argv)
    if args.command == "up":
        from dstore.local import run_local_cluster

        tune_malloc()
        if args.gateways < 1:
            return _fail("--gateways must be at least 1", 2)
        try:
            keep_private(args.data_dir)
            return asyncio.run(
                run_local_cluster(
                    args.nodes,
                    args.replicas,
                    args.port,
                    args.data_dir,
                    auth=args.auth,
                    tls=args.tls,
                    gateways=args.gateways,
                    metadata=args.metadata,
                    s3_port=_s3_port(args.s3_port, args.port),
                    follow=args.follow,
                )
            )
        except KeyboardInterrupt:
            return 0
        except (DstoreError, OSError) as exc:
            return _fail(str(exc))
    if args.command == "migrate-metadata":
        return _migrate_metadata(Path(args.data_dir), args.to)
    try:
        return asyncio.run(_client_main(args))
    except DstoreError as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        # the reader of our output went away (`dstore get x -o - | head`): no error line,
        # the exit status a shell gives a program ended by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


def _migrate_metadata(data_dir: Path, dsn: str | None) -> int:
    if not dsn or not dsn.startswith(("postgresql://", "postgres://")):
        return _fail("migrate-metadata needs --to postgresql://... (or DSTORE_METADATA)", 2)
    from dstore.master.metadata.migrate import sqlite_to_postgres

    try:
        counts = asyncio.run(sqlite_to_postgres(data_dir / "meta.db", dsn))
    except DstoreError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot migrate: {exc}")
    print(json.dumps({"copied": counts}))
    return 0


def _joiner(config: StorageConfig) -> Callable[[str], Awaitable[dict[str, Any]]] | None:
    """How a storage node started with ``--join`` registers with its gateway: over the
    gateway's HTTP admin API, with the CLI's client."""
    url = config.join
    if not url:
        return None

    async def join(addr: str) -> dict[str, Any]:
        from dstore.client import join_cluster

        joined: dict[str, Any] = await join_cluster(
            url, addr, config.cluster_secret.encode(), tls=config.tls
        )
        return joined

    return join
