"""Framer, encode_frame and swap_tpdu."""

from __future__ import annotations

import itertools
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec import (
    TPDU_LENGTH,
    Frame,
    FrameFormat,
    Framer,
    FrameTooLarge,
    FramingError,
    LengthPrefix,
    encode_frame,
    swap_tpdu,
)

FORMATS = [FrameFormat(prefix, tpdu=tpdu) for prefix in LengthPrefix for tpdu in (False, True)]
KEEPALIVE = Frame(b"")


def frames_for(fmt: FrameFormat) -> st.SearchStrategy[Frame]:
    if fmt.tpdu:
        real = st.builds(
            Frame,
            st.binary(max_size=300),
            st.binary(min_size=TPDU_LENGTH, max_size=TPDU_LENGTH),
        )
    else:
        real = st.builds(Frame, st.binary(min_size=1, max_size=300))
    return st.one_of(st.just(KEEPALIVE), real)


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.prefix}-tpdu{int(f.tpdu)}")
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_segmentation_gives_the_original_frames(fmt: FrameFormat, data: st.DataObject) -> None:
    frames = data.draw(st.lists(frames_for(fmt), max_size=12), label="frames")
    stream = b"".join(encode_frame(fmt, f) for f in frames)
    mode = data.draw(st.sampled_from(["whole", "bytes", "random"]), label="mode")
    if mode == "whole":
        chunks = [stream]
    elif mode == "bytes":
        chunks = [stream[i : i + 1] for i in range(len(stream))]
    else:
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
        chunks = split(stream, cuts)

    framer = Framer(fmt)
    got: list[Frame] = []
    for chunk in chunks:
        framer.feed(chunk)
        while (frame := framer.next_frame()) is not None:
            got.append(frame)

    assert got == [f for f in frames if f != KEEPALIVE]
    assert framer.keepalives == frames.count(KEEPALIVE)
    assert framer.buffered == 0
    assert framer.next_frame() is None


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.prefix}-tpdu{int(f.tpdu)}")
def test_many_frames_in_one_feed(fmt: FrameFormat) -> None:
    tpdu = b"\x60\x00\x01\x00\x02" if fmt.tpdu else None
    frames = [Frame(bytes([i]) * (i + 1), tpdu) for i in range(10)]
    framer = Framer(fmt)
    framer.feed(b"".join(encode_frame(fmt, f) for f in frames))
    assert [framer.next_frame() for _ in range(10)] == frames
    assert framer.next_frame() is None
    assert framer.buffered == 0


def test_partial_frame_is_held_until_complete() -> None:
    fmt = FrameFormat()
    framer = Framer(fmt)
    framer.feed(b"\x00\x05abc")
    assert framer.next_frame() is None
    assert framer.buffered == 5
    framer.feed(b"de\x00")
    assert framer.next_frame() == Frame(b"abcde")
    assert framer.next_frame() is None
    assert framer.buffered == 1


@pytest.mark.parametrize("prefix", list(LengthPrefix))
@pytest.mark.parametrize("tpdu", [False, True])
def test_oversized_prefix_is_refused_before_the_body(prefix: LengthPrefix, tpdu: bool) -> None:
    fmt = FrameFormat(prefix, tpdu=tpdu, max_frame=100)
    framer = Framer(fmt)
    header = prefix.pack(101)
    assert len(header) == prefix.width
    framer.feed(header)
    assert framer.buffered <= prefix.width
    with pytest.raises(FrameTooLarge) as info:
        framer.next_frame()
    assert (info.value.length, info.value.limit) == (101, 100)
    assert str(info.value) == "frame length 101 exceeds max_frame 100"
    assert framer.buffered == 0
    # Sticky: every later call fails the same way.
    with pytest.raises(FrameTooLarge):
        framer.next_frame()
    with pytest.raises(FrameTooLarge):
        framer.feed(b"\x00" * 10)
    assert framer.buffered == 0


def test_oversized_prefix_after_good_frames_still_returns_them_first() -> None:
    fmt = FrameFormat(max_frame=10)
    framer = Framer(fmt)
    framer.feed(b"\x00\x02ok\x00\x0b")
    assert framer.next_frame() == Frame(b"ok")
    with pytest.raises(FrameTooLarge):
        framer.next_frame()


def test_binary_prefix_maximum_against_default_limit() -> None:
    framer = Framer(FrameFormat())
    framer.feed(b"\xff\xff")
    with pytest.raises(FrameTooLarge) as info:
        framer.next_frame()
    assert (info.value.length, info.value.limit) == (65535, 8192)


@pytest.mark.parametrize(
    ("prefix", "header"),
    [
        (LengthPrefix.ASCII4, b"12a4"),
        (LengthPrefix.ASCII4, b" 123"),
        (LengthPrefix.ASCII4, b"+123"),
        (LengthPrefix.ASCII4, b"-001"),
        (LengthPrefix.ASCII4, b"1_23"),
        (LengthPrefix.BCD2, b"\x0a\x00"),
        (LengthPrefix.BCD2, b"\x00\x1f"),
        (LengthPrefix.BCD2, b"\xff\xff"),
    ],
)
def test_bad_prefix_is_a_framing_error_and_sticky(prefix: LengthPrefix, header: bytes) -> None:
    framer = Framer(FrameFormat(prefix))
    framer.feed(header + b"0200")
    with pytest.raises(FramingError) as info:
        framer.next_frame()
    assert not isinstance(info.value, FrameTooLarge)
    assert framer.buffered == 0
    with pytest.raises(FramingError):
        framer.next_frame()
    with pytest.raises(FramingError):
        framer.feed(b"0004abcd")


@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_tpdu_frame_shorter_than_a_tpdu(length: int) -> None:
    fmt = FrameFormat(LengthPrefix.BINARY2, tpdu=True)
    framer = Framer(fmt)
    framer.feed(length.to_bytes(2, "big"))
    with pytest.raises(FramingError, match="too short for a TPDU"):
        framer.next_frame()


def test_tpdu_only_frame_has_an_empty_message() -> None:
    fmt = FrameFormat(tpdu=True)
    framer = Framer(fmt)
    framer.feed(b"\x00\x05\x60\x00\x01\x00\x02")
    assert framer.next_frame() == Frame(b"", b"\x60\x00\x01\x00\x02")


def test_sticky_error_is_a_fresh_instance() -> None:
    framer = Framer(FrameFormat(LengthPrefix.ASCII4))
    framer.feed(b"abcd")
    with pytest.raises(FramingError) as first:
        framer.next_frame()
    with pytest.raises(FramingError) as second:
        framer.next_frame()
    assert first.value is not second.value
    assert first.value.__traceback__ is not None
    assert second.value.__cause__ is None
    assert second.value.__context__ is None


@pytest.mark.parametrize(
    ("prefix", "length", "header"),
    [
        (LengthPrefix.BINARY2, 123, b"\x00\x7b"),
        (LengthPrefix.BINARY2, 0, b"\x00\x00"),
        (LengthPrefix.BINARY2, 65535, b"\xff\xff"),
        (LengthPrefix.ASCII4, 123, b"0123"),
        (LengthPrefix.ASCII4, 9999, b"9999"),
        (LengthPrefix.BCD2, 123, b"\x01\x23"),
        (LengthPrefix.BCD2, 9999, b"\x99\x99"),
    ],
)
def test_prefix_bytes(prefix: LengthPrefix, length: int, header: bytes) -> None:
    assert prefix.pack(length) == header
    assert prefix.unpack(header) == length


def test_prefix_limits() -> None:
    assert LengthPrefix.BINARY2.max_length == 65535
    assert LengthPrefix.ASCII4.max_length == 9999
    assert LengthPrefix.BCD2.max_length == 9999


def test_encode_frame_bytes() -> None:
    tpdu = b"\x60\x00\x01\x00\x02"
    assert encode_frame(FrameFormat(), Frame(b"abc")) == b"\x00\x03abc"
    assert encode_frame(FrameFormat(LengthPrefix.ASCII4, tpdu=True), Frame(b"abc", tpdu)) == (
        b"0008" + tpdu + b"abc"
    )
    assert encode_frame(FrameFormat(LengthPrefix.BCD2), Frame(b"x" * 123)) == b"\x01\x23" + (
        b"x" * 123
    )
    assert encode_frame(FrameFormat(tpdu=True), KEEPALIVE) == b"\x00\x00"


def test_encode_frame_errors() -> None:
    tpdu = b"\x60\x00\x01\x00\x02"
    with pytest.raises(FramingError, match="requires"):
        encode_frame(FrameFormat(tpdu=True), Frame(b"abc"))
    with pytest.raises(FramingError, match="has none"):
        encode_frame(FrameFormat(), Frame(b"abc", tpdu))
    with pytest.raises(FramingError, match="5 bytes"):
        encode_frame(FrameFormat(tpdu=True), Frame(b"abc", b"\x60\x00"))
    fmt = FrameFormat(max_frame=10)
    assert len(encode_frame(fmt, Frame(b"x" * 10))) == 12
    with pytest.raises(FrameTooLarge) as info:
        encode_frame(fmt, Frame(b"x" * 11))
    assert (info.value.length, info.value.limit) == (11, 10)
    with pytest.raises(FrameTooLarge) as info:
        encode_frame(FrameFormat(tpdu=True, max_frame=10), Frame(b"x" * 6, tpdu))
    assert info.value.length == 11


def test_frame_format_guard() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        FrameFormat(max_frame=0)
    with pytest.raises(ValueError, match="max_frame"):
        FrameFormat(LengthPrefix.ASCII4, max_frame=10000)
    with pytest.raises(ValueError, match="max_frame"):
        FrameFormat(LengthPrefix.BCD2, max_frame=10000)
    assert FrameFormat(LengthPrefix.BINARY2, max_frame=65535).max_frame == 65535
    assert FrameFormat("ascii4").prefix is LengthPrefix.ASCII4  # type: ignore[arg-type]


def test_frame_repr_has_no_bytes() -> None:
    frame = Frame(b"4111111111111111", b"\x60\x00\x01\x00\x02")
    assert repr(frame) == "Frame(len=16, tpdu=True)"
    assert repr(Frame(b"abc")) == "Frame(len=3, tpdu=False)"


def test_swap_tpdu() -> None:
    assert swap_tpdu(b"\x60\x00\x01\x00\x02") == b"\x60\x00\x02\x00\x01"
    assert swap_tpdu(b"\x60\x12\x34\x56\x78") == b"\x60\x56\x78\x12\x34"
    for bad in (b"", b"\x60\x00\x01\x00", b"\x60\x00\x01\x00\x02\x03"):
        with pytest.raises(FramingError):
            swap_tpdu(bad)


@given(st.binary(min_size=5, max_size=5))
def test_swap_tpdu_twice_is_identity(tpdu: bytes) -> None:
    swapped = swap_tpdu(tpdu)
    assert swapped[0] == tpdu[0]
    assert swap_tpdu(swapped) == tpdu


def test_framing_errors_pickle() -> None:
    big = pickle.loads(pickle.dumps(FrameTooLarge(9000, 8192)))
    assert isinstance(big, FrameTooLarge)
    assert (big.length, big.limit, str(big)) == (
        9000,
        8192,
        "frame length 9000 exceeds max_frame 8192",
    )
    bad = pickle.loads(pickle.dumps(FramingError("length prefix is not valid BCD")))
    assert type(bad) is FramingError
    assert str(bad) == "length prefix is not valid BCD"
