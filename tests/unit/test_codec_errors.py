"""The error hierarchy: messages, attributes and pickling."""

from __future__ import annotations

import pickle

import pytest

from codec import (
    CodecError,
    DecodeError,
    EncodeError,
    FrameTooLarge,
    FramingError,
    Mti,
    Salvage,
    SpecError,
)


def test_hierarchy() -> None:
    assert issubclass(FrameTooLarge, FramingError)
    for cls in (FramingError, DecodeError, EncodeError, SpecError):
        assert issubclass(cls, CodecError)


def test_str_with_and_without_field() -> None:
    assert str(CodecError("bad")) == "bad"
    err = EncodeError("Field data is 3 bytes, expecting 12", field="4")
    assert str(err) == "Field data is 3 bytes, expecting 12 (field 4)"
    assert (err.reason, err.field, err.args) == (
        "Field data is 3 bytes, expecting 12",
        "4",
        (err.reason,),
    )


@pytest.mark.parametrize(
    "err",
    [
        CodecError("bad"),
        FramingError("length prefix is not valid BCD"),
        DecodeError("Field data is 5 bytes, expecting 8", field="41"),
        EncodeError("field not allowed by the spec", field="65"),
        SpecError("spec file x.yaml: missing max_len", field="2"),
    ],
)
def test_pickle_round_trip(err: CodecError) -> None:
    restored = pickle.loads(pickle.dumps(err))
    assert type(restored) is type(err)
    assert (restored.reason, restored.field, str(restored)) == (err.reason, err.field, str(err))


def test_pickled_decode_error_drops_salvage() -> None:
    salvage = Salvage(Mti("0200"), "123456", "TERM0001")
    err = DecodeError("Extra data after last field", salvage=salvage)
    assert err.salvage is salvage
    dumped = pickle.dumps(err)
    assert b"TERM0001" not in dumped and b"123456" not in dumped
    assert pickle.loads(dumped).salvage is None


def test_frame_too_large_attributes() -> None:
    err = FrameTooLarge(9000, 8192)
    assert (err.length, err.limit) == (9000, 8192)
    assert str(err) == "frame length 9000 exceeds max_frame 8192"
    assert err.field is None
