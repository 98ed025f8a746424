"""A faster decode for well-formed messages, with pyiso8583's results.

pyiso8583 decodes a message field by field through generic code: several dictionary
lookups, an encoded copy of every field and a few calls for each; the two decodes of a
transaction were about a seventh of the proxy's CPU (BENCHMARKS.md). `quick_decode`
walks the same layout from a plan compiled once for each spec `codec.spec.load_spec`
makes (`adopt`), doing only what a well-formed message needs, with the operations
pyiso8583 applies (the same `bytes.decode`, `int` and `bytes.hex` calls), so what it
returns is what pyiso8583 returns. Encoding stays with pyiso8583.

Anything else (a malformed message, a third bitmap, a length that needs pyiso8583's own
handling, a spec not adopted) gives None, and the caller decodes with pyiso8583, which
also says exactly what is wrong: the quick path never raises and never decides an error.
`tests/unit/test_codec_quick.py` checks it against pyiso8583 on generated specs and
messages, damaged ones included.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from codec.spec import Spec

__all__ = ["MAX_PLANS", "adopt", "quick_decode"]

# The numbers of the bits set in a byte, most significant first (bit 1 is 0x80).
_BITS = tuple(tuple(bit for bit in range(1, 9) if byte >> (8 - bit) & 1) for byte in range(256))
MAX_PLANS = 64  # the latest specs adopted keep their plans (a process loads a handful)


class _Field(NamedTuple):
    name: str
    len_type: int  # bytes of the length prefix; 0: fixed at max_len
    len_enc: str
    max_len: int
    nibbles: bool
    data_enc: str
    binary: bool  # data_enc "b": hex, upper case
    left_pad: str
    right_pad: str


class _Plan(NamedTuple):
    header: _Field | None
    mti_enc: str
    primary_enc: str
    secondary_enc: str | None  # None: the spec has no field 1
    fields: tuple[_Field | None, ...]  # by number; None: not in the spec (or 1, 65)


# By id, oldest first; each entry holds its spec. Changed only by single calls of its C
# methods (atomic under the GIL): threads may load specs at once.
_plans: OrderedDict[int, tuple[Spec, _Plan | None]] = OrderedDict()


def adopt(spec: Spec) -> None:
    """Decode `spec`'s messages on the quick path from now on. The caller promises that
    nothing can change `spec` (`load_spec`'s specs are copies no one else holds): a plan
    is made once and must stay true. Only the `MAX_PLANS` specs adopted (or adopted
    again) latest keep their plans; an older one goes back to pyiso8583 alone."""
    key = id(spec)
    if key in _plans:  # its entry holds it: the same spec, adopted again
        with contextlib.suppress(KeyError):  # unless another thread just dropped it
            _plans.move_to_end(key)
            return
    plan = _compile(spec)
    while len(_plans) >= MAX_PLANS:
        with contextlib.suppress(KeyError):  # another thread emptied it first
            _plans.popitem(last=False)
    _plans[key] = (spec, plan)


def quick_decode(data: bytes | bytearray, spec: Spec) -> tuple[str, dict[str, str]] | None:
    """MTI and fields (header "h" first, then by number; no bitmaps) as pyiso8583 decodes
    them; None when the message is not one this path reads or `spec` was not adopted:
    then use pyiso8583."""
    entry = _plans.get(id(spec))  # an entry holds its spec: no other object has that id
    if entry is None or entry[1] is None:
        return None
    if not isinstance(data, bytes | bytearray):
        return None
    try:
        return _decode(data, entry[1])
    except Exception:  # pyiso8583 decodes it again and names the fault
        return None


def _compile(spec: Spec) -> _Plan | None:
    try:
        fields = tuple(
            _field(str(number), spec[str(number)])
            if str(number) in spec and number not in (1, 65)
            else None
            for number in range(129)
        )
        header = _field("h", spec["h"]) if spec["h"]["max_len"] > 0 else None
        secondary = spec["1"]["data_enc"] if "1" in spec else None
        return _Plan(header, spec["t"]["data_enc"], spec["p"]["data_enc"], secondary, fields)
    except (KeyError, TypeError, AttributeError, IndexError):  # a spec not as load_spec
        return None  # checks them (one a caller adopted itself): pyiso8583 alone, then


def _field(name: str, definition: Mapping[str, Any]) -> _Field:
    return _Field(
        name,
        definition["len_type"],
        definition["len_enc"],
        definition["max_len"],
        definition.get("len_count", "bytes") == "nibbles",
        definition["data_enc"],
        definition["data_enc"] == "b",
        definition.get("left_pad", "")[:1],
        definition.get("right_pad", "")[:1],
    )


def _decode(data: bytes | bytearray, plan: _Plan) -> tuple[str, dict[str, str]] | None:
    fields: dict[str, str] = {}
    at = 0
    if plan.header is not None:
        at = _read_field(data, at, plan.header, fields)
        if at < 0:
            return None
    if plan.mti_enc == "b":
        raw = data[at : at + 2]
        if len(raw) != 2:
            return None
        mti = raw.hex().upper()
    else:
        raw = data[at : at + 4]
        if len(raw) != 4:
            return None
        mti = raw.decode(plan.mti_enc)
    at += len(raw)
    bitmap, at = _read_bitmap(data, at, plan.primary_enc)
    if bitmap is None:
        return None
    if bitmap[0] & 0x80:  # a secondary bitmap: fields 65-128
        if plan.secondary_enc is None:
            return None
        secondary, at = _read_bitmap(data, at, plan.secondary_enc)
        if secondary is None or secondary[0] & 0x80:  # field 65 is a third bitmap
            return None
        bitmap += secondary
    by_number = plan.fields
    for index, byte in enumerate(bitmap):
        if byte:
            base = index * 8
            for bit in _BITS[byte]:
                number = base + bit
                if number == 1:
                    continue
                field = by_number[number]
                if field is None:
                    return None
                at = _read_field(data, at, field, fields)
                if at < 0:
                    return None
    if at != len(data):
        return None
    return mti, fields


def _read_bitmap(data: bytes | bytearray, at: int, encoding: str) -> tuple[bytes | None, int]:
    if encoding == "b":
        raw = bytes(data[at : at + 8])
        return (raw, at + 8) if len(raw) == 8 else (None, at)
    text = data[at : at + 16]
    if len(text) != 16:
        return None, at
    bitmap = bytes.fromhex(text.decode(encoding))  # skips blanks: then it is short
    return (bitmap, at + 16) if len(bitmap) == 8 else (None, at)


def _read_field(data: bytes | bytearray, at: int, field: _Field, out: dict[str, str]) -> int:
    """Where the field ends, its value in `out`; -1: not a field this path reads."""
    name, len_type, len_enc, max_len, nibbles, data_enc, binary, left_pad, right_pad = field
    if len_type:
        raw = data[at : at + len_type]
        if len(raw) != len_type:
            return -1
        if len_enc == "b":
            length = int.from_bytes(raw, "big", signed=False)
        elif len_enc == "bcd":
            length = int(raw.hex(), 10)
        else:
            length = int(raw.decode(len_enc))
        if not 0 <= length <= max_len:
            return -1
        at += len_type
    else:
        length = max_len
    if length == 0:
        out[name] = ""
        return at
    size = (length + 1) // 2 if nibbles else length
    raw = data[at : at + size]
    if len(raw) != size:
        return -1
    if binary:
        value = raw.hex().upper()
        if nibbles and length & 1:  # one nibble of the last or first byte is padding
            if left_pad and value[:1] == left_pad:
                value = value[1:]
            elif right_pad and value[-1:] == right_pad:
                value = value[:-1]
            else:
                return -1
    else:
        value = raw.decode(data_enc)
    out[name] = value
    return at + size
