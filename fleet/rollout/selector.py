"""Which devices a rollout (or a saved group) means: a small grammar, parsed once.

A selector is text an operator writes (``--to``, ``fleet groups create --where``) and
the controller parses once, when the rollout or the group is created, into a typed tree
(:data:`Target`); a tick only calls :func:`matches` on it. ``str(tree)`` is the canonical
text, and ``parse_selector(str(tree)) == tree`` (property-tested)::

    selector := all ( '|' all )*            any of them
    all      := term ( '&' term )*          every one of them
    term     := '(' selector ')' | clause
    clause   := group:NAME | tag:NAME | device:ID
              | label:KEY                    the label is set (by the device or an operator)
              | label:KEY ( = | != ) VALUE
              | profile | arch | model | runtime    ( = | != ) VALUE
              | model.version | agent | runtime.NAME  ( = | != | >= | <= | > | < ) VERSION

A NAME, KEY or VALUE is a bare word (letters, digits and ``. _ - / + ~ @``) or a
double-quoted string (``\\"`` and ``\\\\`` inside); VERSIONs compare as versions
(``packaging.version``: ``1.10 > 1.9``, ``1.2 == 1.2.0``). Spaces between tokens are free.

What a clause reads of a device: ``profile`` and ``arch`` (its device profile and CPU
architecture, as it reports them), ``model``/``model.version`` (the bundle it runs),
``agent`` (its agent's version), ``runtime`` (a runtime it has) and ``runtime.NAME``
(that runtime's version), ``label:`` (its labels: those it reports, and those operators
set, which win), ``group:``/``tag:``/``device:`` (as before). A device that does not
report what a clause asks about does not match it, except ``!=``: a device without a
profile is not a ``raspberry-pi-4``. ``group:NAME`` naming a saved selector (a dynamic
group) is replaced by that selector when the rollout is created (:func:`expand`).

A device of several models matches when **one** of its models makes the selector true,
every ``model=`` and ``model.version`` clause of the selector read of that same model:
``model=digits & model.version<2`` is "runs digits older than 2", not "runs digits and
something older than 2". ``model!=X`` reads all its models: none of them is X.

Errors name the character where the text stops making sense and how to write it; the
parser reads at most :data:`MAX_TEXT` characters, :data:`MAX_DEPTH` parentheses deep.
Those bounds are for what people write: the canonical text a store keeps (spaces around
``&`` and ``|``, parentheses the precedence left out, saved groups expanded) may be
longer and deeper, and is read back by :func:`parse_stored_selector` without them. What
is stored is bounded instead when it is created (:func:`storable`): at most
:data:`MAX_CLAUSES` clauses, :data:`MAX_NESTING` levels deep, and it must read back as
the same tree.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from packaging.version import InvalidVersion, Version

from edgefleet.fleet.errors import InvalidRolloutError

__all__ = ["ATTRIBUTES", "KINDS", "MAX_CLAUSES", "MAX_DEPTH", "MAX_NAME", "MAX_NESTING",
           "MAX_TEXT", "VERSIONED", "AllOf", "AnyOf", "Attribute", "Facts", "Label",
           "Selector", "SelectorError", "Target", "Unreadable", "expand", "matches",
           "names_group", "parse_selector", "parse_stored_selector", "quoted", "storable"]

MAX_TEXT = 1000  # characters of one selector as people write it
MAX_DEPTH = 16  # parentheses inside each other, as people write them
MAX_NAME = 64  # characters of a name, key or value
MAX_CLAUSES = 1000  # clauses of a stored selector (saved groups expanded)
MAX_NESTING = 64  # levels of a stored selector's tree (saved groups expanded)
KINDS = ("group", "tag", "device")
VERSIONED = ("model.version", "agent")  # and runtime.NAME
ATTRIBUTES = ("profile", "arch", "model", "runtime", *VERSIONED)
EQUALITY = ("=", "!=")
ORDER = (">=", "<=", ">", "<")
_BARE = re.compile(r"[A-Za-z0-9._\-/+~@]+", re.ASCII)
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_SPACE = " \t\n\r\f\v"  # what the grammar skips between tokens (ASCII, as the regex)
_TOKEN = re.compile(r"""[\ \t\n\r\f\v]*(?:(?P<word>[A-Za-z0-9._\-/+~@]+)
                        |(?P<quoted>"(?:[^"\\]|\\.)*")
                        |(?P<op>>=|<=|!=|==|=|>|<)|(?P<punct>[&|():]))""", re.ASCII | re.X)
_EXAMPLES = "e.g. profile=raspberry-pi-4, label:site=plant-a, runtime.litert>=1.2"


class SelectorError(InvalidRolloutError):
    """A selector that does not parse: ``position`` is the 0-based character it stops at."""

    def __init__(self, text: str, position: int, problem: str, hint: str = "") -> None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        super().__init__(f"selector {shown!r} at character {position + 1}: {problem}",
                         hint=hint or f"see docs/fleet.md, selectors ({_EXAMPLES})")
        self.position = position


class Facts(Protocol):
    """What a selector reads of a device (:class:`edgefleet.fleet.domain.Device`)."""

    @property
    def id(self) -> str: ...
    @property
    def group(self) -> str | None: ...
    @property
    def tags(self) -> frozenset[str]: ...
    @property
    def profile(self) -> str | None: ...
    @property
    def arch(self) -> str | None: ...
    @property
    def runtimes(self) -> Mapping[str, str]: ...
    @property
    def agent_version(self) -> str | None: ...
    @property
    def model_refs(self) -> Sequence[tuple[str, str]]: ...  # (name, version) of each model
    @property
    def labels(self) -> Mapping[str, str]: ...  # set by operators: they win
    @property
    def reported_labels(self) -> Mapping[str, str]: ...


def quoted(value: str) -> str:
    """``value`` as a selector writes it: bare when it can be, else in double quotes."""
    if _BARE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Selector:
    """``group:NAME``, ``tag:NAME`` or ``device:ID``."""

    kind: str
    value: str

    def matches(self, device: Facts) -> bool:
        return _matches(self, device)

    def holds(self, device: Facts, model: Model | None) -> bool:
        if self.kind == "group":
            return device.group == self.value
        if self.kind == "tag":
            return self.value in device.tags
        return device.id == self.value

    def __str__(self) -> str:
        return f"{self.kind}:{quoted(self.value)}"


@dataclass(frozen=True)
class Label:
    """``label:KEY`` (set), ``label:KEY=VALUE`` or ``label:KEY!=VALUE``."""

    key: str
    op: str | None = None
    value: str | None = None

    def matches(self, device: Facts) -> bool:
        return _matches(self, device)

    def holds(self, device: Facts, model: Model | None) -> bool:
        found = device.labels.get(self.key)
        if found is None:
            found = device.reported_labels.get(self.key)
        if self.op is None:
            return found is not None
        return (found == self.value) == (self.op == "=")

    def __str__(self) -> str:
        tail = "" if self.op is None else f"{self.op}{quoted(self.value or '')}"
        return f"label:{quoted(self.key)}{tail}"


@dataclass(frozen=True)
class Attribute:
    """``NAME OP VALUE`` over what a device reports (versions compare as versions)."""

    name: str
    op: str
    value: str

    def matches(self, device: Facts) -> bool:
        return _matches(self, device)

    @property
    def binds(self) -> bool:
        """A clause read of the one model the selector is evaluated on (``model!=X`` reads
        them all)."""
        return self.name == "model.version" or (self.name == "model" and self.op != "!=")

    def holds(self, device: Facts, model: Model | None) -> bool:
        """Whether the clause holds, ``model`` the one its model clauses read (None: the
        device runs none)."""
        if self.name == "runtime":
            return (self.value in device.runtimes) == (self.op == "=")
        if self.name == "model" and self.op == "!=":  # it runs no model of that name
            return all(name != self.value for name, _ in device.model_refs)
        if self.name in ("model", "model.version"):
            found = None if model is None else model[0 if self.name == "model" else 1]
            return self._compare(found)
        return self._compare(_reported(device, self.name))

    def _compare(self, found: str | None) -> bool:
        if found is None:
            return self.op == "!="
        if not _versioned(self.name):
            return (found == self.value) == (self.op == "=")
        have = _version(found)
        if have is None:
            return False  # a device's version that is no version compares with nothing
        wanted = _version(self.value)
        return wanted is not None and _COMPARE[self.op](have, wanted)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{quoted(self.value)}"


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Target, ...]
    # whether a model clause inside binds to one model (worked out once, not per device)
    binds: bool = field(init=False, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "binds", any(_binds(part) for part in self.parts))

    def matches(self, device: Facts) -> bool:
        return _matches(self, device)

    def holds(self, device: Facts, model: Model | None) -> bool:
        return all(part.holds(device, model) for part in self.parts)

    def __str__(self) -> str:
        return " & ".join(_inner(part) for part in self.parts)


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Target, ...]
    # whether a model clause inside binds to one model (worked out once, not per device)
    binds: bool = field(init=False, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "binds", any(_binds(part) for part in self.parts))

    def matches(self, device: Facts) -> bool:
        return _matches(self, device)

    def holds(self, device: Facts, model: Model | None) -> bool:
        return any(part.holds(device, model) for part in self.parts)

    def __str__(self) -> str:
        return " | ".join(_inner(part) for part in self.parts)


@dataclass(frozen=True)
class Unreadable:
    """A stored selector that does not read back (a store written by an earlier
    edgefleet, or damaged): it matches no device and prints as the text it was, and a
    rollout holding one is stopped instead of breaking whatever reads it."""

    text: str
    problem: str

    def matches(self, device: Facts) -> bool:
        return False

    def holds(self, device: Facts, model: Model | None) -> bool:
        return False

    def __str__(self) -> str:
        return self.text


Target = Selector | Label | Attribute | AllOf | AnyOf | Unreadable
Model = tuple[str, str]  # (name, version) of one model a device runs


def _matches(target: Target, device: Facts) -> bool:
    """A selector of model clauses holds for a device when it holds for one of its models
    (every model clause read of that one); a device of no model is tried with none."""
    if not _binds(target):
        return target.holds(device, None)
    models = device.model_refs
    if not models:
        return target.holds(device, None)
    return any(target.holds(device, model) for model in models)


def _binds(target: Target) -> bool:
    return isinstance(target, Attribute | AllOf | AnyOf) and target.binds

_COMPARE: dict[str, Callable[[Version, Version], bool]] = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b, ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def _inner(part: Target) -> str:
    return f"({part})" if isinstance(part, AllOf | AnyOf) else str(part)


def _versioned(name: str) -> bool:
    return name in VERSIONED or name.startswith("runtime.")


@functools.lru_cache(maxsize=4096)
def _version(text: str) -> Version | None:
    """``text`` as a version (a fleet reports few distinct ones: parsed once each)."""
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _reported(device: Facts, name: str) -> str | None:
    """The device's value of attribute ``name`` (None: it does not report one)."""
    if name.startswith("runtime."):
        return device.runtimes.get(name[len("runtime."):])
    if name == "profile":
        return device.profile
    if name == "arch":
        return device.arch
    return device.agent_version if name == "agent" else None


def matches(target: Target, device: Facts) -> bool:
    """Whether ``device`` is one ``target`` means."""
    return target.matches(device)


# --- the parser -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Token:
    kind: str  # word, quoted, op, punct, end
    text: str  # a word's or quoted string's value (unescaped), an operator, a mark
    at: int


def _tokens(text: str) -> list[_Token]:
    tokens, at, end = [], 0, len(text.rstrip(_SPACE))
    while at < end:
        match = _TOKEN.match(text, at)
        if match is None or match.lastgroup is None:
            start = len(text) - len(text[at:].lstrip(_SPACE))
            if text[start] == '"':
                raise SelectorError(text, start, "this double quote is never closed",
                                    hint='close it: group:"north cams"')
            if text[start] == ",":  # "group:a, group:b": two selectors meant
                raise SelectorError(text, start, "',' does not separate selectors",
                                    hint="give one selector per line (the page's form) or "
                                         "per --to, or join them with |: group:a | group:b")
            raise SelectorError(text, start, f"{text[start]!r} is not part of a selector",
                                hint='names with spaces or other characters go in double '
                                     'quotes: group:"north cams"')
        kind = match.lastgroup
        value = match.group(kind)
        start = match.start(kind)
        if kind == "quoted":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        tokens.append(_Token(kind, value, start))
        at = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str, max_depth: int = MAX_DEPTH) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.index = 0
        self.max_depth = max_depth

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def fail(self, token: _Token, problem: str, hint: str = "") -> SelectorError:
        return SelectorError(self.text, token.at, problem, hint)

    def expect(self, mark: str, what: str) -> None:
        token = self.take()
        if token.kind != "punct" or token.text != mark:
            raise self.fail(token, f"expected {mark!r} {what}, found {_shown(token)}")

    def selector(self, depth: int) -> Target:
        parts = [self.all_of(depth)]
        while self.peek().kind == "punct" and self.peek().text == "|":
            self.take()
            parts.append(self.all_of(depth))
        return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))

    def all_of(self, depth: int) -> Target:
        parts = [self.term(depth)]
        while self.peek().kind == "punct" and self.peek().text == "&":
            self.take()
            parts.append(self.term(depth))
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def term(self, depth: int) -> Target:
        token = self.peek()
        if token.kind == "punct" and token.text == "(":
            if depth >= self.max_depth:
                raise self.fail(token, f"more than {self.max_depth} parentheses inside each "
                                       "other",
                                hint="write the selector flatter")
            self.take()
            inner = self.selector(depth + 1)
            self.expect(")", "to close the parenthesis")
            return inner
        return self.clause()

    def clause(self) -> Target:
        token = self.take()
        if token.kind != "word":
            raise self.fail(token, f"expected a clause (group:, tag:, device:, label: or an "
                                   f"attribute), found {_shown(token)}")
        if self.peek().kind == "punct" and self.peek().text == ":":
            return self.kind_clause(token)
        return self.attribute(token)

    def kind_clause(self, word: _Token) -> Target:
        self.take()  # the ':'
        if word.text not in (*KINDS, "label"):
            raise self.fail(word, f"{word.text!r} is not a selector kind",
                            hint="kinds are group:, tag:, device: and label:; attributes "
                                 f"are written NAME=VALUE ({', '.join(ATTRIBUTES)}, "
                                 "runtime.NAME)")
        name_at = self.peek()
        name = self.value(f"a name after {word.text}:")
        if word.text == "device" and not _DEVICE_ID.fullmatch(name):
            raise self.fail(name_at, f"{name[:40]!r} is no device id",
                            hint="ids are 1-64 letters, digits, '.', '_' or '-', starting "
                                 "with a letter or digit")
        if word.text != "label":
            return Selector(word.text, name)
        op = self.peek()
        if op.kind != "op":
            return Label(name)
        self.take()
        if op.text not in EQUALITY:
            raise self.fail(op, f"a label compares with = or !=, not {op.text}",
                            hint="labels are text: label:site=plant-a")
        return Label(name, op.text, self.value(f"a value after label:{name}{op.text}"))

    def attribute(self, word: _Token) -> Target:
        name = word.text
        runtime = name.startswith("runtime.") and len(name) > len("runtime.")
        if name not in ATTRIBUTES and not runtime:
            raise self.fail(word, f"{name!r} is not an attribute a device reports",
                            hint=f"attributes: {', '.join(ATTRIBUTES)}, runtime.NAME; "
                                 "or a kind: group:NAME, tag:NAME, device:ID, label:KEY=VALUE")
        op = self.take()
        if op.kind != "op":
            raise self.fail(op, f"expected an operator after {name!r}, found {_shown(op)}",
                            hint=f"e.g. {name}=VALUE" + (f" or {name}>=1.2"
                                                         if _versioned(name) else ""))
        if op.text == "==":
            raise self.fail(op, "'==' is written '='", hint=f"{name}=VALUE")
        if op.text in ORDER and not _versioned(name):
            raise self.fail(op, f"{name} is text: it compares with = or != only, not {op.text}",
                            hint="versions order: model.version, agent, runtime.NAME")
        value_at = self.peek()
        value = self.value(f"a value after {name}{op.text}")
        if _versioned(name):
            try:
                Version(value)
            except InvalidVersion:
                raise self.fail(value_at, f"{value!r} is not a version",
                                hint=f"write a version: {name}{op.text}1.2") from None
        return Attribute(name, op.text, value)

    def value(self, what: str) -> str:
        token = self.take()
        if token.kind not in ("word", "quoted"):
            raise self.fail(token, f"expected {what}, found {_shown(token)}",
                            hint='a bare word, or "text in double quotes"')
        if not 1 <= len(token.text) <= MAX_NAME or not token.text.isprintable():
            raise self.fail(token, f"a name or value is 1-{MAX_NAME} printable characters",
                            hint="shorten it" if len(token.text) > MAX_NAME else
                            "write the name between the quotes" if not token.text else
                            "leave out control characters (newlines, tabs)")
        return token.text


def _shown(token: _Token) -> str:
    return "the end" if token.kind == "end" else repr(token.text[:40])


def parse_selector(text: str) -> Target:
    """The typed tree of ``text``, or :class:`SelectorError` naming where and how to fix."""
    if not isinstance(text, str):
        raise SelectorError(repr(text)[:40], 0, "a selector is text")
    if len(text) > MAX_TEXT:
        raise SelectorError(text, MAX_TEXT, f"a selector is at most {MAX_TEXT} characters",
                            hint="save a long one as a group: fleet groups create NAME --where")
    return _parse(text, MAX_DEPTH)


def _parse(text: str, max_depth: int) -> Target:
    parser = _Parser(text, max_depth)
    if parser.peek().kind == "end":
        raise SelectorError(text, 0, "the selector is empty", hint=_EXAMPLES)
    target = parser.selector(0)
    rest = parser.peek()
    if rest.kind != "end":
        raise parser.fail(rest, f"expected '&', '|' or the end, found {_shown(rest)}",
                          hint='names with spaces go in double quotes: group:"north cams"')
    return target


def parse_stored_selector(text: str) -> Target:
    """A selector as a store holds it: canonical text of any length, up to
    :data:`MAX_NESTING` parentheses deep (what :func:`storable` let through). An earlier
    edgefleet wrote ``group:``/``tag:`` names unquoted (``group:north cams``): text of
    that form only (a kind, then 1-64 printable characters) that the grammar does not
    read is read as such, here only."""
    try:
        return _parse(text, MAX_NESTING)
    except SelectorError:
        kind, _, name = text.partition(":")
        if kind in ("group", "tag") and 1 <= len(name) <= MAX_NAME and name.isprintable():
            return Selector(kind, name)
        raise


def storable(target: Target, what: str) -> Target:
    """``target`` if a store may keep it: at most :data:`MAX_CLAUSES` clauses and
    :data:`MAX_NESTING` levels, and its canonical text reads back as the same tree; else
    :class:`InvalidRolloutError` naming ``what`` (``group:cams``, a rollout's selector)."""
    clauses, levels = _size(target)
    if clauses > MAX_CLAUSES or levels > MAX_NESTING:
        raise _too_large(what, f"{clauses} clauses, {levels} levels deep")
    text = str(target)
    try:
        back = parse_stored_selector(text)
    except SelectorError as exc:
        raise _too_large(what, f"its stored text does not read back: {exc.message}") from None
    if back != target:
        raise _too_large(what, "its stored text reads back as another selector")
    return target


def _too_large(what: str, problem: str) -> InvalidRolloutError:
    return InvalidRolloutError(
        f"{what} cannot be stored ({problem}); a stored selector, saved groups expanded, "
        f"is at most {MAX_CLAUSES} clauses and {MAX_NESTING} levels deep",
        hint="write it flatter or split it: groups that name groups multiply their clauses")


def _size(target: Target) -> tuple[int, int]:
    """(clauses, levels) of a tree."""
    if not isinstance(target, AllOf | AnyOf):
        return 1, 0
    sizes = [_size(part) for part in target.parts]
    return sum(c for c, _ in sizes), 1 + max(d for _, d in sizes)


def expand(target: Target, saved: Mapping[str, Target],
           within: frozenset[str] = frozenset(), what: str = "") -> Target:
    """``target`` with each ``group:NAME`` that names a saved selector replaced by it (and
    so on inside it; a group met again inside itself stays a plain group).

    Bounded: groups naming groups multiply, so the expansion stops with
    :class:`InvalidRolloutError` once it passes :data:`MAX_CLAUSES` clauses or
    :data:`MAX_NESTING` levels (its cost stays that of a tree of that size)."""
    return _expand(target, saved, within, [MAX_CLAUSES], 0,
                   what or f"selector {str(target)[:80]!r}")


def _expand(target: Target, saved: Mapping[str, Target], within: frozenset[str],
            budget: list[int], level: int, what: str) -> Target:
    if level > MAX_NESTING:
        raise _too_large(what, f"more than {MAX_NESTING} levels deep once "
                                "its saved groups are expanded")
    if isinstance(target, Selector) and target.kind == "group" and (
            target.value in saved and target.value not in within):
        return _expand(saved[target.value], saved, within | {target.value}, budget, level,
                       what)
    if isinstance(target, AllOf | AnyOf):
        return type(target)(tuple(_expand(part, saved, within, budget, level + 1, what)
                                  for part in target.parts))
    budget[0] -= 1
    if budget[0] < 0:
        raise _too_large(what, f"more than {MAX_CLAUSES} clauses once its "
                                "saved groups are expanded")
    return target


def names_group(target: Target, name: str) -> bool:
    """Whether ``target`` says ``group:NAME`` somewhere (saved groups not expanded)."""
    if isinstance(target, AllOf | AnyOf):
        return any(names_group(part, name) for part in target.parts)
    return isinstance(target, Selector) and target.kind == "group" and target.value == name
