"""The Message Type Indicator: four digits, version / class / function / origin."""

from __future__ import annotations

from dataclasses import dataclass, field

from codec.errors import DecodeError

__all__ = ["Mti"]


@dataclass(frozen=True, slots=True)
class Mti:
    """An MTI such as ``0200``. Invalid text raises DecodeError (without echoing it).

    Its digits and what they say are worked out once, when it is made (`parse` shares one
    object per code), and then read as attributes: a transaction asks about a dozen times.
    """

    code: str
    version: int = field(init=False, repr=False, compare=False)
    message_class: int = field(init=False, repr=False, compare=False)
    function: int = field(init=False, repr=False, compare=False)
    origin: int = field(init=False, repr=False, compare=False)
    is_response: bool = field(init=False, repr=False, compare=False)  # an odd function
    is_request: bool = field(init=False, repr=False, compare=False)
    is_advice: bool = field(init=False, repr=False, compare=False)  # function 2 or 3
    is_repeat: bool = field(init=False, repr=False, compare=False)  # an odd origin
    _match_code: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        code = self.code
        if not (isinstance(code, str) and len(code) == 4 and code.isascii() and code.isdigit()):
            raise DecodeError("invalid MTI")
        version, message_class, function, origin = (int(digit) for digit in code)
        facts = {
            "version": version,
            "message_class": message_class,
            "function": function,
            "origin": origin,
            "is_response": function % 2 == 1,
            "is_request": function % 2 == 0,
            "is_advice": function in (2, 3),
            "is_repeat": origin % 2 == 1,
            "_match_code": f"{code[:2]}{function & ~1}{origin & ~1}",
        }
        for name, value in facts.items():
            object.__setattr__(self, name, value)

    @classmethod
    def parse(cls, text: str) -> Mti:
        """The MTI `text` names; the same object for the same text (MTIs are immutable, and
        at most 10 000 are valid), so parsing a known one costs a dict lookup."""
        if type(text) is not str:  # a str subclass is parsed, not shared; others fail
            return cls(text)
        known = _PARSED.get(text)
        if known is None:
            known = _PARSED[text] = cls(text)  # validates first
        return known

    def response(self) -> Mti:
        """The response MTI (function + 1, repeat digit cleared); a response returns itself."""
        if self.is_response:
            return self
        return Mti.parse(f"{self.code[:2]}{self.function + 1}{self.origin & ~1}")

    def original(self) -> Mti:
        """This MTI with the repeat digit cleared: 0201 -> 0200."""
        if not self.is_repeat:
            return self
        return Mti.parse(f"{self.code[:3]}{self.origin & ~1}")

    def match_code(self) -> str:
        """The code a request and its response share: 0200, 0201 and 0210 all give 0200."""
        return self._match_code

    def __str__(self) -> str:
        return self.code


# Keyed by a valid code, so it holds no more than 10 000 entries.
_PARSED: dict[str, Mti] = {}
