"""docs/guarantees.md points at tests: every one it names exists, so no promise loses its proof
silently when a test is renamed or removed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")}


def test_every_test_the_guarantees_name_exists() -> None:
    text = (ROOT / "docs" / "guarantees.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(named) >= 40
    missing = [f"{file}::{test}" if test else file for file, test in named
               if not (ROOT / file).exists() or (test and test not in _tests_in(ROOT / file))]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
