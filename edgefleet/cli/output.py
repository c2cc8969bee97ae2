"""Output helpers shared by every command: tables for people, JSON for machines.

Text that came from outside (names, versions, device ids, labels, key ids, URLs, error
messages quoting any of them) is printed as it is, never read as rich markup and never
as terminal control: :func:`table` cells and titles and :func:`fail` lines are built as
``Text``; a template of the project's own markup takes outside values through
:func:`styled` only, which never parses them. Control characters are shown as ``\\x1b``,
``\\u202e`` (:func:`visible`).

Where stdout or stderr is not a terminal (a pipe, a file, a CI log), nothing is wrapped
or cut at 80 columns: the consoles are :data:`PIPED_WIDTH` wide there, tables take
their natural width, and ``--help`` is click's plain help at that width.
"""

from __future__ import annotations

import importlib
import json
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TextIO

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Span, Text

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["PIPED_WIDTH", "console", "emit", "err_console", "fail", "literal", "styled",
           "table", "visible"]

PIPED_WIDTH = 1_000_000  # columns where output goes to a pipe or a file: never wrapped
_SLOT = "\x00"  # a value's place in a styled() template while the template is parsed
_BIDI = {"\u061c", "\u200e", "\u200f", *map(chr, range(0x202a, 0x202f)),
         *map(chr, range(0x2066, 0x206a))}


def _console(stream: TextIO, stderr: bool = False) -> Console:
    return Console(stderr=stderr, emoji=False, width=None if stream.isatty() else PIPED_WIDTH)


def _plain_help_when_piped() -> None:
    """typer draws ``--help`` in boxes as wide as the terminal (80 columns in a pipe);
    in a pipe, click's plain help at :data:`PIPED_WIDTH` prints every line whole."""
    if sys.stdout.isatty():
        return
    typer.core.HAS_RICH = False
    formatting: Any  # the module of click's help formatter: FORCED_WIDTH is its width
    try:  # typer 0.2x carries its own click as typer._click; older ones use click itself
        formatting = importlib.import_module("typer._click.formatting")
    except ImportError:
        formatting = importlib.import_module("click.formatting")
    formatting.FORCED_WIDTH = PIPED_WIDTH


console = _console(sys.stdout)
err_console = _console(sys.stderr, stderr=True)
_plain_help_when_piped()


def visible(text: str) -> str:
    """``text`` with control, bidi and line-separator characters shown as escapes."""
    return "".join(_escaped(c) if _hidden(c) else c for c in text)


def _hidden(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Zl", "Zp") or char in _BIDI


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def literal(value: object) -> Text:
    """``value`` as printed text: no markup, no emoji codes, control characters visible."""
    return Text(visible(str(value)))


def styled(template: str, *values: object) -> Text:
    """The project's own markup ``template``, each ``{}`` filled by a value as plain text.

    The template is parsed alone (with a NUL, which :func:`visible` never lets through, in
    each slot), then each slot is replaced by its value in the slot's style: a value is
    never parsed, so no escaping can be got wrong.
    """
    skeleton = Text.from_markup(template.replace("{}", _SLOT), emoji=False)
    slots = [i for i, char in enumerate(skeleton.plain) if char == _SLOT]
    fill = iter(values)
    out = Text()
    for piece in skeleton.divide(o for slot in slots for o in (slot, slot + 1)):
        out.append_text(_filled(piece, next(fill)) if piece.plain == _SLOT else piece)
    return out


def _filled(slot: Text, value: object) -> Text:
    shown = visible(str(value))
    return Text(shown, style=slot.style,
                spans=[Span(0, len(shown), span.style) for span in slot.spans])


def emit(data: Any, as_json: bool, render: Any = None) -> None:
    """Print ``data`` as JSON when asked, else ``render`` (a rich renderable) or ``data``."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return
    shown = render if render is not None else data
    console.print(literal(shown) if isinstance(shown, str) else shown)


def table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Table:
    """A table whose title, headers and cells are printed literally."""
    out = Table(title=Text(visible(title), no_wrap=True, overflow="ignore"))  # whole, always
    for column in columns:
        out.add_column(literal(column))
    for row in rows:
        out.add_row(*(literal("" if row.get(c) is None else row.get(c)) for c in columns))
    return out


def fail(exc: EdgefleetError, as_json: bool = False, code: int = 2) -> NoReturn:
    """Report a project error on one line (problem, then the fix) and exit non-zero."""
    if as_json:
        payload = {"error": type(exc).__name__, "message": exc.message, "hint": exc.hint}
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        fix = styled(" [yellow](fix: {})[/]", exc.hint) if exc.hint else ""
        err_console.print(styled("[bold red]error:[/] {}", exc.message) + fix, soft_wrap=True)
    raise typer.Exit(code)
