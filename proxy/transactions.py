"""What the journal knows of a transaction: its key, its fingerprint, and its safe fields.

The *transaction key* says "this is the same transaction": the MTI with a repeat folded
into its original (0201 -> 0200), then the configured key fields: by default the acquirer
(32, when present), terminal (41), STAN (11), RRN (37, when present) and the transmission
date. The date comes from field 7 (MMDDhhmmss, no year: the year is the one that puts it
closest to the receive time, so 31 Dec 23:59:59 received on 1 Jan is last year's) or, with
no field 7, from the receive time (UTC). A STAN is unique per terminal per day only, so
never STAN alone.

The *fingerprint* says "with the same content": a keyed HMAC over the financial fields
(PAN, processing code, amounts, currencies, expiry, entry mode, merchant). Two requests
with one key and one fingerprint are the same transaction sent twice; one key with two
fingerprints is a collision (RC 94).

Nothing sensitive is kept: the PAN only as first 6 + last 4 and a keyed HMAC; stored
request and response fields pass a whitelist (`codec.LOGGABLE_FIELDS`), so track data,
PIN blocks, chip data and anything unknown never reach the database. A replayed answer
is rebuilt from the stored fields plus, for the fields the original answer carried but
the journal may not keep (the PAN, say), the values of the incoming request.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from codec import LOGGABLE_FIELDS, CodecError, Message, Mti, field_order, mask_pan

DATE_FIELD = "7"
FINGERPRINT_FIELDS = ("2", "3", "4", "5", "6", "14", "22", "25", "42", "49", "50", "51")
_SEPARATOR = "\x1f"
_HALF_YEAR = timedelta(days=182)


@dataclass(frozen=True, slots=True)
class Claim:
    """A request as the journal records it before anything is forwarded."""

    key: str
    mti: str
    terminal: str
    stan: str
    acquirer: str | None
    rrn: str | None
    tx_date: date
    fingerprint: bytes = field(repr=False)
    pan_masked: str | None
    pan_hash: bytes | None = field(repr=False)
    fields: Mapping[str, str] = field(repr=False)
    switch: str | None = None  # where it is to be forwarded: where recovery reverses it

    def naming(self, switch: str | None) -> Claim:
        """This claim, forwarded to `switch` (`dataclasses.replace` costs a dozen calls
        more, on the hot path)."""
        return Claim(
            key=self.key,
            mti=self.mti,
            terminal=self.terminal,
            stan=self.stan,
            acquirer=self.acquirer,
            rrn=self.rrn,
            tx_date=self.tx_date,
            fingerprint=self.fingerprint,
            pan_masked=self.pan_masked,
            pan_hash=self.pan_hash,
            fields=self.fields,
            switch=switch,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a claimed transaction ended, recorded before the terminal is answered."""

    key: str
    state: str  # answered | timed_out | failed
    rc: str
    response_mti: str | None = None
    auth_code: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict, repr=False)
    field_names: tuple[str, ...] = ()
    switch: str | None = None
    link: str | None = None
    latency_ms: float = 0.0
    reversal: Message | None = field(default=None, repr=False)  # queued with the outcome


@dataclass(frozen=True, slots=True)
class Recorded:
    """A claim that already existed: what the journal holds for the key."""

    fingerprint: bytes = field(repr=False)
    state: str
    rc: str | None
    response_mti: str | None
    fields: Mapping[str, str] = field(repr=False)
    field_names: tuple[str, ...]
    switch: str | None = None

    @property
    def completed(self) -> bool:
        return self.state != "claimed"


class TransactionIdentity:
    """Builds claims from requests: keys, fingerprints and safe fields."""

    def __init__(self, key_fields: tuple[str, ...], secret: bytes | None) -> None:
        self._key_fields = key_fields
        self._secret = secret

    def claim(self, request: Message, received_at: datetime) -> Claim:
        value = request.fields.get
        tx_date = transaction_date(value(DATE_FIELD), received_at)
        pan = value("2")
        acquirer, rrn = value("32"), value("37")
        return Claim(
            key=storable(self.key(request, tx_date)),
            mti=request.mti.code,
            terminal=storable(value("41") or ""),
            stan=storable(value("11") or ""),
            acquirer=storable(acquirer) if acquirer is not None else None,
            rrn=storable(rrn) if rrn is not None else None,
            tx_date=tx_date,
            fingerprint=self.fingerprint(request),
            pan_masked=mask_pan(pan) if pan else None,
            pan_hash=self._hmac(pan) if pan and self._secret else None,
            fields=safe_fields(request),
        )

    def key(self, request: Message, tx_date: date) -> str:
        parts = [request.mti.original().code]
        value = request.fields.get
        for name in self._key_fields:
            if name == DATE_FIELD:
                parts.append(tx_date.isoformat())
            else:
                parts.append(f"{name}={value(name) or ''}")
        return _SEPARATOR.join(parts)

    def original_key(self, reversal: Message, received_at: datetime) -> str | None:
        """The key of the transaction a reversal names in field 90 (original MTI, STAN and
        transmission date and time), with the reversal's own identification fields."""
        elements = reversal.get("90")
        if elements is None or len(elements) < 20 or not elements[:20].isdigit():
            return None
        try:
            mti = Mti.parse(elements[:4])
        except CodecError:
            return None
        original = reversal.with_fields({"11": elements[4:10], "7": elements[10:20]}, mti=mti)
        return storable(self.key(original, transaction_date(elements[10:20], received_at)))

    def fingerprint(self, request: Message) -> bytes:
        """HMAC of the financial fields; without a secret, the PAN is left out of it."""
        names = FINGERPRINT_FIELDS if self._secret else FINGERPRINT_FIELDS[1:]
        value = request.fields.get
        text = _SEPARATOR.join([f"{n}={value(n) or ''}" for n in names])
        return self._hmac(text) if self._secret else hashlib.sha256(text.encode()).digest()

    def _hmac(self, text: str) -> bytes:
        assert self._secret is not None
        return hmac.digest(self._secret, text.encode(), "sha256")


def transaction_date(field7: str | None, received_at: datetime) -> date:
    """The date of field 7 (MMDDhhmmss) in the year that puts it nearest `received_at`;
    `received_at`'s own date when field 7 is missing or not a date."""
    if field7 is None or len(field7) != 10 or not field7.isdigit():
        return received_at.date()
    month, day = int(field7[:2]), int(field7[2:4])
    hour, minute, second = int(field7[4:6]), int(field7[6:8]), int(field7[8:10])
    candidates = []
    for year in (received_at.year, received_at.year - 1, received_at.year + 1):
        try:
            moment = received_at.replace(
                year=year, month=month, day=day, hour=hour, minute=minute, second=second,
                microsecond=0,
            )  # fmt: skip
        except ValueError:  # 29 Feb in a year without it, 31 Apr...
            continue
        if year == received_at.year and abs(moment - received_at) <= _HALF_YEAR:
            return moment.date()  # the other years' are at least 183 days away: farther
        candidates.append(moment)
    if not candidates:
        return received_at.date()
    # An exact tie goes to the earlier year, as it always has: the date is part of the key,
    # and instances sharing a journal must agree on it.
    return min(candidates, key=lambda moment: (abs(moment - received_at), moment)).date()


def safe_fields(message: Message) -> dict[str, str]:
    """The fields that may be stored: the whitelist only (no PAN, track, PIN, chip data)."""
    return {  # storable() only where it changes something: no call a field on the hot path
        name: storable(value) if "\x00" in value else value
        for name, value in message.fields.items()
        if name in LOGGABLE_FIELDS
    }


def storable(text: str) -> str:
    """`text` as PostgreSQL text can hold it (no NUL), the same way every time."""
    return text.replace("\x00", "\ufffd")


def outcome_of(
    claim: Claim,
    response: Message,
    *,
    state: str,
    switch: str | None = None,
    link: str | None = None,
    latency_ms: float = 0.0,
    reversal: Message | None = None,
) -> Outcome:
    """The outcome of a claim: the answer the terminal gets (the switch's, or the proxy's
    own when no switch answered) and how it came about."""
    value = response.fields.get
    auth_code = value("38")
    return Outcome(
        key=claim.key,
        state=state,
        rc=storable(value("39") or ""),
        response_mti=response.mti.code,
        auth_code=storable(auth_code) if auth_code is not None else None,
        fields=safe_fields(response),
        field_names=tuple(sorted(response.fields, key=field_order)),
        switch=switch,
        link=link,
        latency_ms=latency_ms,
        reversal=reversal,
    )


# Fields an answer echoes from its request that the journal does not keep: a replay takes
# them from the incoming request (same fingerprint, so the same card). Anything else the
# journal did not keep (chip data, balances, private fields) is left out of a replay.
ECHOED_FROM_REQUEST = frozenset({"2"})


def replay(request: Message, recorded: Recorded) -> Message:
    """The stored answer, for `request` (a repeat or a re-send of the same transaction)."""
    fields = dict(recorded.fields)
    for name in recorded.field_names:
        if name in ECHOED_FROM_REQUEST and (value := request.get(name)) is not None:
            fields[name] = value
    mti = Mti.parse(recorded.response_mti) if recorded.response_mti else request.mti.response()
    return Message(mti, fields)


# What a reversal carries of its original (never card data: the switch finds the original
# by field 90 and the identification fields).
REVERSAL_FIELDS = ("3", "4", "5", "6", "11", "12", "13", "32", "33", "37", "41", "42", "49", "50")


def original_data_elements(original: Mapping[str, str], original_mti: str) -> str:
    """Field 90: original MTI, STAN, transmission date and time, acquirer and forwarding
    institution identification (each zero-padded to its length: 4 + 6 + 10 + 11 + 11)."""
    return (
        f"{original_mti:0>4}{original.get('11', ''):0>6}{original.get('7', ''):0>10}"
        f"{original.get('32', '')[-11:]:0>11}{original.get('33', '')[-11:]:0>11}"
    )


def reversal_for(
    original: Mapping[str, str], original_mti: str, mti: str, now: datetime
) -> Message:
    """The reversal (0400, or 0420 advice) of a transaction, from its stored fields."""
    fields = {name: original[name] for name in REVERSAL_FIELDS if name in original}
    fields["7"] = now.strftime("%m%d%H%M%S")
    fields["90"] = original_data_elements(original, original_mti)
    return Message(Mti.parse(mti), fields)
