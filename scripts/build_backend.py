"""edgefleet's build backend: setuptools, after a check that the parts are linked in.

The parts live at the repository's top level (agent/, converter/, fleet/, devices/) and
reach the one installed namespace through links in edgefleet/. A checkout made without
symbolic links (Windows, ``core.symlinks=false``) has small text files there instead, and
setuptools would build, without a word, a wheel holding none of the parts. This stops
that build with the cause and the fix. An sdist holds real folders, so it builds anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (every hook setuptools offers)

PARTS = ("agent", "converter", "fleet", "devices")


def _check_links() -> None:
    for part in PARTS:
        if not (Path("edgefleet") / part / "__init__.py").is_file():
            raise RuntimeError(
                f"edgefleet/{part} is not the folder {part}/: this checkout was made without "
                f"symbolic links, and the wheel would hold no edgefleet.{part}; clone again "
                "with links (git -c core.symlinks=true clone ...), or build from the sdist")


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    _check_links()
    return str(_setuptools.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    _check_links()
    return str(_setuptools.build_editable(wheel_directory, config_settings,
                                          metadata_directory))


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    _check_links()
    return str(_setuptools.build_sdist(sdist_directory, config_settings))
