"""Pure checks at the HTTP edge: what PostgreSQL cannot store is found and located."""

import pytest

from cai_dpo.core.storable import MAX_JSON_DEPTH, find_unstorable

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ({"a": ["ok", {"b": "text"}], "n": 1.5}, None),
        ("x\x00", ("", "contains a NUL character (\\u0000)")),
        ({"a": [1, "x\x00"]}, ("a.1", "contains a NUL character (\\u0000)")),
        ({"a": {"b": "\ud800"}}, ("a.b", "contains a lone surrogate (not valid Unicode)")),
        ({"a": {"\x00": 1}}, ("a", "a key contains a NUL character (\\u0000)")),
        ({"a": [float("inf")]}, ("a.0", "inf is not a JSON number")),
        ({"a": float("nan")}, ("a", "nan is not a JSON number")),
    ],
)
def test_find_unstorable(value, found):
    assert find_unstorable(value) == found


def test_deep_nesting_does_not_exhaust_the_stack():
    value: list = ["\x00"]
    for _ in range(50_000):
        value = [value]
    where, reason = find_unstorable(value)
    # Refused at the depth cap, without recursing: deeper values fail to serialise (a 500 once).
    assert where == ".".join(["0"] * MAX_JSON_DEPTH) and reason == f"nested more than {MAX_JSON_DEPTH} deep"
    shallow: list = ["\x00"]
    for _ in range(MAX_JSON_DEPTH - 1):
        shallow = [shallow]
    assert find_unstorable(shallow) == (
        ".".join(["0"] * MAX_JSON_DEPTH),
        "contains a NUL character (\\u0000)",
    )
