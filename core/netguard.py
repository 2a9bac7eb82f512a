"""SSRF guard for outbound webhooks: only public http(s) addresses, checked twice.

A URL is checked when a caller names it (so a bad one gets a clear 4xx) and again when a
delivery is sent, because DNS can change in between. :class:`GuardedTransport` closes the
last gap (DNS rebinding between the check and the connect): it resolves the host itself,
checks every address, and connects to a checked address.

Slow peers are bounded too: a lookup waits at most ``dns_timeout_s`` (on a thread of its own,
so a hung resolver costs a daemon thread, not the caller), and inside :func:`deadline` every
connect, write and read of the guarded transport shares one total budget, so a receiver that
trickles a byte a second cannot hold a sender past it (httpx's timeouts are per read).

``allow_private`` lifts the refusal of loopback, private, link-local and other non-public
addresses, for tests and closed networks. Cloud metadata endpoints stay refused even then:
no receiver lives there, and they hand out instance credentials.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
DNS_TIMEOUT_S = 2.0
# When the attempt running in this thread (or task) must be over, by time.monotonic().
_deadline: ContextVar[float | None] = ContextVar("inferq_netguard_deadline", default=None)


class UnsafeURL(ValueError):
    """The URL may not be called; the message says why."""


class HostNotResolved(UnsafeURL):
    """The host did not resolve. At send time this is worth retrying; when given, refused."""


def check_url(url: str, *, allow_private: bool, dns_timeout_s: float = DNS_TIMEOUT_S) -> None:
    """Refuse a URL that is not plain http(s) to a public address.

    Args:
        url: The webhook URL as the caller wrote it.
        allow_private: Accept loopback, private and link-local addresses (never metadata).
        dns_timeout_s: How long the host lookup may take; slower is "does not resolve".

    Raises:
        UnsafeURL: With the reason, naming the offending host or address.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"webhook URL must be http or https, not {parts.scheme or 'none'!r}")
    host = parts.hostname
    if not host:
        raise UnsafeURL("webhook URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeURL(f"webhook URL has a bad port: {exc}") from None
    addresses = resolve(host, port, timeout_s=dns_timeout_s)
    check_addresses(host, addresses, allow_private=allow_private)


def resolve(host: str, port: int, *, timeout_s: float = DNS_TIMEOUT_S) -> list[IPAddress]:
    """Every address ``host`` resolves to; an IP literal is taken as is, with no lookup.

    ``getaddrinfo`` cannot be interrupted, so it runs on a daemon thread the caller stops
    waiting for after ``timeout_s`` (or the current :func:`deadline`, if sooner).
    """
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            found.append(exc)

    wait_s = min(timeout_s, _remaining(timeout_s) or 0.0)
    thread = threading.Thread(target=lookup, name="inferq-dns", daemon=True)
    thread.start()
    thread.join(wait_s)
    if not found:
        raise HostNotResolved(f"webhook host {host!r} did not resolve within {wait_s:.2g}s")
    infos = found[0]
    if isinstance(infos, Exception):
        raise HostNotResolved(f"webhook host {host!r} does not resolve: {infos}")
    # Drop an IPv6 zone ("fe80::1%eth0"); the address itself is what gets checked.
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def check_addresses(host: str, addresses: Iterable[IPAddress], *, allow_private: bool) -> None:
    """Refuse the host if any of its addresses is unsafe: a resolver may hand out any of them."""
    if host.lower().rstrip(".") in METADATA_HOSTS:
        raise UnsafeURL(f"webhook host {host!r} is a cloud metadata endpoint")
    for address in addresses:
        reason = _unsafe_reason(address, allow_private=allow_private)
        if reason:
            shown = host if host == str(address) else f"{host!r} ({address})"
            raise UnsafeURL(f"webhook host {shown} is {reason}; only public addresses are allowed")


def _unsafe_reason(address: IPAddress, *, allow_private: bool) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private:
        return None
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),
    )
    return next((reason for failed, reason in checks if failed), None)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound what the guarded transport does inside the block to ``seconds`` in all."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def _remaining(timeout: float | None) -> float | None:
    """The smaller of ``timeout`` and what is left of the deadline (0 when it has passed)."""
    end = _deadline.get()
    if end is None:
        return timeout
    left = max(end - time.monotonic(), 0.0)
    return left if timeout is None else min(timeout, left)


def _budget(timeout: float | None, error: type[Exception]) -> float | None:
    left = _remaining(timeout)
    if left is not None and left <= 0:
        raise error("the attempt's deadline has passed")
    return left


class _DeadlineStream(httpcore.NetworkStream):
    """Every read and write gets what is left of the deadline as its timeout."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _budget(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _budget(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        budget = _budget(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, budget))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _GuardedBackend(httpcore.SyncBackend):
    """Resolve, check, then connect to a checked address (TLS still verifies the host name)."""

    def __init__(self, *, allow_private: bool, dns_timeout_s: float) -> None:
        self._allow_private = allow_private
        self._dns_timeout_s = dns_timeout_s

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = resolve(host, port, timeout_s=self._dns_timeout_s)
        check_addresses(host, addresses, allow_private=self._allow_private)
        for address in addresses[:-1]:  # like a browser: the next address if one is down
            try:
                return self._connect(str(address), port, timeout, local_address, socket_options)
            except httpcore.ConnectError:
                continue
        return self._connect(str(addresses[-1]), port, timeout, local_address, socket_options)

    def _connect(
        self,
        address: str,
        port: int,
        timeout: float | None,
        local_address: str | None,
        socket_options: Iterable[Any] | None,
    ) -> httpcore.NetworkStream:
        budget = _budget(timeout, httpcore.ConnectTimeout)
        stream = super().connect_tcp(address, port, budget, local_address, socket_options)
        return _DeadlineStream(stream)


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport that refuses to connect to an unsafe address, whatever DNS says.

    Use it with ``trust_env=False`` on the client: a proxy taken from the environment would
    be connected to instead, and the check would be about the proxy.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        limits: httpx.Limits | None = None,
        dns_timeout_s: float = DNS_TIMEOUT_S,
    ) -> None:
        super().__init__()
        limits = limits or httpx.Limits()
        # HTTPTransport has no public hook for the network backend; its pool is replaced with
        # one built the same way, plus the guarded backend.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedBackend(
                allow_private=allow_private, dns_timeout_s=dns_timeout_s
            ),
        )
