"""A Session's configuration (`_config.resolve`): every argument against the environment,
each refusal with the message a user reads, and the headers that result. Found by mutation
testing (`nox -s mutation`, CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import Any

import pytest

from dedalus_async import ConfigurationError
from dedalus_async._config import DEFAULT_BASE_URL, Settings, resolve
from dedalus_async._version import __version__

# an "X" in the key: a mutant that also refuses letters of its own "XX" marker shows up
KEY = "sk-Xy-0123456789"
ENV = ("DEDALUS_API_KEY", "DEDALUS_X_API_KEY", "DEDALUS_BASE_URL", "DEDALUS_ORG_ID")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def _resolve(api_key: str | None = KEY, **options: Any) -> Settings:
    arguments: dict[str, Any] = {
        "base_url": None,
        "org_id": None,
        "auth_scheme": None,
        "request_timeout": 30.0,
        "max_connections": 10,
        "allow_insecure_http": False,
    }
    arguments.update(options)
    return resolve(api_key, **arguments)


def test_defaults() -> None:
    settings = _resolve()
    assert settings == Settings(
        base_url=DEFAULT_BASE_URL,
        org_id=None,
        auth_scheme="x-api-key",
        request_timeout=30.0,
        max_connections=10,
        headers={
            "Accept": "application/json",
            "User-Agent": f"dedalus-async/{__version__}",
            "x-api-key": KEY,
        },
    )
    assert KEY not in repr(settings)


def test_bearer_and_org_headers() -> None:
    settings = _resolve(auth_scheme="bearer", org_id="org-1", request_timeout=2)
    assert settings.headers == {
        "Accept": "application/json",
        "User-Agent": f"dedalus-async/{__version__}",
        "Authorization": f"Bearer {KEY}",
        "X-Dedalus-Org-Id": "org-1",
    }
    assert (settings.auth_scheme, settings.org_id) == ("bearer", "org-1")
    assert settings.request_timeout == 2.0
    assert isinstance(settings.request_timeout, float)


def test_environment_fills_in_what_arguments_leave_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDALUS_API_KEY", "env-Xkey")
    monkeypatch.setenv("DEDALUS_BASE_URL", "https://eu.example.com/")
    monkeypatch.setenv("DEDALUS_ORG_ID", "org-env")
    settings = _resolve(None)
    assert settings.headers["Authorization"] == "Bearer env-Xkey"
    assert settings.headers["X-Dedalus-Org-Id"] == "org-env"
    assert (settings.base_url, settings.org_id, settings.auth_scheme) == (
        "https://eu.example.com",
        "org-env",
        "bearer",
    )
    # arguments win over the environment
    settings = _resolve("arg-key", base_url="https://arg.example.com", org_id="org-arg")
    assert settings.headers["x-api-key"] == "arg-key"
    assert (settings.base_url, settings.org_id) == ("https://arg.example.com", "org-arg")


def test_an_empty_org_is_no_org(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDALUS_ORG_ID", "")
    settings = _resolve()
    assert settings.org_id is None
    assert "X-Dedalus-Org-Id" not in settings.headers
    assert _resolve(org_id="").org_id is None


def test_an_empty_base_url_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDALUS_BASE_URL", "")
    assert _resolve().base_url == DEFAULT_BASE_URL


def test_x_api_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDALUS_X_API_KEY", "x-Xkey")
    settings = _resolve(None)
    assert (settings.auth_scheme, settings.headers["x-api-key"]) == ("x-api-key", "x-Xkey")
    assert "Authorization" not in settings.headers
    # asked for as a bearer token, it is sent as one
    settings = _resolve(None, auth_scheme="bearer")
    assert settings.headers["Authorization"] == "Bearer x-Xkey"


def test_which_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDALUS_API_KEY", "bearer-Xkey")
    monkeypatch.setenv("DEDALUS_X_API_KEY", "x-Xkey")
    assert _resolve(None).headers["Authorization"] == "Bearer bearer-Xkey"
    # asking for x-api-key picks the variable made for it
    settings = _resolve(None, auth_scheme="x-api-key")
    assert (settings.auth_scheme, settings.headers["x-api-key"]) == ("x-api-key", "x-Xkey")
    monkeypatch.delenv("DEDALUS_X_API_KEY")
    # ...and without it, sends the other key the way that was asked
    assert _resolve(None, auth_scheme="x-api-key").headers["x-api-key"] == "bearer-Xkey"


def test_no_key_says_every_way_to_give_one() -> None:
    with pytest.raises(ConfigurationError) as caught:
        _resolve(None)
    assert str(caught.value) == (
        "no API key: pass Session(api_key=...) or set DEDALUS_API_KEY (sent as a Bearer "
        "token) or DEDALUS_X_API_KEY (sent as x-api-key); to try things without an "
        "account, run `dedalus-async serve-local` or use dedalus_async.testing.FakeDedalus"
    )


def test_empty_key_variables_are_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDALUS_API_KEY", "")
    monkeypatch.setenv("DEDALUS_X_API_KEY", "")
    with pytest.raises(ConfigurationError, match=r"^no API key"):
        _resolve(None, auth_scheme="x-api-key")


@pytest.mark.parametrize(
    ("api_key", "error", "message"),
    [
        (b"key", TypeError, r"^api_key must be a str, not bytes$"),
        ("", ConfigurationError, r"^api_key must be a non-empty string$"),
        ("  ", ConfigurationError, r"^api_key must be a non-empty string$"),
        ("a\rb", ConfigurationError, r"^api_key must not contain line breaks or NUL characters$"),
        ("a\nb", ConfigurationError, r"^api_key must not contain line breaks"),
        ("a\x00b", ConfigurationError, r"^api_key must not contain line breaks"),
    ],
)
def test_bad_keys(api_key: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        _resolve(api_key)  # type: ignore[arg-type]
    if isinstance(api_key, str) and api_key.strip():
        assert api_key not in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "scheme"),
    [
        ("DEDALUS_API_KEY", None),
        ("DEDALUS_X_API_KEY", None),
        ("DEDALUS_X_API_KEY", "x-api-key"),
    ],
)
def test_a_bad_key_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, scheme: str | None
) -> None:
    monkeypatch.setenv(variable, "key\nInjected: 1")
    with pytest.raises(
        ConfigurationError, match=rf"^{variable} must not contain line breaks or NUL characters$"
    ):
        _resolve(None, auth_scheme=scheme)


def test_a_bad_org_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=r"^org_id must not contain line breaks"):
        _resolve(org_id="org\r\n")
    monkeypatch.setenv("DEDALUS_ORG_ID", "org\ninjected")
    with pytest.raises(ConfigurationError, match=r"^org_id must not contain line breaks"):
        _resolve()
    with pytest.raises(TypeError, match=r"^org_id must be a str, not int$"):
        _resolve(org_id=5)


def test_auth_scheme_is_checked() -> None:
    with pytest.raises(
        ConfigurationError, match=r"^auth_scheme must be 'x-api-key' or 'bearer', got 'Bearer'$"
    ):
        _resolve(auth_scheme="Bearer")
    assert _resolve(auth_scheme="x-api-key").auth_scheme == "x-api-key"


def test_numbers_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^request_timeout must be positive finite seconds"):
        _resolve(request_timeout=0)
    with pytest.raises(ValueError, match=r"^max_connections must be at least 1, got 0$"):
        _resolve(max_connections=0)
    assert _resolve(max_connections=1).max_connections == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080",
        "http://127.0.0.1:1",
        "http://127.8.9.10",
        "http://[::1]:8080",
    ],
)
def test_plain_http_to_loopback_is_allowed(url: str) -> None:
    assert _resolve(base_url=url + "/").base_url == url


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://example.com", "example.com"),
        ("http://10.0.0.1", "10.0.0.1"),
        ("http://app.localhost", "app.localhost"),
        ("http://[::2]", "::2"),
    ],
)
def test_plain_http_elsewhere_is_refused(url: str, host: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        _resolve(base_url=url)
    assert str(caught.value) == (
        f"refusing plain http to {host}: the API key would travel in clear text; use "
        "https, or pass allow_insecure_http=True if you really mean it"
    )
    assert _resolve(base_url=url, allow_insecure_http=True).base_url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com", r"^base_url must be an http\(s\) URL like 'https://dcs"),
        ("https://", r"^base_url must be an http\(s\) URL like .*, got 'https://'$"),
        ("example.com", r"^base_url must be an http\(s\) URL"),
        ("https://u:p@example.com", r"^base_url must not carry credentials; pass api_key instead$"),
        ("https://u@example.com", r"^base_url must not carry credentials"),
        ("https://:p@example.com", r"^base_url must not carry credentials"),
        ("https://example.com/?a=1", r"^base_url must not have a query or fragment$"),
        ("https://example.com/#top", r"^base_url must not have a query or fragment$"),
    ],
)
def test_bad_base_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        _resolve(base_url=url)


def test_base_url_must_be_text() -> None:
    with pytest.raises(TypeError, match=r"^base_url must be a str, not bytes$"):
        _resolve(base_url=b"https://example.com")


def test_https_keeps_its_path() -> None:
    assert _resolve(base_url="https://example.com/api//").base_url == "https://example.com/api"
    assert _resolve(base_url="HTTPS://example.com").base_url == "HTTPS://example.com"
    assert _resolve(base_url="https://example.com/X/").base_url == "https://example.com/X"
