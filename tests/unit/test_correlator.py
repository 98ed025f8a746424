"""The correlator: table-driven lifecycles, then random operation sequences against a model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.correlator import Correlator, LinkFull, Match
from proxy.errors import KeyInFlight, NotWritten

LINKS = ["a/0", "a/1", "b/0"]
KEYS = [("0200", "T1", f"{n:06d}") for n in range(4)]
K = KEYS[0]


def _sent(table: Correlator[str], key: tuple[str, ...], waiter: str, link: str) -> None:
    table.open(key, waiter, now=0.0)
    table.bind(key, waiter, link, limit=10)
    table.mark_sent(key, waiter)


def test_an_answer_is_delivered_once_and_only_from_its_link() -> None:
    table: Correlator[str] = Correlator()
    _sent(table, K, "w0", "a/0")
    with pytest.raises(KeyInFlight):
        table.open(K, "w1", now=0.0)
    assert table.in_flight("a/0") == 1
    assert table.resolve("a/1", K) is None
    assert table.resolve("a/0", K) == Match("w0", late=False)
    assert table.resolve("a/0", K) is None
    assert table.in_flight("a/0") == 0
    table.finish(K, "w0")
    assert len(table) == 0


def test_no_answer_is_accepted_before_the_request_is_written() -> None:
    table: Correlator[str] = Correlator()
    table.open(K, "w0", now=0.0)
    table.bind(K, "w0", "a/0", limit=1)
    assert table.resolve("a/0", K) is None


def test_finish_never_removes_a_newer_request_with_the_same_key() -> None:
    table: Correlator[str] = Correlator()
    _sent(table, K, "old", "a/0")
    assert table.resolve("a/0", K) == Match("old", late=False)
    table.open(K, "new", now=0.0)
    table.finish(K, "old")
    with pytest.raises(KeyInFlight):
        table.open(K, "newest", now=0.0)
    with pytest.raises(NotWritten):
        table.bind(K, "old", "a/0", limit=1)


def test_a_timed_out_request_keeps_its_key_for_the_late_answer() -> None:
    table: Correlator[str] = Correlator()
    _sent(table, K, "timed-out", "a/0")
    table.finish(K, "timed-out", late_until=30.0)
    with pytest.raises(KeyInFlight):
        table.open(K, "reuse", now=10.0)  # the key is not free: the switch still owes it
    assert table.in_flight("a/0") == 1
    assert table.resolve("a/0", K) == Match("timed-out", late=True)
    table.open(K, "reuse", now=11.0)
    assert len(table) == 1


def test_tombstones_expire() -> None:
    table: Correlator[str] = Correlator()
    _sent(table, KEYS[0], "w0", "a/0")
    _sent(table, KEYS[1], "w1", "a/0")
    table.finish(KEYS[0], "w0", late_until=5.0)
    table.finish(KEYS[1], "w1", late_until=9.0)
    table.expire(now=6.0)
    assert (len(table), table.in_flight("a/0")) == (1, 1)
    table.open(KEYS[1], "again", now=9.0)  # expired on the spot
    assert (len(table), table.in_flight("a/0")) == (1, 0)


def test_a_request_that_was_never_written_is_simply_forgotten() -> None:
    table: Correlator[str] = Correlator()
    table.open(K, "w0", now=0.0)
    table.bind(K, "w0", "a/0", limit=1)
    table.finish(K, "w0", late_until=30.0)
    assert len(table) == 0


def test_link_limit_failover_and_link_failure() -> None:
    table: Correlator[str] = Correlator()
    _sent(table, KEYS[0], "w0", "a/0")
    table.open(KEYS[1], "w1", now=0.0)
    with pytest.raises(LinkFull):
        table.bind(KEYS[1], "w1", "a/0", limit=1)
    table.bind(KEYS[1], "w1", "a/1", limit=1)
    table.bind(KEYS[1], "w1", "b/0", limit=1)  # rebinding frees the first link's slot
    assert (table.in_flight("a/1"), table.in_flight("b/0")) == (0, 1)
    # b/0 dies before w1 was written: w1 is not failed, just unbound, free to fail over.
    assert table.fail_link("b/0") == []
    table.bind(KEYS[1], "w1", "a/1", limit=1)
    table.mark_sent(KEYS[1], "w1")
    with pytest.raises(NotWritten):
        table.bind(KEYS[1], "w1", "b/0", limit=1)  # once written, never sent elsewhere
    assert table.fail_link("a/1") == ["w1"]
    assert table.fail_link("a/0") == ["w0"]
    assert len(table) == 0


@dataclass
class _Model:
    waiter: str
    link: str | None = None
    sent: bool = False
    late_until: float | None = None


_operations = st.lists(
    st.tuples(
        st.sampled_from(["open", "bind", "send", "resolve", "fail", "finish", "timeout", "tick"]),
        st.sampled_from(KEYS),
        st.sampled_from(LINKS),
    ),
    max_size=80,
)


@given(_operations)
def test_matches_a_model(operations: list[tuple[str, tuple[str, ...], str]]) -> None:
    limit = 2
    table: Correlator[str] = Correlator()
    model: dict[tuple[str, ...], _Model] = {}
    now = 0.0
    serial = 0

    def load(link: str) -> int:
        return sum(1 for m in model.values() if m.link == link)

    for op, key, link in operations:
        entry = model.get(key)
        if op == "tick":
            now += 1.0
            table.expire(now)
            model = {k: m for k, m in model.items() if m.late_until is None or m.late_until > now}
        elif op == "open":
            if entry is not None and (entry.late_until is None or entry.late_until > now):
                with pytest.raises(KeyInFlight):
                    table.open(key, "x", now)
            else:
                serial += 1
                waiter = f"w{serial}"
                table.open(key, waiter, now)
                model[key] = _Model(waiter)
        elif op == "bind" and entry is not None:
            if entry.sent:
                with pytest.raises(NotWritten):
                    table.bind(key, entry.waiter, link, limit)
            elif entry.link != link and load(link) >= limit:
                with pytest.raises(LinkFull):
                    table.bind(key, entry.waiter, link, limit)
            else:
                table.bind(key, entry.waiter, link, limit)
                entry.link = link
        elif op == "send" and entry is not None and entry.link is not None:
            table.mark_sent(key, entry.waiter)
            entry.sent = True
        elif op == "resolve":
            expected = None
            if entry is not None and entry.sent and entry.link == link:
                expected = Match(entry.waiter, late=entry.late_until is not None)
                del model[key]
            assert table.resolve(link, key) == expected
        elif op == "fail":
            expected_failed = sorted(
                m.waiter
                for m in model.values()
                if m.link == link and m.sent and m.late_until is None
            )
            assert sorted(table.fail_link(link)) == expected_failed
            model = {k: m for k, m in model.items() if not (m.link == link and m.sent)}
            for m in model.values():
                if m.link == link:
                    m.link = None
        elif op in ("finish", "timeout") and entry is not None and entry.late_until is None:
            if op == "timeout" and entry.sent and entry.link is not None:
                table.finish(key, entry.waiter, late_until=now + 2)
                entry.late_until = now + 2
            else:
                table.finish(key, entry.waiter)
                del model[key]
        assert len(table) == len(model)
        for each in LINKS:
            assert table.in_flight(each) == load(each)
