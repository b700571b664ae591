"""Immutable connection URLs that never render their password.

``scheme://[user[:password]@]host[:port][,host[:port]...][/path][?key=value&...]``

Several hosts separated by commas are allowed (``beanstalk://h1:11300,h2:11301``);
:meth:`URL.split_hosts` turns such a URL into one URL per host. Every rendering
(``str``, ``repr``, logs, error messages) shows the password as ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, quote, unquote, urlencode

from .errors import ConfigurationError, InvalidURL

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", re.S)
_MASK = "***"


@dataclass(frozen=True)
class URL:
    scheme: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    hosts: tuple[tuple[str, int | None], ...] = ()
    path: str = ""
    query: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: "str | URL") -> "URL":
        """Parse ``text``; raise :class:`InvalidURL` (without echoing a password) if malformed."""
        if isinstance(text, URL):
            return text
        if not isinstance(text, str):
            raise InvalidURL(f"a connection URL must be a str, not {type(text).__name__}")
        m = _SCHEME.match(text.strip())
        if not m:
            # the text is not echoed: a URL that does not parse may still hold a password
            raise InvalidURL(
                "malformed connection URL: expected 'scheme://host[:port]/...', "
                "e.g. 'amqp://guest:guest@127.0.0.1:5672/'"
            )
        scheme, rest = m.group(1).lower(), m.group(2)
        rest, _, _fragment = rest.partition("#")
        rest, _, query_text = rest.partition("?")
        netloc, slash, path = rest.partition("/")
        path = slash + path if slash else ""
        username = password = None
        if "@" in netloc:
            userinfo, _, netloc = netloc.rpartition("@")
            user, colon, pw = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(pw) if colon else None
        hosts: list[tuple[str, int | None]] = []
        if netloc:
            for part in netloc.split(","):
                hosts.append(_parse_host(part, scheme))
        try:
            query = tuple(parse_qsl(query_text, keep_blank_values=True, strict_parsing=False))
        except ValueError:  # pragma: no cover - parse_qsl is lenient
            raise InvalidURL(f"malformed query string in a {scheme}:// URL") from None
        return cls(scheme, username, password, tuple(hosts), unquote(path), query)

    # -- accessors -------------------------------------------------------------------
    @property
    def host(self) -> str | None:
        return self.hosts[0][0] if self.hosts else None

    @property
    def port(self) -> int | None:
        return self.hosts[0][1] if self.hosts else None

    @property
    def params(self) -> dict[str, str]:
        """The query as a dict (the last value wins for a repeated key)."""
        return dict(self.query)

    def param(self, key: str, default: str | None = None) -> str | None:
        return self.params.get(key, default)

    def seconds(self, key: str, default: float) -> float:
        """A duration option such as ``io_timeout``: a number of seconds from 0.1 to a day."""
        raw = self.params.get(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0.1 <= value <= 86400:
            raise ConfigurationError(f"{self}: {key} must be a number of seconds from 0.1 to 86400, got {raw!r}")
        return value

    def split_hosts(self) -> list["URL"]:
        """One URL per host, for URLs that list several (high availability)."""
        if len(self.hosts) <= 1:
            return [self]
        return [replace(self, hosts=(h,)) for h in self.hosts]

    def with_query(self, **params: str) -> "URL":
        merged = dict(self.query)
        merged.update(params)
        return replace(self, query=tuple(merged.items()))

    # -- rendering -------------------------------------------------------------------
    def render(self, *, hide_password: bool = True) -> str:
        out = [self.scheme, "://"]
        if self.username is not None or self.password is not None:
            out.append(quote(self.username or "", safe=""))
            if self.password is not None:
                out.append(":" + (_MASK if hide_password else quote(self.password, safe="")))
            out.append("@")
        out.append(",".join(_render_host(h, p) for h, p in self.hosts))
        out.append(quote(self.path, safe="/:"))
        if self.query:
            out.append("?" + urlencode(self.query))
        return "".join(out)

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"URL({self.render()!r})"

    def __iter__(self) -> Iterator[str]:  # pragma: no cover - guard against str-like misuse
        raise TypeError("URL is not iterable; use str(url)")


# Host errors do not quote the URL: when a password holds '/', '#', '?' or '@', the parts
# split at the wrong place and what looks like a host or port is part of the password.
_ENCODE_HINT = "; percent-encode '/', '#', '?' and '@' in a user name or password (%2F, %23, %3F, %40)"


def _parse_host(part: str, scheme: str) -> tuple[str, int | None]:
    if part.startswith("["):
        end = part.find("]")
        if end < 0:
            raise InvalidURL(f"malformed IPv6 host in a {scheme}:// URL: expected [address]:port{_ENCODE_HINT}")
        host, rest = part[1:end], part[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise InvalidURL(f"empty host in a {scheme}:// URL (one of its comma-separated hosts){_ENCODE_HINT}")
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidURL(
                f"invalid port in a {scheme}:// URL: it must be a number from 1 to 65535{_ENCODE_HINT}"
            )
        port = int(port_text)
    return host, port


def _render_host(host: str, port: int | None) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port is None else f"{h}:{port}"


def redact(text: str) -> str:
    """Hide the password of a URL-looking string, for messages about text that did not parse."""
    return _redact(text)


def _redact(text: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1" + _MASK + "@", str(text))
