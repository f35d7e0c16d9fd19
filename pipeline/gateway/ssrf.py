"""The SSRF guard: may tuwen make a request to this URL, and to which address exactly?

Anything tuwen fetches or calls on a user's behalf (webhook callbacks, remote pictures, each hop of a
redirect) goes through a ``UrlGuard``. The host must match the allow-list (``*``: any host); the host
is resolved and *every* address must be public (loopback, private, link-local, reserved, the 6to4 relay
range … are refused unless ``allow_private``); an IPv6 address that embeds an IPv4 one (mapped,
compatible, SIIT, NAT64, 6to4, Teredo) must pass with that IPv4 address too. ``UrlGuard.target`` returns
the URL pinned to the address that was checked (Host header and TLS SNI keep the name), so DNS rebinding
cannot slip in between the check and the request. The caller decides the error codes: the guard raises
``InvalidUrl`` or ``ForbiddenTarget``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from tuwen.pipeline.schema import MAX_URL_CHARS


class InvalidUrl(ValueError):
    """Not an http(s) URL with a host, carries credentials, too long, or its host does not resolve."""


class ForbiddenTarget(ValueError):
    """A well-formed URL the guard refuses: a host off the allow-list, or a non-public address."""


@dataclass(frozen=True)
class Target:
    """Where one request goes: the URL with the host replaced by a checked address."""

    url: str
    host_header: str
    sni_hostname: str | None


def host_allowed(host: str, patterns: Sequence[str]) -> bool:
    """``example.com`` matches itself; ``*.example.com`` its subdomains; ``*`` any host."""
    host = host.lower().rstrip(".")
    for p in (p.strip().lower().rstrip(".") for p in patterns):
        if p == "*" or p == host or (p.startswith("*.") and host.endswith(p[1:])):
            return True
    return False


#: Public by Python's tables, but never a target: the 6to4 relay anycast range (RFC 7526), and the
#: local-use NAT64 prefix (RFC 8215), whose embedded IPv4 sits at an operator-chosen offset.
_REFUSED = (ipaddress.ip_network("192.88.99.0/24"), ipaddress.ip_network("64:ff9b:1::/48"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries and would reach: IPv4-mapped ``::ffff:a.b.c.d``,
    IPv4-compatible ``::a.b.c.d``, SIIT ``::ffff:0:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``, 6to4
    ``2002:AABB:CCDD::`` and Teredo ``2001:0::/32`` (its server and its client)."""
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _SIIT or ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return [low]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return []


def address_allowed(address: str, allow_private: bool) -> bool:
    """Whether a request may go to this address. An IPv6 address that embeds IPv4 is judged by what
    it embeds as well, so ``[::127.0.0.1]`` or ``[2002:7f00:1::]`` cannot reach loopback."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    inner: list[ipaddress.IPv4Address] = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # the same host as its IPv4 form
    for candidate in (ip, *inner):
        if candidate.is_unspecified or candidate.is_multicast:
            return False
        if not allow_private and (not candidate.is_global or any(candidate in net for net in _REFUSED)):
            return False
    return True


@dataclass(frozen=True)
class UrlGuard:
    """Which URLs may be requested: hosts matching ``allowed_hosts``, at public addresses only unless
    ``allow_private``. ``what`` names the URL in error messages ("callback", "picture URL" …)."""

    allowed_hosts: tuple[str, ...]
    allow_private: bool = False
    what: str = "URL"

    def target(self, url: str) -> Target:
        """Check ``url`` now (resolving its host) and pin it to the checked address."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise InvalidUrl(f"{self.what} is not a valid URL: {exc}") from exc
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host or len(url) > MAX_URL_CHARS:
            raise InvalidUrl(f"{self.what} must be an http(s) URL with a host (at most {MAX_URL_CHARS} characters)")
        if parts.username is not None or parts.password is not None:
            raise InvalidUrl(f"{self.what} must not carry credentials")
        if not host_allowed(host, self.allowed_hosts):
            raise ForbiddenTarget(f"{self.what} host {host!r} is not in the allow-list")
        ip = self._resolve(host, port)
        netloc = (f"[{ip}]" if ":" in ip else ip) + (f":{parts.port}" if parts.port else "")
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        return Target(pinned, parts.netloc, host if parts.scheme == "https" else None)

    def _resolve(self, host: str, port: int) -> str:
        """The address to use; every address the host resolves to must be allowed."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise InvalidUrl(f"{self.what} host {host!r} does not resolve") from exc
        addresses = sorted({str(info[4][0]) for info in infos})
        refused = [a for a in addresses if not address_allowed(a, self.allow_private)]
        if refused:
            raise ForbiddenTarget(f"{self.what} host {host!r} resolves to a non-public address ({refused[0]})")
        if not addresses:
            raise InvalidUrl(f"{self.what} host {host!r} has no address")
        return addresses[0]
