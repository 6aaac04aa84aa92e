"""Where klock_async's log events go: nowhere, unless the application set logging up.

Library code asks :func:`get_logger` (or, once per batch on the hot path, :func:`info_logger`)
for a logger and binds fields; only entry points (``klock serve``, ``klock mcp``, ``klock
demo``) call :func:`configure`. The events reach:

- the application's structlog configuration, once ``structlog.configure()`` was called (by the
  application, or through :func:`configure`);
- otherwise stdlib ``logging``'s ``"klock_async"`` logger, when it (or an ancestor) has a
  handler and takes the level (``logging.basicConfig(level="INFO")`` shows every event);
- otherwise nowhere: a program that configures nothing sees nothing on stdout or stderr, and
  the kernel does not build the per-lease events at all.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure", "get_logger", "info_logger"]

_STDLIB = logging.getLogger("klock_async")
# The library's events as stdlib records ("lease.granted  agent=a resource=FILE:/x ...").
_TO_STDLIB: Any = structlog.wrap_logger(
    _STDLIB,
    processors=[structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)],
    wrapper_class=structlog.stdlib.BoundLogger,
)


class _Silent:
    """A logger that drops everything: what the library logs to when nobody listens."""

    def bind(self, **_: Any) -> _Silent:
        return self

    def _drop(self, event: str, **_: Any) -> None:
        return None

    debug = info = warning = error = critical = exception = _drop


_SILENT = _Silent()
_STRUCTLOG: Any = structlog.get_logger("klock_async")
# The structlog logger info_logger() last looked at, and its answer for it: a filtering
# logger's level is fixed, so the answer holds as long as structlog hands out that object.
_LAST_INFO: list[Any] = [None, None]


def get_logger() -> Any:
    """The logger library code writes to (see the module docstring); never None."""
    if structlog.is_configured():
        return _STRUCTLOG
    if _STDLIB.hasHandlers():
        return _TO_STDLIB
    return _SILENT


def info_logger() -> Any | None:
    """The logger that keeps INFO events (the per-lease ones), or None when none would.

    The scheduler asks once per batch and, on None, builds no per-lease event fields at all.
    """
    if structlog.is_configured():
        logger = _STRUCTLOG.bind()  # the same object each time once structlog caches it
        last = _LAST_INFO
        if logger is not last[0]:
            is_enabled_for = getattr(logger, "is_enabled_for", None)
            keeps = is_enabled_for is None or is_enabled_for(logging.INFO)
            last[:] = [logger, logger if keeps else None]
        return last[1]
    if _STDLIB.isEnabledFor(logging.INFO) and _STDLIB.hasHandlers():
        return _TO_STDLIB
    return None


def configure(level: str = "info", *, json: bool = False) -> None:
    """Send structlog events at ``level`` or above to stderr, as text or JSON lines.

    Raises:
        ValueError: unknown level name.
    """
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
