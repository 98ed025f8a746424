"""The policy table: what the proxy does with each message, and which RC each failure gets.

Everything the proxy decides about a message lives here, as plain functions of values, so
the policy can be read in one place and tested table by table.

From a terminal:
- Requests and advices of classes 1 (authorization), 2 (financial) and 4 (reversal),
  including repeats, are forwarded to a switch.
- A network-management echo (0800, field 70 = 301) is the operators' test of the proxy
  itself: answered 0810 RC 00 here, never forwarded.
- Any other request (other network-management codes, file actions, reconciliation...) is
  not the proxy's to carry: answered RC 12 (invalid transaction).
- A response sent by a terminal answers nothing we asked: dropped (and logged).

From a switch:
- Transaction responses go to the correlator to find their request.
- Network-management responses (0810) answer the link's own echoes and sign-ons: they go
  to the link that asked, never to a terminal.
- A network-management request or advice (the switch's own echo, sign-on, key change...)
  is acknowledged on the link with RC 00 (0810 / 0830). A sign-off (field 70 = 002) is
  acknowledged too, and then the link is dropped: that switch takes no more traffic on it
  until a new connection passes its echoes.
- Anything else is unsolicited: dropped and logged.

When forwarding fails, the terminal still gets an answer; the RC says why (`FAILURE_RC`).
A request whose match-key fields are missing is a format error (30): its answer could never
be matched; so is one that the chosen switch's spec cannot encode. A second request with a
key already in flight is a duplicate transmission (94). No healthy link, a lost link, or no
answer by the deadline: issuer or switch inoperative (91).

A connection that stops answering collects unanswered requests (their keys are held for
the late answers). When half of its request slots are held that way, it is recycled:
dropped and reconnected, which fails what it still carries and frees the keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from codec import Message, Mti
from proxy.errors import (
    KeyInFlight,
    LinkLost,
    MissingKeyField,
    NoLinkAvailable,
    ProxyError,
    UnencodableMessage,
    UpstreamTimeout,
)
from proxy.network import ECHO, SIGN_OFF

APPROVED = "00"
INVALID_TRANSACTION = "12"
FORMAT_ERROR = "30"
SWITCH_INOPERATIVE = "91"
DUPLICATE_TRANSMISSION = "94"
SYSTEM_MALFUNCTION = "96"

FORWARDED_CLASSES = frozenset({1, 2, 4})
REVERSAL = 4
NETWORK_MANAGEMENT = 8


class Action(StrEnum):
    FORWARD = "forward"
    ANSWER = "answer"
    MATCH = "match"
    OWN = "own"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    rc: str | None = None
    reason: str = ""
    drop_link: bool = False


FAILURE_RC: dict[type[ProxyError], str] = {
    MissingKeyField: FORMAT_ERROR,
    UnencodableMessage: FORMAT_ERROR,
    KeyInFlight: DUPLICATE_TRANSMISSION,
    NoLinkAvailable: SWITCH_INOPERATIVE,
    LinkLost: SWITCH_INOPERATIVE,
    UpstreamTimeout: SWITCH_INOPERATIVE,
}


def from_terminal(message: Message) -> Decision:
    mti = message.mti
    if mti.is_response:
        return Decision(Action.DROP, reason="response from a terminal")
    if mti.message_class in FORWARDED_CLASSES:
        return Decision(Action.FORWARD)
    if mti.message_class == NETWORK_MANAGEMENT and message.get("70") == ECHO:
        return Decision(Action.ANSWER, APPROVED, "echo test of the proxy")
    return Decision(Action.ANSWER, INVALID_TRANSACTION, "message type not carried")


def from_switch(message: Message) -> Decision:
    mti = message.mti
    if mti.is_response:
        if mti.message_class == NETWORK_MANAGEMENT:
            return Decision(Action.OWN)
        return Decision(Action.MATCH)
    if mti.message_class == NETWORK_MANAGEMENT:
        if message.get("70") == SIGN_OFF:
            return Decision(Action.ANSWER, APPROVED, "the switch signed off", drop_link=True)
        return Decision(Action.ANSWER, APPROVED, "network management from the switch")
    return Decision(Action.DROP, reason="unsolicited request from a switch")


class Duplicate(StrEnum):
    REPLAY = "replay"
    JOIN = "join"
    REJECT = "reject"


def on_duplicate(
    held_fingerprint: bytes, completed: bool, fingerprint: bytes, on_conflict: str
) -> Duplicate:
    """A request whose key is already claimed: the same transaction again gets the stored
    answer (or joins it while in flight); other content under the same key gets RC 94, or
    with `on_conflict: replay` the stored answer once there is one."""
    if held_fingerprint != fingerprint and not (on_conflict == "replay" and completed):
        return Duplicate.REJECT
    return Duplicate.REPLAY if completed else Duplicate.JOIN


def reverse_after_timeout(mti: Mti) -> bool:
    """A request of class 1 or 2 that may have reached a switch but got no answer is
    reversed: if the switch approved it, the cardholder would be charged for a purchase
    the terminal saw fail. Not a reversal (the terminal repeats it), nor an advice (an
    offline sale already happened: its repeat is sent again, see `may_reclaim`)."""
    return mti.message_class in (1, 2) and not mti.is_advice


def reverse_if_undelivered(mti: Mti, rc: str, policy: bool) -> bool:
    """An approval of an authorization or a financial request that its terminal never
    received is reversed (policy `reversal.on_undelivered`)."""
    return policy and reversible_approval(mti, rc)


def reversible_approval(mti: Mti, rc: str) -> bool:
    """An approval of an authorization or a financial request (not an advice)."""
    return rc == APPROVED and mti.message_class in (1, 2) and not mti.is_advice


def repeat_of(mti: Mti) -> Mti:
    """The repeat of a request: 0400 -> 0401, 0420 -> 0421."""
    return Mti.parse(mti.code[:3] + str(mti.origin | 1))


def may_reclaim(state: str, mti: Mti) -> bool:
    """Whether a request may claim again a key whose transaction ended without a switch's
    answer: always when it never left (`failed`); after a timeout (`timed_out`: it may have
    reached the switch) only for a repeat of a reversal or an advice, which switches expect
    to receive again until they acknowledge it."""
    if state == "failed":
        return True
    repeatable = mti.message_class == REVERSAL or mti.is_advice
    return state == "timed_out" and mti.is_repeat and repeatable


def failure_state(error: ProxyError) -> str:
    """How the journal records a request that got no answer from a switch: `timed_out`
    when it may have reached one (it was written), `failed` when it certainly did not."""
    return "timed_out" if isinstance(error, LinkLost | UpstreamTimeout) else "failed"


def failure_rc(error: ProxyError, timeout_rc: str = SWITCH_INOPERATIVE) -> str:
    """The RC a terminal gets when its request could not be completed; for no answer by
    the deadline, the configured `reversal.timeout_rc` (91, or 68 "response received too
    late")."""
    if isinstance(error, UpstreamTimeout):
        return timeout_rc
    for kind, rc in FAILURE_RC.items():
        if isinstance(error, kind):
            return rc
    return SYSTEM_MALFUNCTION


def should_recycle(unanswered: int, limit: int) -> bool:
    """Whether a connection holding `unanswered` timed-out requests should be dropped."""
    return unanswered >= max(1, limit // 2)
