"""A Session's configuration: arguments and ``DEDALUS_*`` environment variables, checked.

Pure apart from reading the environment. Everything is validated here, before a Session
exists, so a bad argument never opens a connection. The API key ends up in exactly one
place, the header dict handed to the transport (:attr:`Settings.headers`, never shown in
a repr).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Final, Literal
from urllib.parse import urlsplit

import attrs

from ._checks import check_count, check_instance, check_seconds
from ._errors import ConfigurationError
from ._version import __version__

__all__ = ["DEFAULT_BASE_URL", "AuthScheme", "Settings", "resolve"]

DEFAULT_BASE_URL: Final = "https://dcs.dedaluslabs.ai"
AuthScheme = Literal["x-api-key", "bearer"]


@attrs.frozen
class Settings:
    """What a Session is configured with, resolved and checked."""

    base_url: str
    org_id: str | None
    auth_scheme: AuthScheme
    request_timeout: float
    max_connections: int
    #: every request's headers, the key among them
    headers: dict[str, str] = attrs.field(repr=False)


def resolve(
    api_key: str | None,
    *,
    base_url: str | None,
    org_id: str | None,
    auth_scheme: AuthScheme | None,
    request_timeout: float,
    max_connections: int,
    allow_insecure_http: bool,
) -> Settings:
    """Arguments first, then the environment; raise naming the argument and the fix."""
    if auth_scheme not in (None, "x-api-key", "bearer"):
        raise ConfigurationError(
            f"auth_scheme must be 'x-api-key' or 'bearer', got {auth_scheme!r}"
        )
    key, scheme = _credentials(api_key, auth_scheme)
    url = _check_base_url(
        base_url
        if base_url is not None
        else os.environ.get("DEDALUS_BASE_URL") or DEFAULT_BASE_URL,
        allow_insecure_http,
    )
    check_instance("org_id", org_id, str, "a str")
    org = org_id if org_id is not None else os.environ.get("DEDALUS_ORG_ID")
    if org:
        _check_header_value("org_id", org)
    seconds = check_seconds("request_timeout", request_timeout)
    assert seconds is not None
    headers = {"Accept": "application/json", "User-Agent": f"dedalus-async/{__version__}"}
    if scheme == "bearer":
        headers["Authorization"] = f"Bearer {key}"
    else:
        headers["x-api-key"] = key
    if org:
        headers["X-Dedalus-Org-Id"] = org
    return Settings(
        base_url=url,
        org_id=org or None,
        auth_scheme=scheme,
        request_timeout=seconds,
        max_connections=check_count("max_connections", max_connections),
        headers=headers,
    )


def _credentials(api_key: str | None, auth_scheme: AuthScheme | None) -> tuple[str, AuthScheme]:
    if api_key is not None:
        if not isinstance(api_key, str):
            raise TypeError(f"api_key must be a str, not {type(api_key).__name__}")
        if not api_key.strip():
            raise ConfigurationError("api_key must be a non-empty string")
        _check_header_value("api_key", api_key)
        return api_key, auth_scheme or "x-api-key"
    bearer = os.environ.get("DEDALUS_API_KEY")
    x_key = os.environ.get("DEDALUS_X_API_KEY")
    if auth_scheme == "x-api-key" and x_key:
        _check_header_value("DEDALUS_X_API_KEY", x_key)
        return x_key, "x-api-key"
    if bearer:
        _check_header_value("DEDALUS_API_KEY", bearer)
        return bearer, auth_scheme or "bearer"
    if x_key:
        _check_header_value("DEDALUS_X_API_KEY", x_key)
        return x_key, auth_scheme or "x-api-key"
    raise ConfigurationError(
        "no API key: pass Session(api_key=...) or set DEDALUS_API_KEY (sent as a Bearer "
        "token) or DEDALUS_X_API_KEY (sent as x-api-key); to try things without an "
        "account, run `dedalus-async serve-local` or use dedalus_async.testing.FakeDedalus"
    )


def _check_header_value(name: str, value: str) -> None:
    # a line break in a header value would let the caller inject headers; the value itself
    # is never shown (it may be the key)
    if any(c in value for c in "\r\n\x00"):
        raise ConfigurationError(
            f"{name} must not contain line breaks or NUL characters", field=name
        )


def _is_loopback(host: str) -> bool:
    # "localhost" itself, and loopback addresses. Not other names under .localhost: a
    # resolver is free to send those anywhere, and the key would go with them in clear.
    # ``host`` is urlsplit's hostname: lower case, an IPv6 address without its brackets.
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_base_url(base_url: str, allow_insecure_http: bool) -> str:
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str, not {type(base_url).__name__}")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"base_url must be an http(s) URL like {DEFAULT_BASE_URL!r}, got {base_url!r}",
            field="base_url",
        )
    if parts.username or parts.password:
        raise ConfigurationError(
            "base_url must not carry credentials; pass api_key instead", field="base_url"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError("base_url must not have a query or fragment", field="base_url")
    if parts.scheme == "http" and not allow_insecure_http and not _is_loopback(parts.hostname):
        raise ConfigurationError(
            f"refusing plain http to {parts.hostname}: the API key would travel in clear "
            "text; use https, or pass allow_insecure_http=True if you really mean it",
            field="base_url",
        )
    return base_url.rstrip("/")
