"""The quick decode against pyiso8583: whenever it answers, it answers what pyiso8583
decodes; it answers for the messages the proxy meets; and `codec.decode` is unchanged."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import iso8583
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec import Message, Mti, decode, encode, load_spec
from codec.quick import MAX_PLANS, adopt, quick_decode
from codec.spec import Spec
from fixtures.messages import echo, financial

PAN = "4111111111111111"
WHEN = datetime(2026, 11, 26, 12, 0, 5, tzinfo=UTC)
TEXT_ENCODINGS = ("ascii", "cp500", "latin-1", "cp1140", "utf-16")


def pyiso(data: bytes | bytearray, spec: Spec) -> tuple[str, dict[str, str]] | None:
    """What pyiso8583 decodes, as quick_decode reports it; None when it raises."""
    try:
        doc, _ = iso8583.decode(data, spec)
    except Exception:
        return None
    mti = doc.pop("t")
    doc.pop("p", None)
    doc.pop("1", None)
    return mti, doc


def adopted(spec: dict[str, dict[str, Any]]) -> Spec:
    """A read-only copy adopted for the quick path, as load_spec makes its specs."""
    copy = MappingProxyType({name: MappingProxyType(dict(d)) for name, d in spec.items()})
    adopt(copy)
    return copy


def proxy_messages() -> list[Message]:
    """Messages of the shapes the proxy carries: purchase, its answer, echo, reversal
    (secondary bitmap, field 90) and one with chip data (binary, LLL)."""
    purchase = financial(123456, "TERM0001", when=WHEN)
    answer = purchase.with_fields({"39": "00", "38": "A1B2C3"}, mti=Mti.parse("0210"))
    reversal = purchase.with_fields(
        {"90": "0200123456112612000500000012345000000000000"[:42]}, mti=Mti.parse("0400")
    )
    chip = purchase.with_fields({"55": "9F2608" + "AB" * 8, "52": "0123456789ABCDEF"})
    return [purchase, answer, echo(42, when=WHEN), reversal, chip]


@pytest.mark.parametrize("spec_name", ["default", "default_ascii"])
@pytest.mark.parametrize("index", range(5))
def test_answers_for_what_the_proxy_carries(spec_name: str, index: int) -> None:
    spec = load_spec(spec_name)
    data = encode(proxy_messages()[index], spec)
    quick = quick_decode(data, spec)
    assert quick is not None  # the fast path is taken, not fallen back from
    assert quick == pyiso(data, spec)


def test_a_spec_not_adopted_is_left_to_pyiso8583() -> None:
    """Read-only or not, a spec whose caller may still change it gets no plan: decoding
    follows the change."""
    fields = {name: dict(d) for name, d in load_spec("default").items()}
    wrapped = MappingProxyType({name: MappingProxyType(d) for name, d in fields.items()})
    data = encode(proxy_messages()[0], load_spec("default"))
    for spec in (fields, wrapped):
        assert quick_decode(data, spec) is None
        assert decode(data, spec).get("2") == PAN  # codec.decode still decodes it
    fields["2"].update(len_type=0, max_len=18)  # the PAN's "16" is now part of field 2
    assert decode(data, wrapped).get("2") == "16" + PAN


def test_a_spec_loaded_again_is_shared_and_keeps_its_plan(tmp_path: Path) -> None:
    """A listener keeps the spec it started with while reloads load it again, beside other
    specs: it must not lose its plan to them (each load adopts it again)."""
    data = encode(proxy_messages()[0], load_spec("default"))
    kept = load_spec("default")
    for reload in range(MAX_PLANS + 5):
        assert load_spec("default") is kept  # the same content: the same object
        other = tmp_path / f"spec{reload}.yaml"
        other.write_text(f"base: default\nfields:\n  48: {{max_len: {100 + reload}}}\n")
        assert load_spec(str(other)) is not kept
    assert quick_decode(data, kept) == pyiso(data, kept)
    assert quick_decode(data, kept) is not None


def test_plans_are_bounded() -> None:
    data = encode(proxy_messages()[0], load_spec("default"))
    layout = {name: dict(d) for name, d in load_spec("default").items()}
    first = adopted(layout)
    assert quick_decode(data, first) is not None
    for n in range(MAX_PLANS):  # as many other specs again: the first loses its plan
        adopted({**layout, "48": {**layout["48"], "max_len": 100 + n}})
    assert quick_decode(data, first) is None
    assert decode(data, first).get("2") == PAN  # and is decoded by pyiso8583


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"02",
        b"0200",
        b"0200" + b"\x40" * 7,  # bitmap cut short
        b"0200\x00\x00\x00\x00\x00\x00\x00\x00extra",
        b"0200\x80\x00\x00\x00\x00\x00\x00\x00" + b"\x80" + b"\x00" * 7,  # a third bitmap
        b"0200\x40\x00\x00\x00\x00\x00\x00\x00" + b"1X4111111111111111",  # bad length
        b"0200\x40\x00\x00\x00\x00\x00\x00\x00" + b"20" + b"4" * 20,  # over max_len
        b"0200\x40\x00\x00\x00\x00\x00\x00\x00" + b"16" + b"4" * 10,  # cut short
        b"02\xff0\x00\x00\x00\x00\x00\x00\x00\x00",  # MTI not ASCII
    ],
)
def test_malformed_messages_fall_back_to_pyiso8583(data: bytes) -> None:
    spec = load_spec("default")
    assert quick_decode(data, spec) is None
    assert pyiso(data, spec) is None


def test_a_bitmap_with_blanks_is_left_to_pyiso8583() -> None:
    """bytes.fromhex skips blanks: a short primary bitmap, yet the secondary still
    numbers its fields from 65."""
    spec = load_spec("default_ascii")
    data = b"0200" + b"80 000000000000 " + b"1000000000000000" + b"000"
    assert quick_decode(data, spec) is None
    assert pyiso(data, spec) == ("0200", {"68": "000"})  # not field 60 (LLL, empty)


@pytest.mark.parametrize(
    ("pads", "body", "expected"),
    [
        ({"left_pad": "0"}, b"\x01\x23", "123"),
        ({"right_pad": "F"}, b"\x12\x3f", "123"),
        ({"left_pad": "0", "right_pad": "F"}, b"\x01\x2f", "12F"),  # the left pad first
        ({"left_pad": "0", "right_pad": "F"}, b"\x11\x2f", "112"),
        ({"left_pad": "0"}, b"\x11\x23", None),  # no pad where it should be
    ],
)
def test_odd_nibble_fields_lose_their_pad(
    pads: dict[str, str], body: bytes, expected: str | None
) -> None:
    definition = {"data_enc": "b", "len_enc": "ascii", "len_type": 2, "max_len": 9}
    spec = adopted(
        {
            "h": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0},
            "t": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 4},
            "p": {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 8},
            "2": {**definition, "len_count": "nibbles", **pads},
        }
    )
    data = b"0200" + b"\x40" + b"\x00" * 7 + b"03" + body
    quick = quick_decode(data, spec)
    assert quick == pyiso(data, spec)
    assert quick == (None if expected is None else ("0200", {"2": expected}))


# Generated specs and messages, well formed or damaged: the quick path never disagrees.

_LENGTH_ENCODINGS = ("ascii", "b", "bcd", "cp500")


@st.composite
def field_specs(draw: st.DrawFn) -> dict[str, Any]:
    len_type = draw(st.integers(0, 3))
    data_enc = draw(st.sampled_from(("b", *TEXT_ENCODINGS)))
    definition: dict[str, Any] = {
        "data_enc": data_enc,
        "len_enc": draw(st.sampled_from(_LENGTH_ENCODINGS)),
        "len_type": len_type,
        "max_len": draw(st.integers(0, 12)),
    }
    if draw(st.booleans()):
        definition["len_count"] = draw(st.sampled_from(("bytes", "nibbles")))
    for pad in ("left_pad", "right_pad"):
        if draw(st.booleans()):
            definition[pad] = draw(st.sampled_from("0F "))
    return definition


@st.composite
def specs(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    def fixed(data_enc: str, max_len: int) -> dict[str, Any]:
        return {"data_enc": data_enc, "len_enc": "ascii", "len_type": 0, "max_len": max_len}

    spec = {
        "h": draw(st.one_of(st.just(fixed("ascii", 0)), field_specs())),
        "t": fixed(draw(st.sampled_from(("b", "ascii", "cp500"))), 4),
        "p": fixed(draw(st.sampled_from(("b", "ascii", "cp500"))), 8),
    }
    if draw(st.booleans()):
        spec["1"] = fixed(draw(st.sampled_from(("b", "ascii"))), 8)
    numbers = draw(st.lists(st.integers(2, 128), max_size=10, unique=True))
    for number in numbers:
        spec[str(number)] = draw(field_specs())
    return spec


def length_prefix(length: int, definition: dict[str, Any], style: str) -> bytes:
    """The length as the spec encodes it; text lengths also as int() reads them with a
    sign or a blank ("+5", " 5"), which pyiso8583 accepts."""
    width, encoding = definition["len_type"], definition["len_enc"]
    if not width:
        return b""
    if encoding == "b":
        return length.to_bytes(width, "big") if length < 256**width else b"\xff" * width
    if encoding == "bcd":
        return bytes.fromhex(f"{length:0{width * 2}d}"[-width * 2 :])
    text = f"{length:0{width}d}"
    if style != "plain" and width > 1:
        text = (style + f"{length:0{width - 1}d}")[-width:]
    return text[-width:].encode(encoding)


@st.composite
def messages(draw: st.DrawFn, spec: dict[str, dict[str, Any]]) -> bytes:
    """A message laid out by `spec` with any field bytes (so any value pyiso8583 may
    reject), then maybe damaged."""

    def field(definition: dict[str, Any]) -> bytes:
        width, max_len = definition["len_type"], definition["max_len"]
        length = draw(st.integers(0, max_len + 1)) if width else max_len
        size = (length + 1) // 2 if definition.get("len_count") == "nibbles" else length
        alphabet = st.sampled_from(b"0123456789ABCDEF F\x00\xff\x0f\xf0\x01\x10")
        body = bytes(draw(st.lists(alphabet, min_size=size, max_size=size)))
        if definition["data_enc"] == "b" and size and length & 1 and draw(st.booleans()):
            # an odd count of nibbles: a pad nibble first or last, as the spec may say
            digits = body.hex().upper()
            pad = draw(st.sampled_from("0F"))
            digits = pad + digits[1:] if draw(st.booleans()) else digits[:-1] + pad
            body = bytes.fromhex(digits)
        style = draw(st.sampled_from(("plain", "plain", "+", " ")))
        return length_prefix(length, definition, style) + body

    numbers = sorted(int(name) for name in spec if name.isdigit() and name not in ("1", "65"))
    present = draw(st.lists(st.sampled_from(numbers), unique=True)) if numbers else []
    if "1" not in spec:
        present = [number for number in present if number <= 64]
    bits = 0
    for number in present:
        bits |= 1 << (128 - number)
    if any(number > 64 for number in present):
        bits |= 1 << 127
    bitmap = bits.to_bytes(16, "big")

    def bitmap_bytes(raw: bytes, encoding: str) -> bytes:
        return raw if encoding == "b" else raw.hex().upper().encode(encoding)

    out = field(spec["h"]) if spec["h"]["max_len"] > 0 else b""
    mti = draw(st.sampled_from(("0200", "0210", "0800", "0400")))
    out += bytes.fromhex(mti) if spec["t"]["data_enc"] == "b" else mti.encode(spec["t"]["data_enc"])
    out += bitmap_bytes(bitmap[:8], spec["p"]["data_enc"])
    if bits >> 127:
        out += bitmap_bytes(bitmap[8:], spec["1"]["data_enc"])
    for number in sorted(present):
        out += field(spec[str(number)])
    damage = draw(st.sampled_from(("none", "cut", "extra", "flip")))
    if damage == "cut" and out:
        out = out[: draw(st.integers(0, len(out) - 1))]
    elif damage == "extra":
        out += b"X"
    elif damage == "flip" and out:
        at = draw(st.integers(0, len(out) - 1))
        out = out[:at] + bytes([out[at] ^ draw(st.integers(1, 255))]) + out[at + 1 :]
    return out


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_never_disagrees_with_pyiso8583(data: st.DataObject) -> None:
    layout = data.draw(specs())
    spec = adopted(layout)
    message: bytes | bytearray = data.draw(messages(layout))
    if data.draw(st.booleans()):
        message = bytearray(message)
    quick = quick_decode(message, spec)
    if quick is not None:
        expected = pyiso(message, spec)
        assert quick == expected
        assert expected is not None and list(quick[1]) == list(expected[1])  # field order


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_gives_the_same_message_either_way(data: st.DataObject) -> None:
    """codec.decode with the quick path (an adopted spec) and without (the same spec as
    plain dicts): the same message, or the same error."""
    spec = data.draw(specs())
    message = data.draw(messages(spec))

    def outcome(with_spec: Spec) -> tuple[str, Any]:
        try:
            decoded = decode(message, with_spec)
        except Exception as error:
            return "error", (type(error), str(error))
        return "message", (decoded.mti, dict(decoded.fields))

    assert outcome(adopted(spec)) == outcome(spec)
