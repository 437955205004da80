"""`Allowlist`: the upstream URLs a proxy may fetch (no open proxy, no SSRF).

A pattern is a whole URL, ``scheme://host[:port]/path``, with globs:

- ``*`` matches one path segment (not an empty one), one host label, or any port;
  ``*`` as the scheme matches ``http`` and ``https``.
- ``**`` matches any number of path segments (``/api/**`` needs the slash: it matches
  ``/api/`` and ``/api/v1/chat``, not ``/api``; in the middle, ``/a/**/b`` matches ``/a/b``
  too), or one or more host labels (``**.example.com``: every subdomain, at any depth).
- ``*.example.com`` matches one label's subdomains (``api.example.com``, not
  ``example.com`` nor ``a.b.example.com``).
- Without a port, the scheme's default port (80, 443) is the only one; ``:*`` is any port.
- The pattern ``**`` alone matches every URL: an open proxy, as an explicit choice.

Globs are whole segments and labels (``api-*`` is refused, not guessed at). Scheme and host
match without regard to case, the path (as the client encoded it) exactly; the query is never
part of the match. An IPv6 host matches only a literal ``[addr]`` in a pattern (or ``**``).
An empty allowlist allows nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..exceptions import BadRequest
from ._url import DEFAULT_PORTS, Upstream, parse_upstream, split_authority

__all__ = ["Allowlist"]

_PATTERN = re.compile(r"([^:/]+)://(\[[^\]]*\]|[^/:]*)(?::([^/]*))?(/.*)?", re.S)
_ANY_LABEL = r"[^.\[\]:]+"


@dataclass(frozen=True)
class _Pattern:
    scheme: str | None  # None: http or https
    host: re.Pattern[str]
    port: int | None  # None: the scheme's default port
    any_port: bool
    path: re.Pattern[str]

    def matches(self, upstream: Upstream) -> bool:
        if self.scheme is not None and upstream.scheme != self.scheme:
            return False
        if not self.any_port:
            wanted = DEFAULT_PORTS[upstream.scheme] if self.port is None else self.port
            if upstream.port != wanted:
                return False
        return bool(self.host.fullmatch(upstream.host) and self.path.fullmatch(upstream.path))


class Allowlist:
    """The upstream URLs a proxy may fetch, as glob patterns over whole URLs.

    Example::

        allow = Allowlist(["https://api.openai.com/v1/**", "http://127.0.0.1:*/**"])
        allow.allows("https://api.openai.com/v1/chat/completions")  # True
        allow.allows("https://api.openai.com/v1")                   # False: /** needs the slash
        allow.allows("http://api.openai.com/v1/models")             # False: another scheme

    ``*`` is one path segment, host label or any port; ``**`` any depth; the scheme's default
    port is implied; ``Allowlist(["**"])`` allows everything; ``Allowlist([])`` nothing. A
    malformed pattern raises `ValueError` saying what is wrong.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        if isinstance(patterns, str):
            raise TypeError("Allowlist takes a list of patterns, not one string")
        self.patterns = tuple(patterns)
        self._all = "**" in self.patterns
        self._compiled = [_compile(p) for p in self.patterns if p != "**"]

    def __repr__(self) -> str:
        return f"Allowlist({list(self.patterns)!r})"

    def allows(self, url: str | Upstream) -> bool:
        """Whether the proxy may fetch `url` (a malformed URL is never allowed)."""
        if isinstance(url, str):
            try:
                url = parse_upstream(url)
            except BadRequest:
                return False
        return self._all or any(pattern.matches(url) for pattern in self._compiled)


def _compile(pattern: str) -> _Pattern:
    def invalid(why: str) -> ValueError:
        return ValueError(f"invalid allowlist pattern {pattern!r}: {why}")

    match = _PATTERN.fullmatch(pattern)
    if match is None:
        raise invalid("expected scheme://host[:port]/path, e.g. 'https://api.example.com/**'")
    scheme, host, port, path = match.groups()
    scheme = scheme.lower()
    if scheme not in ("http", "https", "*"):
        raise invalid("the scheme must be http, https or *")
    if path is None:
        raise invalid(f"it has no path: '{pattern}/**' allows every path of that host")
    if any(c in path for c in "?#@") or "@" in host:
        raise invalid("a pattern matches scheme, host, port and path only (no ?, # or @)")
    any_port = port == "*"
    number: int | None = None
    if port is not None and not any_port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise invalid(f"the port must be a number from 1 to 65535 or *, not {port!r}")
        number = int(port)
    return _Pattern(
        None if scheme == "*" else scheme,
        _host_regex(host.lower(), invalid),
        number,
        any_port,
        _path_regex(path, invalid),
    )


def _host_regex(host: str, invalid: Callable[[str], ValueError]) -> re.Pattern[str]:
    if host.startswith("["):
        split = split_authority(host, "http")
        if split is None:
            raise invalid("malformed IPv6 address")
        return re.compile(re.escape(split[0]))
    parts = []
    for label in host.split("."):
        if label == "*":
            parts.append(_ANY_LABEL)
        elif label == "**":
            parts.append(rf"{_ANY_LABEL}(?:\.{_ANY_LABEL})*")
        elif "*" in label or split_authority(label, "http") is None:
            raise invalid(f"{label!r} is not a host label, * or **")
        else:
            parts.append(re.escape(label))
    return re.compile(r"\.".join(parts))


def _path_regex(path: str, invalid: Callable[[str], ValueError]) -> re.Pattern[str]:
    segments = path.split("/")[1:]
    regex = ""
    for i, segment in enumerate(segments):
        if segment == "**":
            # Last: anything after the slash (so /api/** needs it); inside: zero or more.
            regex += "/.*" if i == len(segments) - 1 else "(?:/[^/]*)*"
        elif segment == "*":
            regex += "/[^/]+"
        elif "*" in segment:
            raise invalid(f"{segment!r}: * and ** must be whole path segments")
        else:
            regex += "/" + re.escape(segment)
    return re.compile(regex, re.S)
