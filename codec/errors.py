"""The codec's error hierarchy. Errors carry short reasons and field numbers, never data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from codec.message import Salvage

__all__ = [
    "CodecError",
    "DecodeError",
    "EncodeError",
    "FrameTooLarge",
    "FramingError",
    "SpecError",
]


def _rebuild(cls: type[CodecError], args: tuple[Any, ...], kwargs: dict[str, Any]) -> CodecError:
    return cls(*args, **kwargs)


class CodecError(Exception):
    """Base of every codec failure. Never holds raw bytes or field values."""

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field

    def __str__(self) -> str:
        if self.field is None:
            return self.reason
        return f"{self.reason} (field {self.field})"

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), (self.reason,), {"field": self.field})


class FramingError(CodecError):
    """The byte stream cannot be split into frames: bad length prefix, short TPDU frame, ..."""


class FrameTooLarge(FramingError):
    """A length prefix (or a frame to send) exceeds the configured maximum."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame length {length} exceeds max_frame {limit}")
        self.length = length
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), (self.length, self.limit), {})


class DecodeError(CodecError):
    """A message could not be decoded; ``salvage`` holds what is needed to answer RC 30.

    The salvage is dropped when the error is pickled: pickled errors carry no field values.
    """

    def __init__(
        self, reason: str, *, field: str | None = None, salvage: Salvage | None = None
    ) -> None:
        super().__init__(reason, field=field)
        self.salvage = salvage


class EncodeError(CodecError):
    """A message could not be encoded with the given spec."""


class SpecError(CodecError):
    """A spec reference or spec file is invalid."""
