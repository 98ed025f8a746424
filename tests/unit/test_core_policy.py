"""The pure core: policy table, match keys, proxy-built answers, balancing and backoff."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codec import Message, Mti, Salvage
from fixtures.messages import echo, financial
from proxy import decisions
from proxy.backoff import Backoff
from proxy.balancer import RoundRobin
from proxy.decisions import Action
from proxy.errors import (
    KeyInFlight,
    LinkLost,
    MissingKeyField,
    NoLinkAvailable,
    ProxyError,
    UnencodableMessage,
    UpstreamTimeout,
)
from proxy.keys import match_key
from proxy.responses import answer, answer_salvaged


def _msg(mti: str, **fields: str) -> Message:
    return Message(Mti.parse(mti), {k.lstrip("f"): v for k, v in fields.items()})


@pytest.mark.parametrize(
    ("mti", "fields", "action", "rc"),
    [
        ("0100", {}, Action.FORWARD, None),
        ("0101", {}, Action.FORWARD, None),
        ("0200", {}, Action.FORWARD, None),
        ("0201", {}, Action.FORWARD, None),
        ("0220", {}, Action.FORWARD, None),
        ("0221", {}, Action.FORWARD, None),
        ("0400", {}, Action.FORWARD, None),
        ("0401", {}, Action.FORWARD, None),
        ("0420", {}, Action.FORWARD, None),
        ("0421", {}, Action.FORWARD, None),
        ("0800", {"f70": "301"}, Action.ANSWER, "00"),
        ("0800", {"f70": "001"}, Action.ANSWER, "12"),
        ("0800", {}, Action.ANSWER, "12"),
        ("0300", {}, Action.ANSWER, "12"),
        ("0500", {}, Action.ANSWER, "12"),
        ("0210", {}, Action.DROP, None),
        ("0810", {"f70": "301"}, Action.DROP, None),
    ],
)
def test_from_terminal(mti: str, fields: dict[str, str], action: Action, rc: str | None) -> None:
    decision = decisions.from_terminal(_msg(mti, **fields))
    assert (decision.action, decision.rc) == (action, rc)


@pytest.mark.parametrize(
    ("mti", "action", "rc"),
    [
        ("0110", Action.MATCH, None),
        ("0210", Action.MATCH, None),
        ("0230", Action.MATCH, None),
        ("0410", Action.MATCH, None),
        ("0810", Action.OWN, None),
        ("0830", Action.OWN, None),
        ("0800", Action.ANSWER, "00"),
        ("0820", Action.ANSWER, "00"),
        ("0200", Action.DROP, None),
        ("0620", Action.DROP, None),
    ],
)
def test_from_switch(mti: str, action: Action, rc: str | None) -> None:
    decision = decisions.from_switch(_msg(mti))
    assert (decision.action, decision.rc) == (action, rc)


@pytest.mark.parametrize(
    ("error", "rc"),
    [
        (MissingKeyField("41"), "30"),
        (UnencodableMessage("x"), "30"),
        (KeyInFlight("x"), "94"),
        (NoLinkAvailable("x"), "91"),
        (LinkLost("x"), "91"),
        (UpstreamTimeout("x"), "91"),
        (ProxyError("anything else"), "96"),
    ],
)
def test_failure_rc(error: ProxyError, rc: str) -> None:
    assert decisions.failure_rc(error) == rc


@pytest.mark.parametrize(
    ("unanswered", "limit", "recycle"),
    [(0, 1000, False), (499, 1000, False), (500, 1000, True), (0, 1, False), (1, 1, True)],
)
def test_a_connection_is_recycled_when_half_its_slots_hold_unanswered_requests(
    unanswered: int, limit: int, recycle: bool
) -> None:
    assert decisions.should_recycle(unanswered, limit) is recycle


def test_request_repeat_and_response_share_a_match_key() -> None:
    fields = ("41", "11")
    request = financial(12, "TERM0042")
    repeat = request.with_fields({}, mti=Mti.parse("0201"))
    response = request.with_fields({"39": "00"}, mti=Mti.parse("0210"))
    assert match_key(request, fields) == match_key(repeat, fields) == match_key(response, fields)
    assert match_key(request, fields) == ("0200", "TERM0042", "000012")
    other_terminal = financial(12, "TERM0043")
    assert match_key(other_terminal, fields) != match_key(request, fields)
    reversal = request.with_fields({}, mti=Mti.parse("0400"))
    assert match_key(reversal, fields) != match_key(request, fields)


def test_match_key_requires_every_key_field() -> None:
    with pytest.raises(MissingKeyField) as caught:
        match_key(financial(1).with_fields({"41": None}), ("41", "11"))
    assert caught.value.field == "41"


def test_answers_echo_identification_and_never_card_data() -> None:
    request = financial(5).with_fields({"35": "4111111111111111=2512", "52": "0123456789ABCDEF"})
    response = answer(request, "91")
    assert response.mti.code == "0210"
    assert response.get("39") == "91"
    assert response.get("11") == request.get("11")
    assert response.get("41") == request.get("41")
    assert response.get("4") == request.get("4")
    assert not {"2", "35", "52"} & set(response.fields)

    echo_reply = answer(echo(8), "00")
    assert (echo_reply.mti.code, echo_reply.get("70"), echo_reply.get("11")) == (
        "0810",
        "301",
        "000008",
    )

    salvaged = answer_salvaged(Salvage(Mti.parse("0201"), "000009", "TERM0001"), "30")
    assert salvaged.mti.code == "0210"
    assert dict(salvaged.fields) == {"11": "000009", "39": "30", "41": "TERM0001"}


@given(st.integers(min_value=1, max_value=7), st.integers(min_value=1, max_value=300))
def test_round_robin_spreads_evenly_and_offers_everyone(size: int, calls: int) -> None:
    turns: RoundRobin[int] = RoundRobin()
    candidates = list(range(size))
    firsts = []
    for _ in range(calls):
        order = turns.order(candidates)
        assert sorted(order) == candidates
        firsts.append(order[0])
    counts = [firsts.count(c) for c in candidates]
    assert max(counts) - min(counts) <= 1


def test_round_robin_with_no_candidates() -> None:
    assert RoundRobin[str]().order([]) == []


@given(st.integers(min_value=0, max_value=200), st.randoms(use_true_random=False))
def test_backoff_grows_is_capped_and_jittered(attempt: int, rng: random.Random) -> None:
    backoff = Backoff(initial=0.5, maximum=30.0)
    delay = backoff.delay(attempt, rng)
    ceiling = min(30.0, 0.5 * 2**attempt)
    assert ceiling * (1 - backoff.jitter) <= delay <= ceiling
