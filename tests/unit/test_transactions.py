"""Transaction keys, dates, fingerprints, safe fields and replays: the journal's pure half."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codec import Mti
from fixtures.messages import TEST_PAN, financial
from proxy import decisions
from proxy.decisions import Duplicate
from proxy.errors import LinkLost, UpstreamTimeout
from proxy.transactions import (
    Recorded,
    TransactionIdentity,
    outcome_of,
    replay,
    reversal_for,
    safe_fields,
    transaction_date,
)

KEY_FIELDS = ("32", "41", "11", "37", "7")
SECRET = b"unit-test-key"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _identity(secret: bytes | None = SECRET) -> TransactionIdentity:
    return TransactionIdentity(KEY_FIELDS, secret)


def test_a_repeat_folds_into_its_original_and_other_classes_do_not() -> None:
    identity = _identity()
    original = financial(5, when=NOW)
    key = identity.claim(original, NOW).key
    assert identity.claim(original.with_fields({}, mti=Mti.parse("0201")), NOW).key == key
    assert identity.claim(original.with_fields({}, mti=Mti.parse("0400")), NOW).key != key
    assert identity.claim(financial(5, "TERM0002", when=NOW), NOW).key != key
    assert identity.claim(original.with_fields({"32": "123456"}), NOW).key != key


@pytest.mark.parametrize(
    ("field7", "received", "expected"),
    [
        ("1126115959", datetime(2026, 11, 26, 12, 0, tzinfo=UTC), date(2026, 11, 26)),
        ("1231235959", datetime(2027, 1, 1, 0, 0, 5, tzinfo=UTC), date(2026, 12, 31)),
        ("0101000001", datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), date(2027, 1, 1)),
        ("0229120000", datetime(2028, 2, 29, 12, 0, tzinfo=UTC), date(2028, 2, 29)),
        ("0229120000", datetime(2027, 3, 1, 12, 0, tzinfo=UTC), date(2028, 2, 29)),
        (None, datetime(2026, 5, 4, 1, 2, tzinfo=UTC), date(2026, 5, 4)),
        ("12345", datetime(2026, 5, 4, 1, 2, tzinfo=UTC), date(2026, 5, 4)),
        ("1399000000", datetime(2026, 5, 4, 1, 2, tzinfo=UTC), date(2026, 5, 4)),
        # Exactly as far from both years' 31 Dec: the earlier year, every time (the date is
        # in the key, and instances sharing a journal must agree on it).
        ("1231000000", datetime(2026, 7, 1, 12, 0, tzinfo=UTC), date(2025, 12, 31)),
    ],
)
def test_transaction_date(field7: str | None, received: datetime, expected: date) -> None:
    assert transaction_date(field7, received) == expected


@given(
    st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2098, 12, 31)),
    st.integers(min_value=-182 * 86400, max_value=182 * 86400),
)
def test_the_year_is_the_one_nearest_the_receive_time(received: datetime, offset: int) -> None:
    sent = received + timedelta(seconds=offset)
    if (sent.month, sent.day) == (2, 29):
        return  # 29 Feb may map to the nearest leap year instead; covered above
    assert transaction_date(sent.strftime("%m%d%H%M%S"), received.replace(tzinfo=UTC)) == (
        sent.date()
    )


def test_the_fingerprint_tells_content_apart_and_needs_the_key_for_the_pan() -> None:
    identity = _identity()
    base = identity.fingerprint(financial(1, amount=1000))
    assert identity.fingerprint(financial(1, amount=1000)) == base
    assert identity.fingerprint(financial(1, amount=2000)) != base
    assert identity.fingerprint(financial(1, pan="5555555555554444")) != base
    assert _identity(b"another key").fingerprint(financial(1)) != base
    keyless = _identity(None)  # PAN hashing off: the PAN is not in it at all
    assert keyless.fingerprint(financial(1)) == keyless.fingerprint(
        financial(1, pan="5555555555554444")
    )


def test_a_claim_keeps_no_card_data() -> None:
    request = financial(3).with_fields({"35": f"{TEST_PAN}=2512", "52": "0412AC89ABCDEF67"})
    claim = _identity().claim(request, NOW)
    assert claim.pan_masked == "411111******1111"
    assert claim.pan_hash is not None and TEST_PAN.encode() not in claim.pan_hash
    assert not {"2", "35", "52"} & set(claim.fields)
    assert _identity(None).claim(request, NOW).pan_hash is None
    assert TEST_PAN not in repr(claim)
    assert safe_fields(request.with_fields({"999": "x", "55": "9F26"})) == claim.fields


@pytest.mark.parametrize("switch", ["beta", None])
def test_a_claim_named_for_a_switch_keeps_everything_else(switch: str | None) -> None:
    claim = replace(_identity().claim(financial(7, when=NOW), NOW), switch="alpha")
    assert claim.naming(switch) == replace(claim, switch=switch)  # every field, compared


def test_a_replay_rebuilds_the_answer_with_the_requests_own_card_fields() -> None:
    request = financial(4)
    response = request.with_fields({"38": "AB1234", "39": "00"}, mti=request.mti.response())
    claim = _identity().claim(request, NOW)
    outcome = outcome_of(claim, response, state="answered", switch="alpha")
    recorded = Recorded(
        claim.fingerprint, "answered", "00", "0210", outcome.fields, outcome.field_names
    )
    repeat = request.with_fields({}, mti=Mti.parse("0201"))
    replayed = replay(repeat, recorded)
    assert replayed == response
    assert "2" not in outcome.fields and "2" in outcome.field_names


K1, K2 = b"one", b"two"


@pytest.mark.parametrize(
    ("held", "completed", "incoming", "on_conflict", "action"),
    [
        (K1, True, K1, "rc94", Duplicate.REPLAY),
        (K1, False, K1, "rc94", Duplicate.JOIN),
        (K1, True, K2, "rc94", Duplicate.REJECT),
        (K1, False, K2, "rc94", Duplicate.REJECT),
        (K1, True, K2, "replay", Duplicate.REPLAY),
        (K1, False, K2, "replay", Duplicate.REJECT),
    ],
)
def test_on_duplicate(
    held: bytes, completed: bool, incoming: bytes, on_conflict: str, action: Duplicate
) -> None:
    assert decisions.on_duplicate(held, completed, incoming, on_conflict) is action


def test_a_reversal_names_its_original_and_carries_no_card_data() -> None:
    request = financial(77, when=NOW).with_fields({"32": "12345", "35": f"{TEST_PAN}=2512"})
    claim = _identity().claim(request, NOW)
    reversal = reversal_for(claim.fields, claim.mti, "0400", NOW)
    assert reversal.mti.code == "0400"
    assert reversal.get("90") == "0200" + "000077" + NOW.strftime("%m%d%H%M%S") + (
        "00000012345" + "00000000000"
    )
    assert len(reversal.get("90") or "") == 42
    assert (reversal.get("11"), reversal.get("4"), reversal.get("41")) == (
        "000077",
        "000000001000",
        "TERM0001",
    )
    assert not {"2", "35", "52", "55"} & set(reversal.fields)


@pytest.mark.parametrize(
    ("mti", "reversed_"), [("0100", True), ("0200", True), ("0220", False), ("0400", False)]
)
def test_what_a_timeout_reverses(mti: str, reversed_: bool) -> None:
    assert decisions.reverse_after_timeout(Mti.parse(mti)) is reversed_


@pytest.mark.parametrize(
    ("mti", "rc", "policy", "reversed_"),
    [
        ("0200", "00", True, True),
        ("0100", "00", True, True),
        ("0200", "05", True, False),
        ("0200", "00", False, False),
        ("0220", "00", True, False),
        ("0400", "00", True, False),
    ],
)
def test_what_an_undelivered_answer_reverses(
    mti: str, rc: str, policy: bool, reversed_: bool
) -> None:
    assert decisions.reverse_if_undelivered(Mti.parse(mti), rc, policy) is reversed_


def test_repeats_and_the_timeout_rc() -> None:
    assert decisions.repeat_of(Mti.parse("0400")).code == "0401"
    assert decisions.repeat_of(Mti.parse("0420")).code == "0421"
    assert decisions.failure_rc(UpstreamTimeout("late"), "68") == "68"
    assert decisions.failure_rc(LinkLost("gone"), "68") == "91"
