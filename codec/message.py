"""Decode and encode ISO 8583 messages with pyiso8583; every failure becomes a codec error."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import iso8583

from codec.errors import DecodeError, EncodeError
from codec.mti import Mti
from codec.quick import quick_decode
from codec.spec import Spec

__all__ = ["Message", "Salvage", "decode", "encode", "field_order"]

_BITMAPS = ("p", "1")
_RESERVED = frozenset({"t", "p", "1", "65"})
_EXTRA_DATA = "Extra data after last field"

# pyiso8583 reasons are passed on only when they match these shapes (fixed texts plus
# lengths, never data); anything else becomes a generic reason.
_SAFE_REASON = re.compile(
    r"Field data is \d+ (bytes|nibbles), (expecting|larger than maximum) \d+"
    r"|Field length is \d+ bytes wide, expecting \d+"
    r"|Field data is required( according to specifications)?"
    r"|Failed to (de|en)code field( length)?, (non-hex data|invalid BCD data|invalid data"
    r"|non-numeric data|unknown encoding specified|odd-length hex data"
    r"|odd-length nibble data, specify pad|field length does not fit into configured field size)"
    r"|" + _EXTRA_DATA
)
_SAFE_FIELD = re.compile(r"[htp]|[1-9][0-9]{0,2}")


@dataclass(frozen=True, slots=True, repr=False)
class Message:
    """A decoded message: its MTI and data fields (``"2"``..``"128"``, ``"h"`` for a header).

    A message `decode` made remembers its bytes and spec (`wire`, never compared or shown):
    encoding it unchanged with that same spec object gives those bytes back without
    re-encoding, so a message passed through as it came costs one decode, not a decode and
    an encode. Any change (`with_fields`) makes a message without them.
    """

    mti: Mti
    fields: Mapping[str, str]
    wire: tuple[bytes, Spec] | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))

    def get(self, field: str) -> str | None:
        return self.fields.get(field)

    def __contains__(self, field: str) -> bool:
        return field in self.fields

    def with_fields(self, changes: Mapping[str, str | None], *, mti: Mti | None = None) -> Message:
        """A copy with ``changes`` applied (``None`` removes a field) and optionally a new MTI."""
        fields = dict(self.fields)
        for name, value in changes.items():
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value
        return Message(self.mti if mti is None else mti, fields)

    def __repr__(self) -> str:
        names = ", ".join(sorted(self.fields, key=field_order))
        return f"Message({self.mti.code}, fields=[{names}])"


@dataclass(frozen=True, slots=True)
class Salvage:
    """What could still be read from a malformed message: enough to answer it with RC 30."""

    mti: Mti
    stan: str
    terminal: str


def decode(data: bytes, spec: Spec) -> Message:
    """Decode one ISO 8583 message. Raises only DecodeError."""
    message, error = _run_decoder(data, spec)
    # Raise from a frame that no longer references the raw bytes.
    del data
    if error is not None:
        raise error from None
    assert message is not None
    return message


def encode(message: Message, spec: Spec) -> bytes:
    """Encode a message; pyiso8583 computes the bitmaps. Raises only EncodeError."""
    if message.wire is not None and message.wire[1] is spec:
        return message.wire[0]
    raw, error = _run_encoder(message, spec)
    if error is not None:
        raise error from None
    assert raw is not None
    return raw


def _run_decoder(data: bytes, spec: Spec) -> tuple[Message | None, DecodeError | None]:
    quick = quick_decode(data, spec)
    if quick is not None:
        code, doc = quick
    else:
        try:
            doc, _ = iso8583.decode(data, spec)
        except iso8583.DecodeError as e:
            # For "extra data" pyiso8583 names the last good field; the fault is not in it.
            field = None if e.msg == _EXTRA_DATA else _safe_field(e.field)
            return None, DecodeError(_safe_reason(e.msg), field=field, salvage=_salvage(e))
        except KeyError:
            return None, DecodeError("bitmap names a field the spec does not define")
        except Exception:
            return None, DecodeError("malformed message")
        code = doc.pop("t")
        for name in _BITMAPS:
            doc.pop(name, None)
    try:
        mti = Mti.parse(code)
    except DecodeError as e:
        return None, DecodeError(e.reason)
    message = Message(mti, doc)
    object.__setattr__(message, "wire", (bytes(data), spec))  # only decode sets it
    return message, None


def _run_encoder(message: Message, spec: Spec) -> tuple[bytes | None, EncodeError | None]:
    try:
        has_header = spec["h"]["max_len"] > 0
        for name in message.fields:
            if name in _RESERVED or name not in spec or (name == "h" and not has_header):
                return None, EncodeError("field not allowed by the spec", field=_safe_field(name))
        raw, _ = iso8583.encode({"t": message.mti.code, **message.fields}, spec)
    except iso8583.EncodeError as e:
        return None, EncodeError(_safe_reason(e.msg), field=_safe_field(e.field))
    except Exception:
        return None, EncodeError("message cannot be encoded with this spec")
    return bytes(raw), None


def _salvage(error: iso8583.DecodeError) -> Salvage | None:
    """MTI, STAN and terminal from a failed decode, when all three were fully read."""
    if error.msg != _EXTRA_DATA and error.field in ("t", "11", "41"):
        return None
    partial = error.doc_dec
    mti, stan, terminal = partial.get("t"), partial.get("11"), partial.get("41")
    if not (mti and stan and terminal):
        return None
    try:
        return Salvage(Mti.parse(mti), stan, terminal)
    except DecodeError:
        return None


def _safe_reason(msg: object) -> str:
    if isinstance(msg, str) and _SAFE_REASON.fullmatch(msg):
        return msg
    return "malformed field"


def _safe_field(field: object) -> str | None:
    return field if isinstance(field, str) and _SAFE_FIELD.fullmatch(field) else None


class _FieldOrder(dict[str, tuple[int, str]]):
    def __missing__(self, name: str) -> tuple[int, str]:
        return (int(name), "") if name.isdigit() else (-1, name)


# The sort key for field names: named ones ("h") first, then data fields by number, which
# is looked up rather than parsed (a sort calls it once a field, with no Python frame).
field_order: Callable[[str], tuple[int, str]] = _FieldOrder(
    {str(number): (number, "") for number in range(129)}
).__getitem__
