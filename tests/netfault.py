"""Network faults for the tests: cut devices off the broker and the controller, flap their
link, slow it down.

A link stands between some devices (agent processes) and the services of the test
(broker, controller), which listen on ``link.service_host``. Two kinds, one interface
(:class:`Link`):

- :class:`NetNamespace`, where ``ip netns`` works (as root): the devices run in a network
  namespace of their own (``link.command(argv)``), joined to the root namespace by a veth
  pair on a private /30. A cut takes the host side of the link down, so packets are
  dropped (a connection attempt hangs, as behind a dead uplink), and closes the TCP
  connections that crossed it (``ss -K``), as a router that lost its state or an expired
  keepalive would. ``rate_limit`` shapes the traffic towards the devices (``tc tbf``).
- :class:`ProxyLink`, elsewhere: the devices run on loopback and reach the broker through
  a :class:`TcpProxy` and the controller's HTTP server through a forward proxy
  (``http_proxy``), both under the test's control, with the same cut, restore, flap and
  rate limit (a cut holds new connections unanswered until the restore).

:func:`open_link` picks the namespace when this machine allows it (checked once;
``EDGEFLEET_TEST_LINK=proxy`` forces the proxies). Traffic only goes to loopback or to
the namespaces made here; only the interfaces made here are ever touched.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import urlsplit

__all__ = ["Link", "LinkError", "NetNamespace", "ProxyLink", "TcpProxy", "netns_supported",
           "open_link"]

log = logging.getLogger(__name__)
_POOL = ipaddress.IPv4Network("10.213.0.0/16")  # private; split into /30s, one per link
_COUNTER = itertools.count()


class LinkError(RuntimeError):
    """A link could not be set up or changed."""


class Link(Protocol):
    """What the tests need of a link, whichever kind it is."""

    kind: str
    service_host: str  # where the services must listen to be reachable from behind the link
    device_host: str  # the source address the services see for the devices behind it

    def broker_url(self, url: str) -> str:
        """The URL a device behind the link uses for the broker at ``url``."""

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run behind the link."""

    def env(self) -> dict[str, str]:
        """Environment a process behind the link needs on top of the test's."""

    def cut(self) -> None: ...
    def restore(self) -> None: ...
    def flap(self, times: int, down_s: float, up_s: float) -> None: ...
    def rate_limit(self, kbit: int | None) -> None: ...
    def close(self) -> None: ...


def _run(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LinkError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise LinkError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _flap(link: Link, times: int, down_s: float, up_s: float) -> None:
    for _ in range(times):
        link.cut()
        time.sleep(down_s)
        link.restore()
        time.sleep(up_s)


class NetNamespace:
    """A network namespace joined to the root one by a veth pair on a private /30."""

    kind = "netns"

    def __init__(self) -> None:
        n = next(_COUNTER)
        self.name = f"edgefleet-test-{os.getpid()}-{n}"
        self.host_if, self.ns_if = f"ef{os.getpid()}h{n}", f"ef{os.getpid()}n{n}"
        subnet = _free_subnet(os.getpid() * 64 + n)
        host, device = list(subnet.hosts())
        self.service_host, self.device_host = str(host), str(device)
        self._made = False
        try:
            self._make(subnet.prefixlen)
        except LinkError:
            self.close()
            raise

    def _make(self, prefix: int) -> None:
        _run("ip", "netns", "add", self.name)
        self._made = True
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
             "netns", self.name)
        _run("ip", "addr", "add", f"{self.service_host}/{prefix}", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "-n", self.name, "addr", "add", f"{self.device_host}/{prefix}", "dev",
             self.ns_if)
        _run("ip", "-n", self.name, "link", "set", self.ns_if, "up")
        _run("ip", "-n", self.name, "link", "set", "lo", "up")

    def broker_url(self, url: str) -> str:
        return url

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def env(self) -> dict[str, str]:
        return {}

    def cut(self) -> None:
        """Drop every packet across the link and close the connections that crossed it."""
        _run("ip", "link", "set", self.host_if, "down")
        # services' ends (root namespace), then the devices' ends (their namespace)
        _run("ss", "-K", "-t", "dst", self.device_host)
        _run("ip", "netns", "exec", self.name, "ss", "-K", "-t", "dst", self.service_host)

    def restore(self) -> None:
        _run("ip", "link", "set", self.host_if, "up")

    def flap(self, times: int, down_s: float, up_s: float) -> None:
        """``times`` cuts of ``down_s`` seconds, each followed by ``up_s`` seconds up."""
        _flap(self, times, down_s, up_s)

    def rate_limit(self, kbit: int | None) -> None:
        """Shape the traffic towards the devices to ``kbit`` kbit/s (None: no limit)."""
        if kbit is None:
            with contextlib.suppress(LinkError):  # none set
                _run("tc", "qdisc", "del", "dev", self.host_if, "root")
            return
        burst = max(2, kbit // 80)  # kbytes: about 100 ms at the rate, at least a packet
        _run("tc", "qdisc", "replace", "dev", self.host_if, "root", "tbf", "rate",
             f"{kbit}kbit", "burst", f"{burst}kb", "latency", "2s")

    def close(self) -> None:
        """Remove the veth pair (both ends) and the namespace; never raises."""
        with contextlib.suppress(LinkError):
            _run("ip", "link", "del", self.host_if)
        if self._made:
            with contextlib.suppress(LinkError):
                _run("ip", "netns", "del", self.name)
            self._made = False

    def __repr__(self) -> str:
        return f"NetNamespace({self.name}: {self.service_host} <-> {self.device_host})"


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /30 of the pool that no interface here uses, chosen from ``seed``."""
    used = [ipaddress.ip_interface(word).ip for line in _run("ip", "-4", "-o", "addr").splitlines()
            for word in line.split() if "/" in word and word[0].isdigit()]
    subnets = list(_POOL.subnets(new_prefix=30))
    for step in range(len(subnets)):
        candidate = subnets[(seed + step) % len(subnets)]
        if not any(address in candidate for address in used):
            return candidate
    raise LinkError(f"no free /30 left in {_POOL}")


class TcpProxy:
    """Forwards connections from 127.0.0.1:``port`` to ``target`` on loopback, under control.

    Without a target it is an HTTP forward proxy (``http_proxy``): the upstream is read
    from each request line, which must name a loopback address. ``cut`` closes every open
    connection and holds new ones unanswered until ``restore``; ``rate_limit`` slows the
    bytes towards the client.
    """

    def __init__(self, target: tuple[str, int] | None = None) -> None:
        if target is not None:
            _check_loopback(target[0])
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._up = threading.Condition()
        self._is_cut = False
        self._closed = False
        self._open: set[socket.socket] = set()
        self._bytes_per_s: float | None = None
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name=f"tcp-proxy-{self.port}")
        self._thread.start()

    def cut(self) -> None:
        with self._up:
            self._is_cut = True
            connections, self._open = self._open, set()
        for sock in connections:
            _reset(sock)

    def restore(self) -> None:
        with self._up:
            self._is_cut = False
            self._up.notify_all()

    def rate_limit(self, kbit: int | None) -> None:
        self._bytes_per_s = None if kbit is None else kbit * 1000 / 8

    def close(self) -> None:
        with self._up:
            self._closed, self._is_cut = True, False
            connections, self._open = self._open, set()
            self._up.notify_all()
        self._server.close()
        for sock in connections:
            _reset(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._up:  # a cut link answers nothing: hold the connection until the restore
            self._up.wait_for(lambda: not self._is_cut or self._closed)
            if self._closed:
                client.close()
                return
        try:
            head, target = b"", self.target
            if target is None:
                head, target = _forward_head(client)
            upstream = socket.create_connection(target, timeout=10)
            upstream.settimeout(None)
        except (OSError, ValueError) as exc:
            log.info("proxy %d: %s", self.port, exc)
            client.close()
            return
        with self._up:
            if self._is_cut or self._closed:
                _reset(client)
                _reset(upstream)
                return
            self._open.update((client, upstream))
        if head:
            upstream.sendall(head)
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        self._pump(upstream, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, limited: bool) -> None:
        try:
            while data := source.recv(4096):
                sink.sendall(data)
                rate = self._bytes_per_s
                if limited and rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            with self._up:
                self._open.discard(source)
                self._open.discard(sink)
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _check_loopback(host: str) -> None:
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the test proxy only forwards to loopback, not {host}")


def _forward_head(client: socket.socket) -> tuple[bytes, tuple[str, int]]:
    """Read a proxied request's head; rewrite ``GET http://h:p/x`` to ``GET /x``."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(4096)
        if not chunk or len(head) > 65536:
            raise ValueError("no complete HTTP request head")
        head += chunk
    line, _, rest = head.partition(b"\r\n")
    method, url, version = line.decode("latin-1").split(" ")
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an absolute http URL: {url}")
    _check_loopback(parts.hostname)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return (f"{method} {path or '/'} {version}".encode("latin-1") + b"\r\n" + rest,
            (parts.hostname, parts.port or 80))


def _reset(sock: socket.socket) -> None:
    """Close with a reset (no FIN handshake), as a dropped connection looks to its ends."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class ProxyLink:
    """The devices on loopback, behind proxies the test controls: one per broker, one for
    HTTP (given to the agent as ``http_proxy``)."""

    kind = "proxy"
    service_host = "127.0.0.1"
    device_host = "127.0.0.1"

    def __init__(self) -> None:
        self.http = TcpProxy()
        self._proxies = [self.http]

    def broker_url(self, url: str) -> str:
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        proxy = TcpProxy((parts.hostname, parts.port))
        self._proxies.append(proxy)
        return f"{parts.scheme}://127.0.0.1:{proxy.port}"

    def command(self, argv: list[str]) -> list[str]:
        return list(argv)

    def env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self.http.port}"
        return {"http_proxy": proxy, "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}

    def cut(self) -> None:
        for proxy in self._proxies:
            proxy.cut()

    def restore(self) -> None:
        for proxy in self._proxies:
            proxy.restore()

    def flap(self, times: int, down_s: float, up_s: float) -> None:
        _flap(self, times, down_s, up_s)

    def rate_limit(self, kbit: int | None) -> None:
        for proxy in self._proxies:
            proxy.rate_limit(kbit)

    def close(self) -> None:
        for proxy in self._proxies:
            proxy.close()


@functools.cache
def netns_supported() -> bool:
    """True when a namespace and a veth pair can be made here (root, iproute2, ss)."""
    if os.environ.get("EDGEFLEET_TEST_LINK") == "proxy":
        return False
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "ss")):
        return False
    try:
        NetNamespace().close()
    except LinkError as exc:
        log.info("no network namespaces here (%s): the tests use TCP proxies", exc)
        return False
    return True


@contextlib.contextmanager
def open_link() -> Iterator[Link]:
    """A namespace where the machine allows it, else proxies; removed on the way out."""
    link: Link = NetNamespace() if netns_supported() else ProxyLink()
    try:
        yield link
    finally:
        link.close()
