"""Upstream URLs, parsed strictly and spelled one way.

Every URL the proxy may fetch — built from a durablefetch path, or named in an ``/in-progress``
or ``/delete`` body — goes through `parse_upstream`. It refuses what an allowlist could be
fooled by (credentials, dot segments, encoded slashes, odd hosts, other schemes), and its
`Upstream.url` is the one spelling of the URL: the stream key, so ``/in-progress`` finds what
``/{host}/{path}`` started. The path and query stay as the client encoded them (the durablefetch
client and `new URL(...).toString()` encode them alike); scheme and host are lower-cased, a
default port is dropped, and a fragment is never part of it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from .._types import Scope
from ..exceptions import BadRequest

__all__ = ["DEFAULT_PORTS", "Upstream", "parse_upstream", "request_target", "split_authority"]

DEFAULT_PORTS = {"http": 80, "https": 443}

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?", re.S)
_AUTHORITY = re.compile(r"(?:\[([^\]]*)\]|([^:\[\]]*))(?::([0-9]{1,5}))?")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_PRINTABLE = re.compile(r"[\x21-\x7e]*")  # printable ASCII, no space
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})|%2[Ff]|%5[Cc]")


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream URL, checked: made by `parse_upstream`.

    Example::

        upstream = parse_upstream("HTTPS://API.Example.com:443/v1/chat?id=7")
        upstream.url    # 'https://api.example.com/v1/chat?id=7'
        upstream.port   # 443
    """

    url: str
    """The whole URL, normalized: the stream key."""
    scheme: str
    """``http`` or ``https``."""
    host: str
    """Lower-case; an IPv6 address in brackets (``[::1]``)."""
    port: int
    """The port, the scheme's default one included."""
    path: str
    """As encoded by the client, starting with ``/``."""
    query: str
    """As encoded by the client, without the ``?``; may be empty."""


def parse_upstream(url: str) -> Upstream:
    """Check `url` strictly and normalize it; `BadRequest` (400) says what is wrong with it.

    Example: ``parse_upstream("https://api.example.com/v1/chat")``
    """
    if not _PRINTABLE.fullmatch(url):
        raise BadRequest("the upstream URL must be printable ASCII without spaces")
    match = _URL.fullmatch(url)
    if match is None:
        raise BadRequest(f"not an absolute http(s) URL: {url[:200]!r}")
    scheme, authority, path, query = match.group(1).lower(), match[2], match[3], match[4] or ""
    if scheme not in DEFAULT_PORTS:
        raise BadRequest(f"only http and https upstreams are proxied, not {scheme!r}")
    if "@" in authority:
        raise BadRequest("credentials (user@host) are not allowed in upstream URLs")
    split = split_authority(authority, scheme)
    if split is None:
        raise BadRequest(f"malformed upstream host {authority[:200]!r}")
    host, port = split
    path = path or "/"
    if "\\" in path or _BAD_ESCAPE.search(path):
        raise BadRequest("the upstream path has a backslash, an encoded slash or a bad % escape")
    if any(unquote(segment) in (".", "..") for segment in path.split("/")):
        raise BadRequest("the upstream path has a '.' or '..' segment")
    netloc = host if port == DEFAULT_PORTS[scheme] else f"{host}:{port}"
    normalized = f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")
    return Upstream(normalized, scheme, host, port, path, query)


def split_authority(authority: str, scheme: str) -> tuple[str, int] | None:
    """``host[:port]`` as (normalized host, port), or None when malformed."""
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        return None
    ipv6, name, port_text = match.groups()
    if ipv6 is not None:
        try:
            host = f"[{ipaddress.IPv6Address(ipv6).compressed}]"
        except ValueError:
            return None
        if "%" in ipv6:  # a zone id names an interface of this machine
            return None
    else:
        host = name.lower()
        labels = host.split(".")
        if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
            return None
    port = DEFAULT_PORTS.get(scheme, 0) if port_text is None else int(port_text)
    if not 0 < port < 65536:
        return None
    return host, port


def request_target(scope: Scope) -> str:
    """The request's path below its mount point (``root_path``), encoded as the client sent it.

    ASGI's ``path`` includes ``root_path`` (uvicorn's ``--root-path``, Starlette's `Mount`),
    and ``raw_path`` has it encoded: take as many segments off ``raw_path`` as the mount point
    has, and fall back to re-encoding ``path`` where a server's ``raw_path`` doesn't agree.
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "") or ""
    route = path[len(root) :] if root and path.startswith(root) else path
    raw = scope.get("raw_path")
    if raw:
        text = bytes(raw).decode("latin-1")
        candidates = [text]
        if root:
            depth = root.rstrip("/").count("/")
            parts = text.split("/", depth + 1)
            candidates.insert(0, "/" + parts[depth + 1] if len(parts) > depth + 1 else "")
        for candidate in candidates:
            if unquote(candidate) == route:
                return candidate
    return quote(route, safe="/:@!$&'()*+,;=~")
