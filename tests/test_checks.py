"""The shared argument checks: one rule per kind of value, bools refused everywhere."""

from __future__ import annotations

import math

import pytest

from dedalus_async._checks import check_count, check_instance, check_seconds, is_int, is_number


@pytest.mark.parametrize(
    ("value", "number", "integer"),
    [(1, True, True), (1.5, True, False), (True, False, False), ("1", False, False)],
)
def test_predicates_refuse_bools(value: object, number: bool, integer: bool) -> None:
    assert is_number(value) is number
    assert is_int(value) is integer


def test_check_count() -> None:
    assert check_count("concurrency", 3) == 3
    assert check_count("limit", 0, minimum=0) == 0
    with pytest.raises(TypeError, match="concurrency must be an int, not bool"):
        check_count("concurrency", True)
    with pytest.raises(TypeError, match="not float"):
        check_count("concurrency", 2.0)
    with pytest.raises(ValueError, match="concurrency must be at least 1, got 0"):
        check_count("concurrency", 0)


def test_check_seconds() -> None:
    assert check_seconds("timeout", 2) == 2.0
    assert isinstance(check_seconds("timeout", 2), float)
    with pytest.raises(TypeError, match="timeout must be seconds, not bool"):
        check_seconds("timeout", True)
    for bad in (0, -1, math.inf, math.nan, 10**400):
        with pytest.raises(ValueError, match="positive finite seconds"):
            check_seconds("timeout", bad)
    with pytest.raises(TypeError, match="must be seconds, not NoneType"):
        check_seconds("timeout", None)


def test_check_seconds_with_none_allowed_says_what_none_means() -> None:
    assert check_seconds("timeout", None, none_means="no deadline") is None
    with pytest.raises(ValueError, match=r"\(or None for no deadline\)"):
        check_seconds("timeout", -1, none_means="no deadline")
    with pytest.raises(TypeError, match=r"\(or None for no deadline\), not str"):
        check_seconds("timeout", "5", none_means="no deadline")


def test_check_instance() -> None:
    check_instance("poll", None, int, "an int")
    check_instance("poll", 3, int, "an int")
    with pytest.raises(TypeError, match="poll must be an int, not str"):
        check_instance("poll", "3", int, "an int")


def test_check_seconds_takes_any_positive_fraction() -> None:
    """The boundary is 0, not 1: a tenth of a second is a valid timeout."""
    assert check_seconds("timeout", 0.1) == 0.1
    assert check_seconds("timeout", 1e-9) == 1e-9
