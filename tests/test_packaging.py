"""Packaging promises: the agent extra stays small, and the import contracts hold."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

HEAVY = {"tensorflow", "tensorflow-cpu", "tf-keras", "keras", "tf2onnx", "torch", "jax"}
ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: str, extras: frozenset[str]) -> list[Requirement]:
    found = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        marker: Marker | None = req.marker
        if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
            found.append(req)
    return found


def resolve(dist: str, extras: frozenset[str]) -> set[str]:
    """Every distribution ``dist[extras]`` pulls in, read from the installed metadata."""
    seen: set[str] = set()
    todo = [(dist, extras)]
    while todo:
        name, wanted = todo.pop()
        for req in _requirements(name, wanted):
            key = _norm(req.name)
            if key == _norm(dist):
                todo.append((dist, frozenset(req.extras)))
                continue
            if key not in seen:
                seen.add(key)
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_agent_extra_pulls_in_no_tensorflow() -> None:
    resolved = resolve("edgefleet", frozenset({"agent"}))
    assert {"ai-edge-litert", "onnxruntime", "paho-mqtt", "numpy"} <= resolved
    assert not resolved & HEAVY, f"the agent extra pulls in {sorted(resolved & HEAVY)}"


def test_converter_extra_does_pull_in_tensorflow() -> None:
    # The walk above would pass vacuously if it resolved nothing; the converter must see TF.
    resolved = resolve("edgefleet", frozenset({"converter"}))
    assert resolved & {"tensorflow", "tensorflow-cpu"}


def test_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is part of the [dev] extra"
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _children(folder: Path, package: str) -> set[str]:
    return {f"{package}.{p.stem}" for p in folder.iterdir()
            if (p.suffix == ".py" and not p.name.startswith("__")) or (p / "__init__.py").exists()}


def test_every_module_of_the_project_has_a_layer() -> None:
    """A module left out of the layers contract would be free to import anything."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"]
                   if c["type"] == "layers"]
    layered = {name.strip() for layer in contract["layers"]
               for name in re.split(r"[:|]", layer)}
    modules = (_children(ROOT / "edgefleet", "edgefleet") - {"edgefleet.agent"}
               | _children(ROOT / "agent", "edgefleet.agent"))
    assert modules <= layered, f"give {sorted(modules - layered)} a layer in pyproject.toml"


def test_the_root_package_imports_nothing() -> None:
    """``edgefleet/__init__.py`` runs before every module of every layer and sits in none:
    an import there would hand the bottom layer whatever it names (typer, the CLI)."""
    import ast

    tree = ast.parse((ROOT / "edgefleet" / "__init__.py").read_text())
    imports = [ast.unparse(node) for node in ast.walk(tree)
               if isinstance(node, (ast.Import, ast.ImportFrom))
               and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
    assert imports == [], "keep edgefleet/__init__.py free of imports"
