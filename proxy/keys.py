"""Match keys: how a switch's answer finds the request it belongs to."""

from __future__ import annotations

from codec import Message
from proxy.errors import MissingKeyField

MatchKey = tuple[str, ...]


def match_key(message: Message, fields: tuple[str, ...]) -> MatchKey:
    """jPOS-style key: the MTI mapped so request and response meet, then the key fields.

    0200, its repeat 0201 and its answer 0210 all give ("0200", <41>, <11>) with the default
    fields, so a response is matched to the request whatever its own MTI digit says.
    """
    values = [message.mti.match_code()]
    for field in fields:
        value = message.get(field)
        if value is None:
            raise MissingKeyField(field)
        values.append(value)
    return tuple(values)
