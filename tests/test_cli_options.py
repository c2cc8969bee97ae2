"""Option values refused while the command line is parsed: HOST:PORT, --fleet, --device-id.

In-process, hypothesis drives the parsers (edgefleet/cli/params.py) over the whole class of
strings: each is refused with a ``typer.BadParameter`` naming the option and the form (one
line), or accepted as a host and a port a socket takes. Then the commands themselves (typer's
runner, and a few child processes): one line, exit 2, no traceback, nothing started; and
``edgefleet broker --port 0`` says the port it got.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.cli.logs import JsonFormatter
from edgefleet.cli.params import (
    OptionRefused,
    api_address,
    device_id_option,
    fleet_option,
    host_port,
    http_address,
)
from tests.conftest import Keys
from tests.hostile import HOSTILE, MiB, peak_traced_bytes, run_measured

ROOT = Path(__file__).resolve().parents[1]
EDGEFLEET = [sys.executable, "-m", "edgefleet"]
PARSE_CAP = 1 * MiB  # in-process peak of one parse of a value up to 2,000 characters
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)  # docs/protocol.md's rule

_LABEL = st.from_regex(r"\A[a-z](?:[a-z0-9-]{0,20}[a-z0-9])?\Z")
_NAMES = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_HOSTS = st.one_of(st.ip_addresses(v=4).map(str), _NAMES,
                   st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
                   st.text(max_size=40), st.sampled_from(["", "[", "[]", "[::1", "::1",
                                                          "1.2.3", "999.1.1.1", "a..b",
                                                          "-a", "a-", "localhost\n"]))
_PORTS = st.one_of(st.integers(-10, 70000).map(str), st.text(max_size=8),
                   st.sampled_from(["", "0", "65535", "65536", "99999", "-1", "+80", " 80",
                                    "80 ", "٨٠", "0x50", "1e3", "00080"]))
_ADDRESSES = st.one_of(st.builds(lambda h, p: f"{h}:{p}", _HOSTS, _PORTS),
                       st.text(max_size=2000))
_IDS = st.one_of(st.text(max_size=100), st.from_regex(_ID, fullmatch=True),
                 st.sampled_from(["p;q", "a b", "a/b", "+", "#", "", "-a", "é", "a\n",
                                  "a" * 64, "a" * 65, "%H"]))


def _refusal(call: Callable[[], object], option: str, *words: str) -> str:
    """``call`` raised a BadParameter naming ``option`` and ``words``; its one printed line."""
    result, peak = peak_traced_bytes(call)
    assert peak < PARSE_CAP, peak
    assert isinstance(result, typer.BadParameter), result
    assert isinstance(result, OptionRefused)
    message = result.format_message()
    for word in (option, *words):
        assert word in message, message
    shown = io.StringIO()
    result.show(shown)
    assert shown.getvalue().count("\n") == 1 and shown.getvalue().startswith("error: ")
    return shown.getvalue()


def _valid_host(host: str, value: str) -> None:
    """An accepted host: the address as given, or a printable ASCII DNS name."""
    if value.startswith("["):
        assert ipaddress.IPv6Address(host) == ipaddress.IPv6Address(value[1:value.index("]")])
        return
    assert value.startswith(f"{host}:") and 0 < len(host) <= 253
    assert host.isascii() and host.isprintable() and " " not in host
    if host.replace(".", "").isdigit():
        ipaddress.IPv4Address(host)  # all digits and dots: must be a real IPv4 address


@HOSTILE
@given(value=_ADDRESSES, ephemeral=st.booleans(), ipv6=st.booleans())
def test_any_host_port_is_refused_naming_the_option_or_is_a_host_and_a_port(
        value: str, ephemeral: bool, ipv6: bool) -> None:
    result, peak = peak_traced_bytes(lambda: host_port(value, "--http", ephemeral=ephemeral,
                                                       ipv6=ipv6))
    assert peak < PARSE_CAP, peak
    if isinstance(result, BaseException):
        _refusal(lambda: host_port(value, "--http", ephemeral=ephemeral, ipv6=ipv6),
                 "--http", "HOST:PORT")
        return
    host, port = result
    assert (0 if ephemeral else 1) <= port <= 65535
    assert int(value.rpartition(":")[2]) == port
    assert ipv6 or not value.startswith("[")
    _valid_host(host, value)


@HOSTILE
@given(host=st.one_of(st.ip_addresses(v=4).map(str), _NAMES), port=st.integers(1, 65535))
def test_every_well_formed_host_port_is_accepted_as_given(host: str, port: int) -> None:
    assert host_port(f"{host}:{port}", "--http", ephemeral=False, ipv6=False) == (host, port)
    assert host_port(f"[::1]:{port}", "--http") == ("::1", port)


@pytest.mark.parametrize("value", ["127.0.0.1:99999", "127.0.0.1:-1", "127.0.0.1:abc",
                                   "127.0.0.1", "127.0.0.1:", ":8080", "127.0.0.1:٨٠",
                                   "[::1]:8080", "[::1%eth0]:8080", "[bad]:1", "1.2.3:80"])
def test_the_reported_addresses_are_refused_by_both_servers(value: str) -> None:
    _refusal(lambda: http_address(value), "--http", "HOST:PORT")
    _refusal(lambda: api_address(value), "--http", "HOST:PORT")


def test_port_0_is_only_for_the_agent_and_ipv6_is_named_as_a_form() -> None:
    assert http_address("127.0.0.1:0") == "127.0.0.1:0"
    assert "1-65535" in _refusal(lambda: api_address("127.0.0.1:0"), "--http")
    assert "IPv4 only" in _refusal(lambda: http_address("[::1]:80"), "--http", "[IPv6]:PORT")
    assert host_port("[::1]:0", "--http") == ("::1", 0)
    socket.getaddrinfo(*host_port("[::1]:8080", "--http"), flags=socket.AI_NUMERICHOST)


@HOSTILE
@given(value=_IDS)
def test_any_fleet_or_device_id_is_the_topic_rule_or_refused_naming_the_option(
        value: str) -> None:
    for option, parse in (("--fleet", fleet_option), ("--device-id", device_id_option)):
        if value == "%H" and option == "--device-id":
            continue  # the systemd specifier: this host's name (next test)
        if _ID.fullmatch(value):
            assert parse(value) == value
        else:
            line = _refusal(functools.partial(parse, value), option, "letters, digits")
            assert option in line


def test_device_id_h_is_this_host_name_as_in_the_unit() -> None:
    name = socket.gethostname()
    if _ID.fullmatch(name):
        assert device_id_option("%H") == name
    else:
        _refusal(lambda: device_id_option("%H"), "--device-id")
    _refusal(lambda: fleet_option("%H"), "--fleet")


# --- the commands: typer's runner in-process, then child processes -------------------------

_AGENT = ["agent", "run", "--bundle", "b.efb", "--trusted-key", "k.pub",
          "--broker", "mqtt://127.0.0.1:1883"]
_FLEET = ["fleet", "serve", "--fleet", "f", "--trusted-key", "k.pub",
          "--broker", "mqtt://127.0.0.1:9"]
_REPORTED = [
    ([*_AGENT, "--http", "127.0.0.1:99999"], "--http"),
    ([*_AGENT, "--http", "[::1]:8080"], "--http"),
    ([*_AGENT, "--fleet", "p;q"], "--fleet"),
    ([*_AGENT, "--device-id", "a b"], "--device-id"),
    ([*_FLEET, "--http", "127.0.0.1:99999"], "--http"),
    ([*_FLEET, "--http", "127.0.0.1:-1"], "--http"),
    ([*_FLEET, "--http", "127.0.0.1:abc"], "--http"),
    ([*_FLEET, "--http", "127.0.0.1"], "--http"),
    ([*_FLEET, "--fleet", "p;q"], "--fleet"),
]


@pytest.mark.parametrize(("args", "option"), _REPORTED)
def test_each_reported_command_is_refused_in_one_line_before_it_starts(
        args: list[str], option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {option}: ") and "(fix: " in result.stderr
    assert not (tmp_path / "data").exists()  # nothing installed, no store made


def _child(args: list[str], tmp_path: Path) -> str:
    """A child process refused ``args``: exit 2, one line of stderr, no traceback."""
    done = run_measured([*EDGEFLEET, *args], timeout_s=120.0)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "serving" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.peak_rss_bytes < 400 * MiB, done.peak_rss_bytes
    return done.stderr


def test_child_processes_refuse_the_reported_commands(signing_keys: Keys,
                                                      tmp_path: Path) -> None:
    data = tmp_path / "data"
    agent = ["agent", "run", "--bundle", str(tmp_path / "b.efb"), "--trusted-key",
             str(signing_keys.public), "--broker", "mqtt://127.0.0.1:1883",
             "--data-dir", str(data)]
    assert "--fleet" in _child([*agent, "--fleet", "p;q"], tmp_path)
    assert "99999" in _child([*_FLEET, "--data-dir", str(data), "--http", "127.0.0.1:99999"],
                             tmp_path)
    assert not data.exists()


def test_service_install_refuses_a_bad_fleet_after_the_dashes(tmp_path: Path) -> None:
    line = _child(["agent", "service", "install", "--root", str(tmp_path), "--",
                   "--fleet", "p;q"], tmp_path)
    assert "--fleet" in line and "'p;q'" in line
    assert not any(tmp_path.iterdir())  # no unit written


def test_service_install_keeps_the_host_name_default(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["agent", "service", "install", "--print", "--",
                                      "--fleet", "pq"])
    if _ID.fullmatch(socket.gethostname()):
        assert result.exit_code == 0, result.output
        assert "--device-id %H --fleet pq" in result.stdout
    else:  # a host name that is no device id: said now, not at the service's start
        assert result.exit_code == 2 and "--device-id" in result.output


def test_broker_on_port_0_says_the_port_it_listens_on() -> None:
    proc = subprocess.Popen([*EDGEFLEET, "broker", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)$", line.strip())
        assert found, line
        port = int(found.group(1))
        assert port != 0
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # it is the broker's port: it accepts connections
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode in (0, -signal.SIGINT), proc.stderr


# --- JSON log lines: printable ASCII whatever the text ------------------------------------

@HOSTILE
@given(message=st.text(max_size=500))
def test_a_json_log_line_is_printable_ascii_and_round_trips(message: str) -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s", (message,), None)
    line = JsonFormatter().format(record)
    assert all(" " <= ch <= "~" for ch in line), ascii(line)
    assert json.loads(line)["message"] == message


def test_a_bidi_override_is_written_as_an_escape() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s", ("abc\u202edef",), None)
    line = JsonFormatter().format(record)
    assert "\u202e" not in line and "abc\\u202edef" in line
