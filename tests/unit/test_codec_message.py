"""decode / encode around pyiso8583: errors, salvage, leaks and round trips."""

from __future__ import annotations

import dataclasses
import pickle
import string
import traceback
from pathlib import Path

import iso8583
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec import (
    DecodeError,
    EncodeError,
    Message,
    Mti,
    Salvage,
    Spec,
    decode,
    encode,
    field_order,
    load_spec,
)

PAN = "4111111111111111"
SPECS = {name: load_spec(name) for name in ("default", "default_ascii")}
SPEC_NAMES = list(SPECS)
KEYERROR_TRAP = b"0200" + b"8000000000000000" * 3 + b"X"


def digits(n: int, m: int | None = None) -> st.SearchStrategy[str]:
    return st.text(string.digits, min_size=n, max_size=n if m is None else m)


def text(n: int) -> st.SearchStrategy[str]:
    return st.text(string.ascii_letters + string.digits + " ", min_size=n, max_size=n)


REQUIRED = {
    "2": digits(13, 19),
    "3": digits(6),
    "4": digits(12),
    "11": digits(6),
    "39": text(2),
    "41": text(8),
    "42": text(15),
    "49": digits(3),
    "52": st.text("0123456789ABCDEF", min_size=16, max_size=16),
}
OPTIONAL = {"7": digits(10), "12": digits(6), "13": digits(4), "37": text(12), "70": digits(3)}
MTIS = st.sampled_from(["0100", "0110", "0200", "0201", "0210", "0220", "0400", "0421", "0800"])
messages = st.builds(
    Message,
    MTIS.map(Mti),
    st.fixed_dictionaries(REQUIRED, optional=OPTIONAL),
)


def sample(**changes: str | None) -> Message:
    base = Message(
        Mti("0200"),
        {"2": PAN, "3": "000000", "4": "000000001000", "11": "123456", "41": "TERM0001"},
    )
    return base.with_fields(changes)


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_NAMES)
@settings(max_examples=100, deadline=None)
@given(message=messages)
def test_round_trip(name: str, message: Message) -> None:
    spec = SPECS[name]
    raw = encode(message, spec)
    decoded = decode(raw, spec)
    assert decoded == message
    assert encode(decoded, spec) == raw


def test_known_bytes_default_ascii() -> None:
    message = Message(Mti("0210"), {"3": "111111", "39": "05"})
    raw = encode(message, SPECS["default_ascii"])
    assert raw == b"0210200000000200000011111105"
    assert type(raw) is bytes
    assert decode(raw, SPECS["default_ascii"]) == message


def test_known_bytes_default_binary_bitmap_and_secondary() -> None:
    message = Message(Mti("0800"), {"11": "000001", "70": "301"})
    raw = encode(message, SPECS["default"])
    primary = bytes.fromhex("8020000000000000")
    secondary = bytes.fromhex("0400000000000000")
    assert raw == b"0800" + primary + secondary + b"000001301"
    decoded = decode(raw, SPECS["default"])
    assert decoded == message
    assert set(decoded.fields) == {"11", "70"}


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_message_without_optional_fields(name: str) -> None:
    message = sample()
    assert all(f not in message for f in ("7", "12", "13", "37"))
    assert decode(encode(message, SPECS[name]), SPECS[name]) == message


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_binary_field_decodes_to_uppercase_hex(name: str) -> None:
    raw = encode(sample(**{"52": "0123456789ABCDEF"}), SPECS[name])
    assert decode(raw, SPECS[name]).get("52") == "0123456789ABCDEF"


def test_encode_does_not_mutate_its_input() -> None:
    source = {"2": PAN, "4": "000000001000", "11": "123456", "41": "TERM0001", "70": "301"}
    message = Message(Mti("0200"), source)
    before = dict(message.fields)
    encode(message, SPECS["default"])
    encode(message, SPECS["default_ascii"])
    assert dict(message.fields) == before
    assert source == before
    assert "p" not in message and "1" not in message and "t" not in message


def test_encode_does_not_touch_the_pyiso8583_globals() -> None:
    before = {k: dict(v) for k, v in iso8583.specs.default.items()}
    encode(sample(), SPECS["default"])
    decode(encode(sample(), SPECS["default"]), SPECS["default"])
    assert {k: dict(v) for k, v in iso8583.specs.default.items()} == before


def test_header_field_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "header.yaml"
    path.write_text(
        "base: default\nfields:\n  h: {data_enc: ascii, len_enc: ascii, len_type: 0, max_len: 4}\n"
    )
    spec = load_spec(str(path))
    message = sample(h="ISO1")
    raw = encode(message, spec)
    assert raw.startswith(b"ISO10200")
    assert decode(raw, spec) == message
    with pytest.raises(EncodeError, match="Field data is required"):
        encode(sample(), spec)


# --- Message value -----------------------------------------------------------------------


def test_message_is_an_immutable_copy() -> None:
    source = {"2": PAN, "11": "123456"}
    message = Message(Mti("0200"), source)
    source["11"] = "999999"
    assert message.get("11") == "123456"
    with pytest.raises(TypeError):
        message.fields["11"] = "999999"  # type: ignore[index]
    assert message.get("99") is None
    assert "2" in message and "3" not in message


def test_with_fields() -> None:
    message = sample()
    changed = message.with_fields({"39": "00", "2": None, "4": "000000000001"}, mti=Mti("0210"))
    assert changed.mti == Mti("0210")
    assert dict(changed.fields) == {
        "3": "000000",
        "4": "000000000001",
        "11": "123456",
        "39": "00",
        "41": "TERM0001",
    }
    assert message.get("2") == PAN and message.get("39") is None
    assert message.with_fields({}).mti == Mti("0200")
    assert message.with_fields({"99": None}) == message


def test_message_repr_has_no_values() -> None:
    message = sample(**{"52": "0123456789ABCDEF", "h": "HEAD"})
    assert repr(message) == "Message(0200, fields=[h, 2, 3, 4, 11, 41, 52])"
    assert PAN not in repr(message) and PAN not in str(message)
    assert repr(Message(Mti("0800"), {})) == "Message(0800, fields=[])"


# --- decode failures ---------------------------------------------------------------------


def test_keyerror_trap_with_tertiary_bitmap() -> None:
    with pytest.raises(KeyError):
        iso8583.decode(KEYERROR_TRAP, iso8583.specs.default_ascii)
    with pytest.raises(DecodeError) as info:
        decode(KEYERROR_TRAP, SPECS["default_ascii"])
    err = info.value
    assert err.salvage is None
    assert err.__cause__ is None and err.__context__ is None and err.__suppress_context__


@pytest.mark.parametrize("name", SPEC_NAMES)
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120))
def test_random_bytes_raise_only_decode_error(name: str, data: bytes) -> None:
    try:
        message = decode(data, SPECS[name])
    except DecodeError as e:
        assert e.__cause__ is None and e.__context__ is None
    else:
        assert not {"t", "p", "1"} & set(message.fields)


@pytest.mark.parametrize("name", SPEC_NAMES)
@settings(max_examples=200, deadline=None)
@given(message=messages, data=st.data())
def test_mutated_messages_raise_only_decode_error(
    name: str, message: Message, data: st.DataObject
) -> None:
    raw = bytearray(encode(message, SPECS[name]))
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "bitmap"]))
    if kind == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "insert":
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        width = 8 if name == "default" else 16
        raw[4 : 4 + width] = data.draw(st.binary(min_size=width, max_size=width))
    try:
        decoded = decode(bytes(raw), SPECS[name])
    except DecodeError as e:
        assert e.__cause__ is None and e.__context__ is None
        assert message.fields["2"] not in str(e)
    else:
        assert not {"t", "p", "1"} & set(decoded.fields)


def pan_leak_cases() -> list[tuple[str, bytes]]:
    cases = []
    for name, spec in SPECS.items():
        raw = encode(sample(), spec)
        cut = raw.index(b"000000001000") + 5
        cases.append((name, raw[:cut]))  # field 4 truncated
        bad4 = raw.replace(b"000000001000", b"00000000\xff\xfe00")
        cases.append((name, bad4))  # field 4 not ASCII
    return cases


@pytest.mark.parametrize(("name", "raw"), pan_leak_cases())
def test_decode_error_after_pan_never_carries_it(name: str, raw: bytes) -> None:
    assert PAN.encode() in raw
    with pytest.raises(DecodeError) as info:
        decode(raw, SPECS[name])
    err = info.value
    assert err.field == "4"
    assert err.__cause__ is None and err.__context__ is None and err.__suppress_context__
    texts = [
        str(err),
        repr(err),
        repr(err.args),
        repr(err.__cause__),
        repr(err.__context__),
        "".join(traceback.format_exception(err)),
    ]
    for text in texts:
        assert PAN not in text
        assert "411111" not in text
    dumped = pickle.dumps(err)
    assert PAN.encode() not in dumped
    assert b"411111" not in dumped
    # Frames inside the codec hold no reference to the raw bytes or decoded values.
    for frame, _ in traceback.walk_tb(err.__traceback__):
        if "/codec/" in frame.f_code.co_filename:
            assert PAN not in repr(frame.f_locals)
            assert all(v is not raw for v in frame.f_locals.values())


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_decode_error_reason_is_pyiso8583_text_without_data(name: str) -> None:
    raw = encode(sample(), SPECS[name])
    with pytest.raises(DecodeError) as info:
        decode(raw[:-3], SPECS[name])
    assert str(info.value) == "Field data is 5 bytes, expecting 8 (field 41)"
    assert info.value.reason == "Field data is 5 bytes, expecting 8"
    assert info.value.field == "41"


def test_invalid_mti_is_a_decode_error_without_the_text() -> None:
    raw = b"02X0" + encode(sample(), SPECS["default_ascii"])[4:]
    with pytest.raises(DecodeError) as info:
        decode(raw, SPECS["default_ascii"])
    assert str(info.value) == "invalid MTI"
    assert info.value.salvage is None
    assert "02X0" not in repr(info.value)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(DecodeError):
        decode("0200", SPECS["default_ascii"])  # type: ignore[arg-type]


# --- salvage -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_salvage_when_a_field_after_41_is_broken(name: str) -> None:
    spec = SPECS[name]
    raw = encode(sample(**{"52": "0123456789ABCDEF"}), spec)
    with pytest.raises(DecodeError) as info:
        decode(raw[:-2], spec)
    assert info.value.field == "52"
    assert info.value.salvage == Salvage(Mti("0200"), "123456", "TERM0001")


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_salvage_on_extra_data(name: str) -> None:
    spec = SPECS[name]
    raw = encode(sample(), spec)
    with pytest.raises(DecodeError) as info:
        decode(raw + b"garbage", spec)
    err = info.value
    assert err.reason == "Extra data after last field"
    assert err.field is None
    assert err.salvage == Salvage(Mti("0200"), "123456", "TERM0001")
    assert "TERM0001" not in str(err)
    restored = pickle.loads(pickle.dumps(err))
    assert restored.salvage is None
    assert b"TERM0001" not in pickle.dumps(err)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_no_salvage_when_broken_before_41(name: str) -> None:
    spec = SPECS[name]
    raw = encode(sample(), spec)
    with pytest.raises(DecodeError) as info:
        decode(raw.replace(b"000000001000", b"0000000010\xff0"), spec)
    assert info.value.field == "4"
    assert info.value.salvage is None


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_no_salvage_when_41_itself_is_broken(name: str) -> None:
    spec = SPECS[name]
    raw = encode(sample(), spec)
    with pytest.raises(DecodeError) as info:
        decode(raw[:-1], spec)
    assert info.value.field == "41"
    assert info.value.salvage is None


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_no_salvage_without_stan(name: str) -> None:
    spec = SPECS[name]
    raw = encode(sample(**{"11": None}), spec)
    with pytest.raises(DecodeError) as info:
        decode(raw + b"x", spec)
    assert info.value.salvage is None


# --- encode failures ---------------------------------------------------------------------


@pytest.mark.parametrize("field", ["t", "p", "1", "65", "129", "0", "x", "h"])
def test_encode_refuses_fields_outside_the_spec(field: str) -> None:
    for spec in SPECS.values():
        with pytest.raises(EncodeError, match="not allowed"):
            encode(sample(**{field: "0"}), spec)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"4": PAN}, "4"),
        ({"4": "41111111111é"}, "4"),
        ({"2": PAN + "4111"}, "2"),
        ({"11": "12345"}, "11"),
    ],
)
def test_encode_error_carries_no_value(changes: dict[str, str], field: str) -> None:
    for spec in SPECS.values():
        with pytest.raises(EncodeError) as info:
            encode(sample().with_fields(changes), spec)
        err = info.value
        assert err.field == field
        assert err.__cause__ is None and err.__context__ is None
        for text in (str(err), repr(err), "".join(traceback.format_exception(err))):
            assert PAN not in text
            assert "41111111111" not in text
        assert PAN.encode() not in pickle.dumps(err)


def test_encode_binary_field_must_be_hex() -> None:
    with pytest.raises(EncodeError) as info:
        encode(sample(**{"52": "0123456789ABCDEZ"}), SPECS["default"])
    assert str(info.value) == "Failed to encode field, non-hex data (field 52)"


def test_encode_with_a_broken_spec_is_an_encode_error() -> None:
    spec: Spec = {"t": SPECS["default"]["t"]}
    with pytest.raises(EncodeError):
        encode(sample(), spec)


# --- defence in depth: library texts and exceptions are never passed through blindly ---


def test_library_error_text_with_data_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    def leaky(data: bytes, spec: Spec) -> None:
        doc = {"t": "0200", "2": PAN}
        raise iso8583.DecodeError(f"Field data {PAN} is odd", data, doc, {}, 7, f"2 {PAN}")

    monkeypatch.setattr(iso8583, "decode", leaky)
    with pytest.raises(DecodeError) as info:
        decode(b"anything", SPECS["default"])
    err = info.value
    assert str(err) == "malformed field"
    assert err.field is None
    assert PAN.encode() not in pickle.dumps(err)


@pytest.mark.parametrize("exc", [ValueError(PAN), TypeError(PAN), IndexError(PAN), KeyError(PAN)])
def test_unexpected_library_exceptions_become_decode_errors(
    monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    def broken(data: bytes, spec: Spec) -> None:
        raise exc

    monkeypatch.setattr(iso8583, "decode", broken)
    with pytest.raises(DecodeError) as info:
        decode(b"anything", SPECS["default"])
    err = info.value
    assert err.__cause__ is None and err.__context__ is None
    assert PAN not in "".join(traceback.format_exception(err))


def test_library_encode_error_text_with_data_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    def leaky(doc: dict[str, str], spec: Spec) -> None:
        raise iso8583.EncodeError(f"Failed to encode field length, {PAN}", doc, {}, "2")

    monkeypatch.setattr(iso8583, "encode", leaky)
    with pytest.raises(EncodeError) as info:
        encode(sample(), SPECS["default"])
    assert str(info.value) == "malformed field (field 2)"
    assert PAN.encode() not in pickle.dumps(info.value)


def test_a_decoded_message_passes_through_as_its_bytes_with_the_same_spec() -> None:
    spec = SPECS["default"]
    # A secondary bitmap with no field above 64 would be dropped by a re-encode: passing
    # through keeps the bytes exactly as they came.
    fields = {"11": "000001", "41": "TERM0001", "2": "4111111111111111", "3": "000000"}
    plain = encode(Message(Mti.parse("0200"), fields), spec)
    primary = bytes([plain[4] | 0x80]) + plain[5:12]  # bit 1: a secondary bitmap follows
    as_sent = plain[:4] + primary + bytes(8) + plain[12:]
    message = decode(as_sent, spec)
    assert encode(message, spec) == as_sent
    same_content = {name: dict(d) for name, d in spec.items()}  # another spec object
    assert encode(message, same_content) == plain  # re-encoded
    changed = message.with_fields({"39": "00"}, mti=Mti.parse("0210"))
    assert changed.wire is None
    assert decode(encode(changed, spec), spec).get("39") == "00"
    assert message == Message(message.mti, message.fields)  # the bytes are not compared
    assert "4111" not in repr(message)


def test_only_decode_gives_a_message_its_bytes() -> None:
    spec = SPECS["default"]
    message = decode(
        encode(Message(Mti.parse("0201"), {"11": "000001", "41": "TERM0001"}), spec), spec
    )
    assert message.wire is not None
    moved = dataclasses.replace(message, mti=Mti.parse("0200"))
    assert moved.wire is None
    assert encode(moved, spec)[:4] == b"0200"


def test_field_order_puts_named_fields_first_then_numbers() -> None:
    names = ["39", "h", "2", "128", "11", "1", "007", "64"]
    assert sorted(names, key=field_order) == ["h", "1", "2", "007", "11", "39", "64", "128"]
    assert field_order("12") == (12, "") and field_order("h") == (-1, "h")
