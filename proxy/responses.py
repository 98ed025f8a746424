"""Answers the proxy builds itself (echo replies, rejections, timeouts)."""

from __future__ import annotations

from codec import Message, Salvage

# Fields of a request that its answer carries back: identification and amounts, never
# card data (2, 14, 35, 36, 45, 52, 55 stay with the request).
ECHOED_FIELDS = ("3", "4", "7", "11", "12", "13", "32", "37", "41", "42", "49", "70", "90")


def answer(request: Message, rc: str) -> Message:
    """The response to `request` with response code `rc`."""
    fields = {f: v for f in ECHOED_FIELDS if (v := request.get(f)) is not None}
    fields["39"] = rc
    return Message(request.mti.response(), fields)


def answer_salvaged(salvage: Salvage, rc: str) -> Message:
    """The response to a message that could not be decoded beyond its MTI, 11 and 41."""
    return Message(salvage.mti.response(), {"11": salvage.stan, "39": rc, "41": salvage.terminal})
