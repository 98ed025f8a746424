"""mask_pan and loggable."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codec import LOGGABLE_FIELDS, SENSITIVE_FIELDS, Message, Mti, loggable, mask_pan

PAN = "4111111111111111"


@pytest.mark.parametrize(
    ("pan", "masked"),
    [
        ("4111111111111111", "411111******1111"),
        ("4111111111111", "411111***1111"),
        ("4111111111111111111", "411111*********1111"),
        ("411111111111", "************"),
        ("41111111111111111111", "********************"),
        ("4111-1111-1111-1111", "*******************"),
        ("411111111111111X", "****************"),
        ("٤١١١١١١١١١١١١١١١", "****************"),
        ("", ""),
    ],
)
def test_mask_pan(pan: str, masked: str) -> None:
    assert mask_pan(pan) == masked


def test_loggable() -> None:
    track2 = PAN + "=25121010000012300000"
    message = Message(
        Mti("0200"),
        {
            "h": "HDR1",
            "2": PAN,
            "3": "000000",
            "4": "000000001000",
            "11": "123456",
            "14": "2512",
            "35": track2,
            "41": "TERM0001",
            "48": "private",
            "52": "0123456789ABCDEF",
            "55": "9F2608AABBCCDDEEFF0011",
            "127": "whatever",
        },
    )
    out = loggable(message)
    assert out == {
        "mti": "0200",
        "h": "[redacted]",
        "2": "411111******1111",
        "3": "000000",
        "4": "000000001000",
        "11": "123456",
        "14": "[redacted]",
        "35": "[redacted]",
        "41": "TERM0001",
        "48": "[redacted]",
        "52": "[redacted]",
        "55": "[redacted]",
        "127": "[redacted]",
    }
    flat = repr(out)
    for secret in (PAN, track2, "0123456789ABCDEF", "9F2608AABBCCDDEEFF0011", "2512"):
        assert secret not in flat


def test_whitelist_and_sensitive_sets_do_not_overlap() -> None:
    assert not LOGGABLE_FIELDS & SENSITIVE_FIELDS
    assert {"2", "14", "35", "36", "45", "52", "55"} <= SENSITIVE_FIELDS


@given(
    pan=st.text(string.digits, min_size=13, max_size=19),
    field=st.integers(1, 128).map(str),
    value=st.text(min_size=1, max_size=40),
)
def test_loggable_never_shows_a_full_pan(pan: str, field: str, value: str) -> None:
    message = Message(Mti("0200"), {"2": pan, field: value} if field != "2" else {"2": pan})
    out = loggable(message)
    assert out["2"] != pan
    assert out["2"][:6] == pan[:6] and out["2"][-4:] == pan[-4:]
    assert set(out["2"][6:-4]) == {"*"}
    if field != "2":
        expected = value if field in LOGGABLE_FIELDS else "[redacted]"
        assert out[field] == expected
