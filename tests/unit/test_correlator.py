"""The correlator against a simple model, under random sequences of operations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.correlator import Correlator, LinkFull
from proxy.errors import KeyInFlight

LINKS = ["a/0", "a/1", "b/0"]
KEYS = [("0200", "T1", f"{n:06d}") for n in range(4)]


def test_lifecycle() -> None:
    table: Correlator[str] = Correlator()
    table.open(KEYS[0], "w0")
    with pytest.raises(KeyInFlight):
        table.open(KEYS[0], "w1")
    table.bind(KEYS[0], "a/0", limit=1)
    assert table.in_flight("a/0") == 1
    assert table.resolve("a/1", KEYS[0]) is None  # an answer on the wrong link matches nothing
    assert table.resolve("a/0", KEYS[0]) == "w0"
    assert table.resolve("a/0", KEYS[0]) is None  # a duplicate answer is delivered once
    assert table.in_flight("a/0") == 0
    table.close(KEYS[0], "w0")
    assert len(table) == 0


def test_close_never_removes_a_newer_request_with_the_same_key() -> None:
    table: Correlator[str] = Correlator()
    table.open(KEYS[0], "old")
    table.bind(KEYS[0], "a/0", limit=5)
    assert table.resolve("a/0", KEYS[0]) == "old"
    table.open(KEYS[0], "new")
    table.close(KEYS[0], "old")
    with pytest.raises(KeyInFlight):
        table.open(KEYS[0], "newest")


def test_link_limit_and_failover_rebinding() -> None:
    table: Correlator[str] = Correlator()
    table.open(KEYS[0], "w0")
    table.open(KEYS[1], "w1")
    table.bind(KEYS[0], "a/0", limit=1)
    with pytest.raises(LinkFull):
        table.bind(KEYS[1], "a/0", limit=1)
    table.bind(KEYS[1], "a/1", limit=1)
    table.bind(KEYS[1], "b/0", limit=1)  # rebinding frees the first link's slot
    assert (table.in_flight("a/1"), table.in_flight("b/0")) == (0, 1)
    assert table.fail_link("b/0") == ["w1"]
    assert table.resolve("b/0", KEYS[1]) is None
    assert table.fail_link("a/0") == ["w0"]
    assert len(table) == 0


_operations = st.lists(
    st.tuples(
        st.sampled_from(["open", "bind", "resolve", "fail", "close"]),
        st.sampled_from(KEYS),
        st.sampled_from(LINKS),
    ),
    max_size=60,
)


@given(_operations)
def test_matches_a_model(operations: list[tuple[str, tuple[str, ...], str]]) -> None:
    table: Correlator[str] = Correlator()
    model: dict[tuple[str, ...], tuple[str, str | None]] = {}  # key -> (waiter, link)
    serial = 0
    for op, key, link in operations:
        if op == "open":
            if key in model:
                with pytest.raises(KeyInFlight):
                    table.open(key, "x")
            else:
                serial += 1
                waiter = f"w{serial}"
                table.open(key, waiter)
                model[key] = (waiter, None)
        elif op == "bind" and key in model:
            load = sum(1 for _, bound in model.values() if bound == link)
            full = model[key][1] != link and load >= 2
            if full:
                with pytest.raises(LinkFull):
                    table.bind(key, link, limit=2)
            else:
                table.bind(key, link, limit=2)
                model[key] = (model[key][0], link)
        elif op == "resolve":
            expected = model[key][0] if key in model and model[key][1] == link else None
            assert table.resolve(link, key) == expected
            if expected is not None:
                del model[key]
        elif op == "fail":
            failed = sorted(table.fail_link(link))
            assert failed == sorted(w for w, bound in model.values() if bound == link)
            model = {k: v for k, v in model.items() if v[1] != link}
        elif op == "close" and key in model:
            table.close(key, model.pop(key)[0])
        assert len(table) == len(model)
        for each in LINKS:
            assert table.in_flight(each) == sum(1 for _, bound in model.values() if bound == each)
