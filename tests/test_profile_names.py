"""What a device reports as its profile is a name of a profile edgefleet ships, never a path:
the controller reads no file a device names (a FIFO there would hang the rollout loop)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.devices import ProfileError, builtin_profile, list_profiles
from edgefleet.fleet.compat import _profile
from tests.hostile import HOSTILE


def test_a_path_a_device_reports_is_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "evil.fifo.json"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    crafted = tmp_path / "lenient.json"
    crafted.write_text('{"name": "lenient"}')
    for reported in (str(fifo), str(crafted), "../../etc/passwd", "profiles/../x.json"):
        assert _profile(reported) is None
        with pytest.raises(ProfileError, match="not a device profile name"):
            builtin_profile(reported)


def test_every_shipped_profile_is_found_by_its_name() -> None:
    names = [p.name for p in list_profiles()]
    assert "raspberry-pi-4" in names
    assert all(builtin_profile(name).name == name for name in names)


@HOSTILE
@given(st.text(max_size=80))
def test_any_reported_profile_is_a_shipped_one_or_a_profile_error(name: str) -> None:
    shipped = {p.name for p in list_profiles()}
    try:
        profile = builtin_profile(name)
    except ProfileError as exc:
        assert exc.hint and name not in shipped
    else:
        assert profile.name == name and name in shipped
