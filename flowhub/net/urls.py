"""URL policy: which URLs flowhub fetches, and which hosts a host allow-list lets through.

URLs are parsed once, with urllib3's ``parse_url``: the parser ``requests`` itself connects with.
(``urllib.parse`` reads ``http://127.0.0.1:8000\\@github.com/x`` as a URL on github.com, while
``requests`` connects to 127.0.0.1:8000, so checking one parse and connecting with the other lets
a URL pass a check and go elsewhere.) On top of that, URLs checked against an allow-list must have a
plain shape: http(s), no credentials, no backslashes, no whitespace or control characters.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Optional

from urllib3.exceptions import LocationParseError
from urllib3.util import Url, parse_url

DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_HOST = "*"
_PLAIN_HOST = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\])$")


class Origin(NamedTuple):
    """Where a request for a URL connects: scheme, host (lower case, IPv6 in brackets) and port."""

    scheme: str
    host: str
    port: int


def _parse(url: str) -> Url:
    try:
        return parse_url(url)
    except (LocationParseError, ValueError) as exc:
        raise ValueError(f"{url!r:.200} is not a valid URL ({exc})") from None


def http_origin(url: str) -> Origin:
    """The origin of an http(s) URL; ``ValueError`` for any other scheme or a URL without a host."""
    if not isinstance(url, str):
        raise ValueError(f"a URL must be a string, not {type(url).__name__}")
    parts = _parse(url)
    scheme = (parts.scheme or "").lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{url!r:.200} is not an http(s) URL: flowhub downloads over HTTP(S) only "
                         "(for a local file, copy it with shutil.copy).")
    if not parts.host:
        raise ValueError(f"{url!r:.200} names no host: write it as {scheme}://host/path.")
    host = parts.host.lower()
    return Origin(scheme, host[:-1] if host.endswith(".") else host, parts.port or DEFAULT_PORTS[scheme])


def plain_origin(url: str) -> Origin:
    """:func:`http_origin`, also refusing (``PermissionError``) what a URL fetched on someone else's behalf
    must not hold: credentials, backslashes, whitespace, control characters, an unusual host."""
    if isinstance(url, str):
        if "\\" in url:
            raise PermissionError(f"{url!r:.200} contains a backslash, which URL parsers read differently")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise PermissionError(f"{url!r:.200} contains whitespace or a control character")
    origin = http_origin(url)
    if _parse(url).auth is not None or "@" in re.split(r"[/?#]", url.split("//", 1)[-1], maxsplit=1)[0]:
        raise PermissionError(f"{url!r:.200} carries credentials (user@host), which are refused")
    if not _PLAIN_HOST.match(origin.host):
        raise PermissionError(f"{url!r:.200} has an unusual host name {origin.host!r:.80}")
    return origin


def authority(url: str) -> str:
    """``host`` or ``host:port`` of ``url`` (the port only when it is not the scheme's default)."""
    origin = http_origin(url)
    return origin.host if origin.port == DEFAULT_PORTS[origin.scheme] else f"{origin.host}:{origin.port}"


def _entry(text: str) -> Optional[tuple]:
    """An allow-list entry as ``(host, port or None)``; ``None`` port means the URL scheme's default."""
    text = text.strip().lower()
    if not text or text == ANY_HOST:
        return None
    parts = _parse(text if "://" in text else f"http://{text}")
    return ((parts.host or "").rstrip("."), parts.port)


def allows(origin: Origin, entries: Iterable[str]) -> bool:
    """True if ``origin`` matches one of ``entries`` (``host``, ``host:port``, an URL, or ``*`` for any).

    A bare ``host`` matches only the URL scheme's default port (80 or 443): another port on the
    same host is another service.
    """
    for text in entries:
        if text.strip() == ANY_HOST:
            return True
        entry = _entry(text)
        if entry is None:
            continue
        host, port = entry
        if host == origin.host and (port or DEFAULT_PORTS[origin.scheme]) == origin.port:
            return True
    return False


def check_allowed(url: str, entries: Iterable[str]) -> Origin:
    """The origin of ``url`` if it has a plain shape and its host is allowed; else ``PermissionError``."""
    entries = list(entries)
    try:
        origin = plain_origin(url)
    except ValueError as exc:
        raise PermissionError(str(exc)) from None
    if not allows(origin, entries):
        where = origin.host if origin.port == DEFAULT_PORTS[origin.scheme] else f"{origin.host}:{origin.port}"
        raise PermissionError(f"{url!r:.200} is on {where}, which is not allowed")
    return origin
