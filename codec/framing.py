"""Sans-IO framing: length-prefixed frames with an optional TPDU. Bytes in, frames out."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import StrEnum

from codec.errors import FrameTooLarge, FramingError

__all__ = [
    "TPDU_LENGTH",
    "Frame",
    "FrameFormat",
    "Framer",
    "LengthPrefix",
    "encode_frame",
    "swap_tpdu",
]

TPDU_LENGTH = 5


class LengthPrefix(StrEnum):
    """How the frame length is written in front of each frame."""

    BINARY2 = "binary2"
    ASCII4 = "ascii4"
    BCD2 = "bcd2"

    @property
    def width(self) -> int:
        """Number of prefix bytes."""
        return 4 if self is LengthPrefix.ASCII4 else 2

    @property
    def max_length(self) -> int:
        """Largest length the prefix can express."""
        return 65535 if self is LengthPrefix.BINARY2 else 9999

    def pack(self, length: int) -> bytes:
        """The prefix bytes for ``length`` (0 <= length <= max_length)."""
        if self is LengthPrefix.BINARY2:
            return length.to_bytes(2, "big")
        if self is LengthPrefix.ASCII4:
            return b"%04d" % length
        return bytes.fromhex(f"{length:04d}")

    def unpack(self, prefix: bytes | bytearray) -> int:
        """The length in ``prefix`` (exactly ``width`` bytes); FramingError if malformed."""
        if self is LengthPrefix.BINARY2:
            return int.from_bytes(prefix, "big")
        if self is LengthPrefix.ASCII4:
            if not prefix.isdigit():
                raise FramingError("length prefix is not 4 ASCII digits")
            return int(prefix)
        digits = prefix.hex()
        if not digits.isdigit():
            raise FramingError("length prefix is not valid BCD")
        return int(digits)


@dataclass(frozen=True, slots=True)
class FrameFormat:
    """Framing of one connection: prefix kind, TPDU presence and largest accepted length."""

    prefix: LengthPrefix = LengthPrefix.BINARY2
    tpdu: bool = False
    max_frame: int = 8192

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", LengthPrefix(self.prefix))
        if not 1 <= self.max_frame <= self.prefix.max_length:
            raise ValueError(f"max_frame must be 1..{self.prefix.max_length} for {self.prefix}")


@dataclass(frozen=True, slots=True, repr=False)
class Frame:
    """One frame: the ISO 8583 message bytes and, for TPDU formats, the 5 TPDU bytes."""

    message: bytes
    tpdu: bytes | None = None

    def __repr__(self) -> str:
        return f"Frame(len={len(self.message)}, tpdu={self.tpdu is not None})"


def swap_tpdu(tpdu: bytes) -> bytes:
    """The reply TPDU: id byte kept, destination and source addresses swapped."""
    if len(tpdu) != TPDU_LENGTH:
        raise FramingError(f"TPDU must be {TPDU_LENGTH} bytes")
    return bytes(tpdu[:1] + tpdu[3:5] + tpdu[1:3])


def encode_frame(fmt: FrameFormat, frame: Frame) -> bytes:
    """Prefix + TPDU + message. An empty message without TPDU encodes as a keep-alive."""
    if not frame.message and frame.tpdu is None:
        return fmt.prefix.pack(0)
    if fmt.tpdu:
        if frame.tpdu is None:
            raise FramingError("frame has no TPDU but the format requires one")
        if len(frame.tpdu) != TPDU_LENGTH:
            raise FramingError(f"TPDU must be {TPDU_LENGTH} bytes")
    elif frame.tpdu is not None:
        raise FramingError("frame has a TPDU but the format has none")
    tpdu = frame.tpdu or b""
    length = len(tpdu) + len(frame.message)
    if length > fmt.max_frame:
        raise FrameTooLarge(length, fmt.max_frame)
    return b"".join((fmt.prefix.pack(length), tpdu, frame.message))


class Framer:
    """Splits a received byte stream into frames (sans-IO, like h11).

    ``feed`` appends bytes; ``next_frame`` returns complete frames until it needs more.
    Each length prefix is checked against ``max_frame`` as soon as its bytes arrive, before
    any body is awaited. After an error the framer is broken and keeps raising.
    """

    __slots__ = ("_buf", "_error", "_fmt", "_keepalives")

    def __init__(self, fmt: FrameFormat) -> None:
        self._fmt = fmt
        self._buf = bytearray()
        self._error: FramingError | None = None
        self._keepalives = 0

    @property
    def buffered(self) -> int:
        """Bytes held but not yet returned as frames."""
        return len(self._buf)

    @property
    def keepalives(self) -> int:
        """Zero-length frames skipped so far."""
        return self._keepalives

    def feed(self, data: bytes | bytearray) -> None:
        """Append received bytes."""
        self._check_broken()
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        self._check_broken()
        buf = self._buf
        fmt = self._fmt
        width = fmt.prefix.width
        while len(buf) >= width:
            try:
                length = fmt.prefix.unpack(buf[:width])
                if length > fmt.max_frame:
                    raise FrameTooLarge(length, fmt.max_frame)
                if fmt.tpdu and 0 < length < TPDU_LENGTH:
                    raise FramingError(f"frame length {length} is too short for a TPDU")
            except FramingError as e:
                self._break(e)
                raise
            if length == 0:
                del buf[:width]
                self._keepalives += 1
                continue
            end = width + length
            if len(buf) < end:
                return None
            if fmt.tpdu:
                start = width + TPDU_LENGTH
                frame = Frame(bytes(buf[start:end]), bytes(buf[width:start]))
            else:
                frame = Frame(bytes(buf[width:end]))
            del buf[:end]
            return frame
        return None

    def _check_broken(self) -> None:
        if self._error is not None:
            raise copy.copy(self._error) from None

    def _break(self, error: FramingError) -> None:
        self._error = error
        self._buf = bytearray()
