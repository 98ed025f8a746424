"""The correlator: table-driven lifecycles, then random operation sequences against a model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.correlator import Correlator, LinkFull, Match
from proxy.errors import KeyInFlight, NotWritten

CONNECTIONS = ["a/0#1", "a/0#2", "b/0#1"]
KEYS = [("0200", "T1", f"{n:06d}") for n in range(4)]
K = KEYS[0]


def _written(table: Correlator[str], key: tuple[str, ...], waiter: str, conn: str) -> None:
    table.open(key, waiter)
    table.claim_write(key, waiter, conn, limit=10)


def test_an_answer_is_delivered_once_and_only_from_its_connection() -> None:
    table: Correlator[str] = Correlator()
    _written(table, K, "w0", "a/0#1")
    with pytest.raises(KeyInFlight):
        table.open(K, "w1")
    assert table.in_flight("a/0#1") == 1
    assert table.resolve("a/0#2", K) is None  # the same link, reconnected: not its answer
    assert table.resolve("a/0#1", K) == Match("w0", late=False)
    assert table.resolve("a/0#1", K) is None  # a duplicate answer is delivered once
    assert table.in_flight("a/0#1") == 0
    table.finish(K, "w0", answered=True)
    assert len(table) == 0


def test_a_write_that_left_nothing_unties_the_request_for_another_connection() -> None:
    table: Correlator[str] = Correlator()
    _written(table, K, "w0", "a/0#1")
    table.unclaim_write(K, "w1", "a/0#1")  # another waiter's undo: not this request's
    table.unclaim_write(K, "w0", "a/0#2")  # nor another connection's
    assert table.in_flight("a/0#1") == 1
    table.unclaim_write(K, "w0", "a/0#1")
    assert table.in_flight("a/0#1") == 0
    assert table.fail_connection("a/0#1") == []  # it is no longer that connection's
    table.claim_write(K, "w0", "b/0#1", limit=10)
    assert table.resolve("a/0#1", K) is None
    assert table.resolve("b/0#1", K) == Match("w0", late=False)


def test_no_answer_is_accepted_before_the_request_is_written() -> None:
    table: Correlator[str] = Correlator()
    table.open(K, "w0")
    assert table.resolve("a/0#1", K) is None
    assert len(table) == 1


def test_a_written_request_is_never_written_again() -> None:
    table: Correlator[str] = Correlator()
    _written(table, K, "w0", "a/0#1")
    with pytest.raises(NotWritten):
        table.claim_write(K, "w0", "b/0#1", limit=10)
    with pytest.raises(NotWritten):
        table.claim_write(K, "someone else", "b/0#1", limit=10)


def test_finish_never_removes_a_newer_request_with_the_same_key() -> None:
    table: Correlator[str] = Correlator()
    _written(table, K, "old", "a/0#1")
    assert table.resolve("a/0#1", K) == Match("old", late=False)
    table.open(K, "new")
    table.finish(K, "old", answered=False)
    with pytest.raises(KeyInFlight):
        table.open(K, "newest")


def test_an_unanswered_written_request_keeps_its_key_for_the_late_answer() -> None:
    table: Correlator[str] = Correlator()
    _written(table, K, "timed-out", "a/0#1")
    table.finish(K, "timed-out", answered=False)
    with pytest.raises(KeyInFlight):
        table.open(K, "reuse")  # the switch still owes the answer
    assert (table.in_flight("a/0#1"), table.stale("a/0#1")) == (1, 1)
    assert table.resolve("a/0#1", K) == Match("timed-out", late=True)
    assert (table.in_flight("a/0#1"), table.stale("a/0#1")) == (0, 0)
    table.open(K, "reuse")


def test_a_dead_connection_fails_its_live_requests_and_drops_its_tombstones() -> None:
    table: Correlator[str] = Correlator()
    _written(table, KEYS[0], "live", "a/0#1")
    _written(table, KEYS[1], "tomb", "a/0#1")
    table.finish(KEYS[1], "tomb", answered=False)
    table.open(KEYS[2], "unsent")
    _written(table, KEYS[3], "elsewhere", "b/0#1")
    assert table.fail_connection("a/0#1") == ["live"]
    assert (table.in_flight("a/0#1"), table.stale("a/0#1")) == (0, 0)
    table.open(KEYS[1], "reuse")  # the tombstone's key is free again
    table.claim_write(KEYS[2], "unsent", "a/0#2", limit=1)  # unsent: free to go anywhere
    assert len(table) == 3


def test_a_request_never_written_is_simply_forgotten() -> None:
    table: Correlator[str] = Correlator()
    table.open(K, "w0")
    table.finish(K, "w0", answered=False)
    assert len(table) == 0


def test_the_limit_counts_written_requests_and_tombstones() -> None:
    table: Correlator[str] = Correlator()
    _written(table, KEYS[0], "w0", "a/0#1")
    table.finish(KEYS[0], "w0", answered=False)
    table.open(KEYS[1], "w1")
    with pytest.raises(LinkFull):
        table.claim_write(KEYS[1], "w1", "a/0#1", limit=1)
    table.claim_write(KEYS[1], "w1", "b/0#1", limit=1)
    assert table.in_flight("b/0#1") == 1


@dataclass
class _Model:
    waiter: str
    connection: str | None = None
    tombstone: bool = False


_operations = st.lists(
    st.tuples(
        st.sampled_from(["open", "write", "unwrite", "resolve", "fail", "answered", "unanswered"]),
        st.sampled_from(KEYS),
        st.sampled_from(CONNECTIONS),
    ),
    max_size=80,
)


@given(_operations)
def test_matches_a_model(operations: list[tuple[str, tuple[str, ...], str]]) -> None:
    limit = 2
    table: Correlator[str] = Correlator()
    model: dict[tuple[str, ...], _Model] = {}
    serial = 0

    def load(conn: str) -> int:
        return sum(1 for m in model.values() if m.connection == conn)

    for op, key, conn in operations:
        entry = model.get(key)
        if op == "open":
            if entry is not None:
                with pytest.raises(KeyInFlight):
                    table.open(key, "x")
            else:
                serial += 1
                waiter = f"w{serial}"
                table.open(key, waiter)
                model[key] = _Model(waiter)
        elif op == "write" and entry is not None:
            if entry.connection is not None:
                with pytest.raises(NotWritten):
                    table.claim_write(key, entry.waiter, conn, limit)
            elif load(conn) >= limit:
                with pytest.raises(LinkFull):
                    table.claim_write(key, entry.waiter, conn, limit)
            else:
                table.claim_write(key, entry.waiter, conn, limit)
                entry.connection = conn
        elif op == "unwrite" and entry is not None:
            table.unclaim_write(key, entry.waiter, conn)
            if entry.connection == conn and not entry.tombstone:
                entry.connection = None
        elif op == "resolve":
            expected = None
            if entry is not None and entry.connection == conn:
                expected = Match(entry.waiter, late=entry.tombstone)
                del model[key]
            assert table.resolve(conn, key) == expected
        elif op == "fail":
            expected_failed = sorted(
                m.waiter for m in model.values() if m.connection == conn and not m.tombstone
            )
            assert sorted(table.fail_connection(conn)) == expected_failed
            model = {k: m for k, m in model.items() if m.connection != conn}
        elif op in ("answered", "unanswered") and entry is not None and not entry.tombstone:
            table.finish(key, entry.waiter, answered=op == "answered")
            if op == "answered" or entry.connection is None:
                del model[key]
            else:
                entry.tombstone = True
        assert len(table) == len(model)
        for each in CONNECTIONS:
            assert table.in_flight(each) == load(each)
            assert table.stale(each) == sum(
                1 for m in model.values() if m.connection == each and m.tombstone
            )


def test_a_repeat_with_the_same_tag_takes_over_its_own_tombstone() -> None:
    table: Correlator[str] = Correlator()
    table.open(K, "first", tag="reversal:1")
    table.claim_write(K, "first", "a/0#1", limit=10)
    table.finish(K, "first", answered=False)  # timed out: a tombstone
    with pytest.raises(KeyInFlight):
        table.open(K, "someone else", tag="reversal:2")
    table.open(K, "repeat", tag="reversal:1")  # the same reversal, again
    table.claim_write(K, "repeat", "a/0#1", limit=10)
    assert (table.in_flight("a/0#1"), table.stale("a/0#1")) == (1, 0)
    assert table.resolve("a/0#1", K) == Match("repeat", late=False)
