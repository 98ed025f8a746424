"""Masking for logs and storage. Fails closed: only whitelisted fields are shown."""

from __future__ import annotations

from codec.message import Message

__all__ = ["LOGGABLE_FIELDS", "SENSITIVE_FIELDS", "loggable", "mask_pan"]

REDACTED = "[redacted]"

# Cardholder and security data. Informative: anything outside LOGGABLE_FIELDS is redacted
# anyway; field 2 is masked rather than dropped.
SENSITIVE_FIELDS: frozenset[str] = frozenset(
    {
        "2",  # PAN
        "14",  # expiry date
        "34",  # extended PAN
        "35",  # track 2
        "36",  # track 3
        "45",  # track 1
        "52",  # PIN block
        "53",  # security control information
        "55",  # chip (ICC) data
        "96",  # message security code
        "102",  # account identification 1
        "103",  # account identification 2
    }
)

LOGGABLE_FIELDS: frozenset[str] = frozenset(
    {
        "3", "4", "5", "6", "7", "11", "12", "13", "15", "18", "19", "22", "24", "25",
        "32", "33", "37", "38", "39", "41", "42", "43", "49", "50", "51", "70", "90",
        "95", "100",
    }
)  # fmt: skip


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits of a 13..19 digit PAN; anything else is fully masked."""
    if 13 <= len(pan) <= 19 and pan.isascii() and pan.isdigit():
        return f"{pan[:6]}{'*' * (len(pan) - 10)}{pan[-4:]}"
    return "*" * len(pan)


def loggable(message: Message) -> dict[str, str]:
    """The message as a dict safe to log: MTI, whitelisted fields, masked PAN, the rest redacted."""
    out = {"mti": message.mti.code}
    for name in sorted(message.fields, key=lambda n: (len(n), n)):
        value = message.fields[name]
        if name in LOGGABLE_FIELDS:
            out[name] = value
        elif name == "2":
            out[name] = mask_pan(value)
        else:
            out[name] = REDACTED
    return out
