"""Mti value object."""

from __future__ import annotations

import pytest

from codec import DecodeError, Mti

# code, response, original, match_code, is_response, is_advice, is_repeat
TABLE = [
    ("0100", "0110", "0100", "0100", False, False, False),
    ("0110", "0110", "0110", "0100", True, False, False),
    ("0200", "0210", "0200", "0200", False, False, False),
    ("0201", "0210", "0200", "0200", False, False, True),
    ("0210", "0210", "0210", "0200", True, False, False),
    ("0220", "0230", "0220", "0220", False, True, False),
    ("0221", "0230", "0220", "0220", False, True, True),
    ("0230", "0230", "0230", "0220", True, True, False),
    ("0400", "0410", "0400", "0400", False, False, False),
    ("0401", "0410", "0400", "0400", False, False, True),
    ("0420", "0430", "0420", "0420", False, True, False),
    ("0421", "0430", "0420", "0420", False, True, True),
    ("0430", "0430", "0430", "0420", True, True, False),
    ("0800", "0810", "0800", "0800", False, False, False),
    ("0810", "0810", "0810", "0800", True, False, False),
    ("1200", "1210", "1200", "1200", False, False, False),
]


@pytest.mark.parametrize(
    ("code", "response", "original", "match", "is_response", "is_advice", "is_repeat"), TABLE
)
def test_mti_table(
    code: str,
    response: str,
    original: str,
    match: str,
    is_response: bool,
    is_advice: bool,
    is_repeat: bool,
) -> None:
    mti = Mti.parse(code)
    assert mti.response() == Mti(response)
    assert mti.original() == Mti(original)
    assert mti.match_code() == match
    assert mti.response().match_code() == match
    assert mti.is_response is is_response
    assert mti.is_request is not is_response
    assert mti.is_advice is is_advice
    assert mti.is_repeat is is_repeat
    assert str(mti) == code


def test_digits() -> None:
    mti = Mti("1421")
    assert (mti.version, mti.message_class, mti.function, mti.origin) == (1, 4, 2, 1)


def test_response_of_a_response_is_itself() -> None:
    mti = Mti("0210")
    assert mti.response() is mti


@pytest.mark.parametrize(
    "bad", ["", "020", "02000", "02a0", "0x20", " 200", "٠٢٠٠", "+200", "0200\n"]
)
def test_invalid_mti(bad: str) -> None:
    with pytest.raises(DecodeError) as info:
        Mti.parse(bad)
    assert str(info.value) == "invalid MTI"
    assert info.value.salvage is None
    if bad.strip():
        assert bad not in repr(info.value)


def test_non_string_mti() -> None:
    with pytest.raises(DecodeError):
        Mti(200)  # type: ignore[arg-type]


def test_mti_is_frozen_and_hashable() -> None:
    mti = Mti("0200")
    with pytest.raises(AttributeError):
        mti.code = "0210"  # type: ignore[misc]
    assert {Mti("0200"): 1}[mti] == 1


def test_parse_shares_one_object_per_code_and_still_validates() -> None:
    assert Mti.parse("0200") is Mti.parse("0200") == Mti("0200")
    assert Mti.parse("0201").original() is Mti.parse("0200")
    assert Mti.parse("0200").response() is Mti.parse("0210")
    for bad in ("02000", "020", 200, None):
        with pytest.raises(DecodeError):
            Mti.parse(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "shared"), [("0200", "0200"), ("0201", "0200"), ("0210", "0200"), ("0431", "0420")]
)
def test_match_code_is_the_same_on_every_call(code: str, shared: str) -> None:
    assert Mti.parse(code).match_code() == shared
    assert Mti(code).match_code() == shared
