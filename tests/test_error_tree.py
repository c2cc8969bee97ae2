"""The error tree drawn in docs/architecture.md is the one the classes make.

The tree is rendered from ``EdgefleetError.__subclasses__()`` after importing every module
of edgefleet, and compared with the "Error tree" section of the doc. After changing an
error class, print the tree with ``python -m tests.test_error_tree`` and paste it there.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import typer

import edgefleet
from edgefleet.agent.protocol.errors import EdgefleetError

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
_SECTION = re.compile(r"^## Error tree\n(.*?)(?=^## |\Z)", re.MULTILINE | re.DOTALL)
_BLOCK = re.compile(r"^```text\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _modules() -> list[ModuleType]:
    """Every module of edgefleet, imported (``__main__`` modules run a CLI: not those)."""
    names = [m.name for m in pkgutil.walk_packages(edgefleet.__path__, "edgefleet.")
             if not m.name.endswith(".__main__")]
    return [importlib.import_module(name) for name in sorted(names)]


def _lines(cls: type[EdgefleetError], prefix: str = "", last: bool = True,
           top: bool = True) -> list[tuple[str, type[EdgefleetError]]]:
    branch = "" if top else prefix + ("└── " if last else "├── ")
    below = "" if top else prefix + ("    " if last else "│   ")
    children = sorted((c for c in cls.__subclasses__() if c.__module__.startswith("edgefleet.")),
                      key=lambda c: c.__name__)
    lines = [(branch + cls.__name__, cls)]
    for index, child in enumerate(children):
        lines += _lines(child, below, index == len(children) - 1, top=False)
    return lines


def render() -> str:
    """The tree, one error a line: its name, its module, and whether it is transient
    (errors that tests or scripts derive are not edgefleet's, and are left out)."""
    _modules()
    lines = _lines(EdgefleetError)
    width = max(len(text) for text, _ in lines) + 2
    module_width = max(len(_module(cls)) for _, cls in lines) + 2
    return "\n".join(
        f"{text:<{width}}{_module(cls):<{module_width}}{'transient' if cls.transient else ''}"
        .rstrip() for text, cls in lines) + "\n"


def _module(cls: type) -> str:
    return cls.__module__.removeprefix("edgefleet.")


def _documented() -> str:
    section = _SECTION.search(DOC.read_text(encoding="utf-8"))
    assert section, f'{DOC} has no "## Error tree" section'
    block = _BLOCK.search(section.group(1))
    assert block, 'the "Error tree" section has no ```text block'
    return block.group(1)


def _all_errors() -> list[type[EdgefleetError]]:
    return [cls for _, cls in _lines(EdgefleetError)]


def test_the_documented_tree_is_the_tree_of_the_classes() -> None:
    assert _documented() == render(), (
        "docs/architecture.md's error tree differs from the classes; paste the output of "
        "'python -m tests.test_error_tree' into its \"Error tree\" section")


def test_every_error_of_edgefleet_descends_from_edgefleet_error() -> None:
    strays = [f"{module.__name__}.{name}" for module in _modules()
              for name, obj in vars(module).items()
              if inspect.isclass(obj) and issubclass(obj, BaseException)
              and obj.__module__ == module.__name__
              and not issubclass(obj, EdgefleetError | typer.BadParameter)]
    assert strays == [], "raise errors of the tree (a CLI option refusal may be typer's)"


def test_each_error_has_one_name_and_says_what_it_means() -> None:
    _modules()
    errors = _all_errors()
    names = [cls.__name__ for cls in errors]
    assert sorted({n for n in names if names.count(n) > 1}) == []
    assert [cls.__name__ for cls in errors if not (cls.__doc__ or "").strip()] == []


def test_each_error_has_one_parent_in_the_tree() -> None:
    _modules()
    assert [cls.__name__ for cls in _all_errors()
            if sum(issubclass(base, EdgefleetError) for base in cls.__bases__) > 1] == []


if __name__ == "__main__":
    print(render(), end="")
