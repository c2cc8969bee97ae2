"""Log lines of the long-running commands (``agent run``, ``fleet serve``, ``broker``).

``--log-format text`` (the default) keeps the human line; ``--log-format json`` writes
one JSON object a line on stderr, ready for ``jq`` or a log shipper::

    {"ts": "2026-12-07T01:02:03.456Z", "level": "INFO", "logger": "edgefleet.agent.service",
     "message": "update: ...", "device": "cam-17", "model": "digits", "version": "2.0.0",
     "state": "PROBATION", "rollout": "r1"}

``ts``, ``level``, ``logger`` and ``message`` are always there; ``fleet``, ``device``,
``model``, ``version``, ``state`` and ``rollout`` when known, from the log call's
``extra=`` or else from the command's context (a callable read at each line).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.markup import escape

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.output import err_console

if TYPE_CHECKING:
    from edgefleet.agent.service import AgentService

__all__ = ["FIELDS", "JsonFormatter", "LogFormat", "LogFormatOpt", "agent_context", "fail_in",
           "setup_logging"]

FIELDS = ("fleet", "device", "model", "version", "state", "rollout")
Context = Callable[[], Mapping[str, Any]]


class LogFormat(str, Enum):
    text = "text"
    json = "json"


LogFormatOpt = Annotated[LogFormat, typer.Option(
    "--log-format", help="text, or json: one object a line with ts, level, logger, message "
                         "and, when known, fleet, device, model, version, state, rollout")]


def _no_context() -> Mapping[str, Any]:
    return {}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, in printable ASCII: json.dumps escapes line breaks and
    control characters (DEL here), and ``ensure_ascii`` every non-ASCII one (a bidi override such as
    U+202E too), so a terminal tailing the log shows ``\\u202e``, not reordered text."""

    def __init__(self, context: Context = _no_context) -> None:
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {"ts": _utc(record.created), "level": record.levelname,
                                 "logger": record.name, "message": record.getMessage()}
        event.update((k, v) for k, v in self.context().items() if v is not None)
        event.update((k, v) for k in FIELDS if (v := getattr(record, k, None)) is not None)
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        text = json.dumps(event, default=str, ensure_ascii=True)
        return text.replace("\x7f", "\\u007f")  # DEL: the one control json leaves raw


def _utc(created: float) -> str:
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes, not to the one there was
    when logging was set up: a caller that swapped it (a test runner's capture) and closed
    it since must not turn a background thread's record into a logging error."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys.stderr


def setup_logging(fmt: LogFormat, level: int | str, text_format: str,
                  context: Context = _no_context) -> JsonFormatter | None:
    """Send every log record to stderr in ``fmt``; return the JSON formatter (whose
    ``context`` the command may widen once it knows more), or None for text."""
    handler = _Stderr()
    formatter = JsonFormatter(context) if fmt is LogFormat.json else None
    handler.setFormatter(formatter or logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # warnings.warn lines become records, JSON too
    return formatter


def fail_in(fmt: LogFormat, exc: EdgefleetError) -> NoReturn:
    """Report ``exc`` on one line, as the command's other lines are (a JSON record, or
    ``error: ...``; never wrapped), and exit 2."""
    if fmt is LogFormat.json:
        logging.getLogger("edgefleet").error("%s", exc)  # message and hint in one line
    else:
        fix = f" (fix: {exc.hint})" if exc.hint else ""
        err_console.print(f"[bold red]error:[/] {escape(exc.message + fix)}", soft_wrap=True)
    raise typer.Exit(2)


def agent_context(service: AgentService) -> Context:
    """What each line of ``agent run`` says of the device: its ids, and when it serves one
    model: that model, its update's state and the rollout that asked for it."""
    config = service.config

    def context() -> Mapping[str, Any]:
        agents, updates, desired = service.models.items(), service.updates, service.desired
        model = agents[0][1].model if len(agents) == 1 else None
        return {"fleet": config.fleet, "device": config.device_id,
                "model": model.name if model else None,
                "version": model.version if model else None,
                "state": updates.journal.state.value if updates else None,
                "rollout": getattr(desired, "rollout", None)}
    return context
