"""The desired and reported states of several models (schema version 2) beside version 1:
what each side reads, and what a reader of version 1 only says of version 2."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.protocol.errors import EdgefleetError, SchemaVersionError
from edgefleet.agent.protocol.payloads import (
    MAX_MODELS,
    DesiredModels,
    DesiredState,
    ReportedState,
    decode,
    decode_desired,
    desired_entries,
    encode,
)
from edgefleet.agent.protocol.schema import validate_document

SHA = "ab" * 32


def _entry(name: str, version: str = "2.0.0", **changes: Any) -> dict[str, Any]:
    return {"schema_version": 1, "name": name, "version": version, "sha256": SHA,
            "url": f"https://fleet/{name}.efb", "size": 10, "rollout": "r1", **changes}


def _desired(**models: dict[str, Any]) -> bytes:
    return json.dumps({"schema_version": 2, "models": models, "issued_at": 5}).encode()


def test_a_version_2_desired_state_gives_each_model_its_entry() -> None:
    desired = decode_desired(_desired(detector=_entry("detector"), vad=_entry("vad", "1.0.0")))
    assert isinstance(desired, DesiredModels)
    entries = desired_entries(desired)
    assert {name: e.version for name, e in entries.items()} == {"detector": "2.0.0",
                                                                "vad": "1.0.0"}
    assert decode_desired(encode(desired)) == desired


def test_a_version_1_desired_state_is_the_one_entry_of_the_model_it_names() -> None:
    desired = decode_desired(json.dumps(_entry("digits")).encode())
    assert isinstance(desired, DesiredState)
    assert list(desired_entries(desired)) == ["digits"]


@pytest.mark.parametrize(("models", "reason"), [
    ({"detector": _entry("classifier")}, "names bundle 'classifier'"),
    ({"detector": _entry("detector", schema_version=2)}, "entries are version 1"),
    ({f"m{i}": _entry(f"m{i}") for i in range(MAX_MODELS + 1)}, "at most 16"),
    ({"../x": _entry("x")}, "names bundle 'x'"),
])
def test_a_version_2_desired_state_that_does_not_hold_together_is_refused(
        models: dict[str, dict[str, Any]], reason: str) -> None:
    with pytest.raises(EdgefleetError, match=reason):
        decode_desired(_desired(**models))


def test_a_desired_state_of_an_unknown_version_names_the_versions_read() -> None:
    with pytest.raises(SchemaVersionError, match=r"schema_version 3; this edgefleet reads "
                                                 r"\[1, 2\]") as raised:
        decode_desired(json.dumps({**_entry("digits"), "schema_version": 3}).encode())
    assert "upgrade edgefleet" in (raised.value.hint or "")


def test_an_agent_of_version_1_refuses_version_2_with_the_reason_and_the_fix() -> None:
    """Its reader is ``decode(DesiredState, ...)``, which this version keeps as it was."""
    with pytest.raises(SchemaVersionError, match=r"schema_version 2; this edgefleet reads "
                                                 r"\[1\]") as raised:
        decode(DesiredState, _desired(digits=_entry("digits")))
    assert "upgrade edgefleet" in (raised.value.hint or "")


def _reported(**changes: Any) -> dict[str, Any]:
    return {"schema_version": 2, "fleet": "f", "device": "d", "agent_version": "0.1.0",
            "models": {"detector": {"active": {"name": "detector", "version": "1.0.0",
                                               "sha256": SHA}, "slot": "a", "serving": True},
                       "vad": {"update": {"state": "DOWNLOADING"}}}, **changes}


def test_a_version_2_report_describes_each_model() -> None:
    reported = decode(ReportedState, json.dumps(_reported()))
    models = reported.model_reports()
    assert sorted(models) == ["detector", "vad"]
    assert models["detector"].active is not None and models["detector"].slot == "a"
    assert models["vad"].update.state == "DOWNLOADING" and models["vad"].active is None


def test_a_version_1_report_is_the_report_of_its_one_model() -> None:
    old = {"schema_version": 1, "fleet": "f", "device": "d", "agent_version": "0.0.9",
           "active": {"name": "digits", "version": "1.0.0", "sha256": SHA}, "slot": "b",
           "serving": True}
    models = decode(ReportedState, json.dumps(old)).model_reports()
    assert list(models) == ["digits"] and models["digits"].slot == "b"
    assert models["digits"].serving
    empty = {**old, "active": None}
    assert decode(ReportedState, json.dumps(empty)).model_reports() == {}


@pytest.mark.parametrize(("changes", "reason"), [
    ({"models": None}, "models is given from schema_version 2 on"),
    ({"schema_version": 1}, "models is given from schema_version 2 on"),
    ({"models": {"vad": {"active": {"name": "kws", "version": "1.0.0", "sha256": SHA}}}},
     "serves bundle 'kws'"),
])
def test_a_report_whose_models_do_not_match_its_version_is_refused(
        changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(EdgefleetError, match=reason):
        decode(ReportedState, json.dumps(_reported(**changes)))


class _ControllerOfVersion1(ReportedState):
    """What a controller before version 2 reads a report with."""

    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({1})


def test_a_controller_of_version_1_refuses_a_version_2_report_with_the_reason() -> None:
    with pytest.raises(SchemaVersionError, match=r"schema_version 2; this edgefleet reads "
                                                 r"\[1\]"):
        validate_document(_ControllerOfVersion1, _reported(), "state/reported")


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(models=st.dictionaries(st.text(max_size=10), _JSON, max_size=4),
       version=st.sampled_from([1, 2, 3, "2", None, True]))
def test_any_desired_document_is_read_or_refused_by_name(models: dict[str, Any],
                                                          version: Any) -> None:
    raw = json.dumps({"schema_version": version, "models": models}).encode()
    try:
        desired = decode_desired(raw)
    except EdgefleetError as exc:
        assert exc.message
        return
    assert isinstance(desired, DesiredModels)
    assert all(name == entry.name for name, entry in desired.models.items())
