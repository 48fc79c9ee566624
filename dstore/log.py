"""structlog set-up: JSON lines in production, console on a TTY; context variables (the
request id) are merged into every line first.

JSON lines are rendered with orjson and written as bytes: a canonical line per request
costs about half of what the standard library's encoder and a text stream cost (measured
in docs/benchmarks.md), which is a few per cent of a small request."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure(fmt: str = "auto", level: str = "info", *, cache: bool = False) -> None:
    """``cache``: each logger binds its configuration once, at first use (servers, which
    never reconfigure); tests reconfigure to capture lines, so they leave it off."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if use_console
        else structlog.processors.JSONRenderer(serializer=orjson.dumps)
    )
    factory: structlog.typing.WrappedLogger = (
        structlog.PrintLoggerFactory(file=sys.stderr)
        if use_console
        else structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
