"""Text from outside is printed as it is: never read as rich markup, never as terminal control.

The class: strings made of rich markup pieces (``[``, ``]``, ``\\``, ``[/x]``, ``[/]``,
``[link=...]``, ``[bold]``), emoji codes, format placeholders, control and bidi characters
and any other text, placed in error messages and hints, table titles and cells, and in the
fields of the fleet's views (models, rollouts, devices, manifests). They go through the
printing functions in this process; the two crashes found outside (a ``key_id`` of
``[/x]`` in ``manifest.sig``, a member named ``[/x]``) are run through ``edgefleet agent
install`` and ``edgefleet fleet push``. Piped output is printed whole: no wrapping or
cutting at 80 columns, in tables, error lines and ``--help``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from edgefleet.agent.protocol.bundle import build_bundle
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.manifest import Manifest
from edgefleet.agent.protocol.signing import SigningKey
from edgefleet.cli import output
from edgefleet.cli.fleet.app import _rollout_view
from edgefleet.cli.fleet.models import render_model
from edgefleet.cli.fleet.top import render
from edgefleet.cli.output import PIPED_WIDTH, emit, fail, styled, table, visible
from tests import tamper
from tests.conftest import Keys
from tests.fleet_harness import TOKEN, Fleet
from tests.hostile import HOSTILE, run_measured

EDGEFLEET = [sys.executable, "-m", "edgefleet"]
PIECES = ["[", "]", "\\", "[/x]", "[/]", "[link=https://evil.example]", "[bold]", "[red]x[/red]",
          "[/link]", "\x1b[2J", "\x1b]8;;https://evil\x07", "\r", "\n", "\t", "\x00", "\x7f",
          "\x9b", "\u202e", "\u2028", ":smile:", "{}", "{0}", "%s", "[[", "]]", "[@click]"]
TEXT = st.lists(st.sampled_from(PIECES) | st.text(max_size=8), min_size=1,
                max_size=6).map("".join)


@pytest.fixture()
def wide() -> Iterator[None]:
    """Both consoles as a pipe has them, whatever terminal runs the tests."""
    widths = output.console.width, output.err_console.width
    output.console.width = output.err_console.width = PIPED_WIDTH
    yield
    output.console.width, output.err_console.width = widths


def _printed(call: Callable[[], object], console: Console | None = None) -> str:
    console = console or output.console
    with console.capture() as captured, contextlib.suppress(typer.Exit):
        call()
    return captured.get()


def _frame(a: str, b: str) -> dict[str, Any]:
    wave = {"wave": 1, "up_to": b, "devices": 1, "done": 0, "succeeded": 0, "failed": 0,
            "waiting": 1}
    return {"ts_ms": 0, "fleet": a, "controller": {"role": "follower", "id": a, "leader": b},
            "devices": {"total": 1, "online": 0, "offline": 1},
            "versions": [{"version": a, "devices": 1, "inferences": b, "p50_ms": None,
                          "p95_ms": None, "error_rate": None, "agreement": None}],
            "update_states": {a: 1},
            "rollouts": [{"id": a, "model": b, "to": [a, b], "state": "RUNNING", "reason": b,
                          "wave": 1, "waves": [wave]}],
            "attention": [{"device": a, "online": False, "group": b, "model": a,
                           "update": b, "detail": a}], "attention_total": 3}


def _rollout(a: str, b: str) -> dict[str, Any]:
    return {"id": a, "state": "RUNNING", "reason": b, "wave": 0,
            "spec": {"model": {"name": a, "version": b}, "selectors": [a, b], "waves": [b],
                     "gates": {a: b}, "soak_s": 1.0, "device_timeout_s": 2.0},
            "devices": [{"device": a, "wave": 0, "state": "FAILED", "reason": b}]}


def _model(a: str, b: str) -> dict[str, Any]:
    tensor = {"name": a, "shape": [1, 2], "dtype": b, "quantization": None}
    return {"name": a, "version": b, "sha256": a, "format": b, "runtime": a,
            "min_runtime_version": b, "size": 1, "pushed_by": a,
            "manifest": {"task": a, "created": b, "targets": [a, b], "lineage": {a: b},
                         "optimization": {"quantization": a}, "inputs": [tensor],
                         "outputs": [tensor], "metrics": {a: b}}}


def _whole(text: str, out: str) -> bool:
    shown = visible(text).strip()
    return not shown or shown in out


def test_outside_text_is_printed_literally_by_every_printing_function(wide: None) -> None:
    @HOSTILE
    @given(a=TEXT, b=TEXT)
    def check(a: str, b: str) -> None:
        assert styled("[bold]{}[/] and [yellow]{}[/]", a, b).plain == \
            f"{visible(a)} and {visible(b)}"
        error = _printed(lambda: fail(EdgefleetError(a, hint=b)), output.err_console)
        assert error == f"error: {visible(a)}" + (f" (fix: {visible(b)})" if b else "") + "\n"
        out = _printed(lambda: emit({}, False, table(a, [{"x": a, "y": b}], ["x", b])))
        assert _whole(a, out) and _whole(b, out)
        assert _whole(a, _printed(lambda: emit(a, False)))
        for view in (render(_frame(a, b), problem=b), _rollout_view(_rollout(a, b)),
                     render_model(_model(a, b))):
            out = _printed(functools.partial(output.console.print, view))
            assert _whole(a, out) and _whole(b, out)
            assert "\x1b[2J" not in out and "\u202e" not in out

    check()


def test_control_characters_are_shown_as_escapes() -> None:
    assert visible("a\x1b[2Jb\u202ec\nd\x00") == "a\\x1b[2Jb\\u202ec\\x0ad\\x00"
    assert styled("{}", "[/x]").plain == "[/x]"


# --- the crashes found outside, through the commands ----------------------------------------

@pytest.fixture(scope="module")
def hostile_bundles(signing_keys: Keys, tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, Path]:
    """A bundle whose manifest.sig names key "[/x]", and one with a member named "[/x]"."""
    manifest = Manifest.model_validate({
        "schema_version": 1, "name": "tiny", "version": "1.0.0",
        "created": "2026-01-01T00:00:00Z", "format": "tflite", "runtime": {"name": "litert"},
        "files": {}, "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}]})
    members = tamper.members(build_bundle(manifest, {"model.tflite": b"TFL3" * 100,
                                                     "health.npz": b"PK" * 50},
                                          SigningKey.load(signing_keys.secret)))
    signature = json.loads(members["manifest.sig"])
    folder = tmp_path_factory.mktemp("markup")
    bundles = {"unknown key [/x]": tamper.pack({**members, "manifest.sig": json.dumps(
                   {**signature, "key_id": "[/x]"}).encode()}),
               "member '[/x]' is not a bundle file": tamper.pack({**members, "[/x]": b"x"})}
    paths: dict[str, Path] = {}
    for words, raw in bundles.items():
        paths[words] = folder / f"{len(paths)}.efb"
        paths[words].write_bytes(raw)
    return paths


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and "MarkupError" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_agent_install_names_a_markup_key_id_and_member_literally(
        hostile_bundles: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    for words, path in hostile_bundles.items():
        result = run_measured([*EDGEFLEET, "agent", "install", str(path), "--data-dir",
                               str(tmp_path / "device"), "--trusted-key",
                               str(signing_keys.public)])
        assert result.returncode == 2, result.stderr
        assert words in _one_line_error(result.stderr)
    assert not (tmp_path / "device" / "slots").exists() or not any(
        (tmp_path / "device" / "slots").rglob("*.efb"))


def test_fleet_push_names_a_markup_key_id_and_member_literally(
        fleet: Fleet, hostile_bundles: dict[str, Path]) -> None:
    fleet.start_controller()
    assert fleet.api is not None
    for words, path in hostile_bundles.items():
        result = run_measured([*EDGEFLEET, "fleet", "push", str(path), "--controller",
                               fleet.api.url, "--token", TOKEN])
        assert result.returncode == 2, result.stderr
        assert words in _one_line_error(result.stderr)
    assert fleet.client().get("/api/v1/models") == []
    history = run_measured([*EDGEFLEET, "fleet", "history", "--controller", fleet.api.url,
                            "--token", TOKEN])  # piped: each refusal on one line, whole
    assert history.returncode == 0, history.stderr
    refused = [line for line in history.stdout.splitlines() if "model.push" in line]
    assert len(refused) == 2 and "…" not in history.stdout, history.stdout
    assert "unknown key [/x] (trusted: " in refused[0] + refused[1]
    assert any("'[/x]' is not a bundle file (a bundle holds only health.npz, labels.txt, "
               "manifest.json, manifest.sig, model.onnx, model.onnx.enc, model.tflite, "
               "model.tflite.enc)" in line for line in refused), history.stdout


# --- piped output is whole ---------------------------------------------------------------

def test_piped_tables_and_errors_print_long_values_whole(signing_keys: Keys,
                                                         tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 120) / ("e" * 120)
    long_dir.mkdir(parents=True)  # status refuses a data dir that does not exist
    status = run_measured([*EDGEFLEET, "agent", "status", "--data-dir", str(long_dir)])
    assert status.returncode == 0, status.stderr
    assert f"slots in {long_dir}" in status.stdout
    missing = long_dir / ("f" * 100 + ".efb")
    result = run_measured([*EDGEFLEET, "agent", "install", str(missing), "--data-dir",
                           str(tmp_path / "device"), "--trusted-key", str(signing_keys.public)])
    assert result.returncode == 2
    assert str(missing) in _one_line_error(result.stderr)
    assert "…" not in status.stdout + result.stderr


def test_piped_help_prints_each_option_whole() -> None:
    result = run_measured([*EDGEFLEET, "fleet", "serve", "--help"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("--controller-id" in line and "[env var: EDGEFLEET_CONTROLLER_ID]" in line
               for line in lines), result.stdout
    assert any("a dead leader is replaced within this many seconds (>= 3 x --tick; "
               "docs/scale-out.md)" in line for line in lines), result.stdout
