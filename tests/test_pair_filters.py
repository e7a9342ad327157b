"""Filters of `/pairs`, `/export` and the console added with the content flags: pairs record
chosen/rejected length in characters (`length_ratio`, derived by PostgreSQL) and are filtered on it
(`min_length_ratio`, `max_length_ratio`), and on one quality flag (`flag`)."""

import json

import pytest

from cai_dpo.core.db import session_scope
from cai_dpo.core.tables import Pair

pytestmark = pytest.mark.db

# (chosen, rejected): ratios 0.5, 1, 2, 4 and none (an empty rejected answer).
TEXTS = [("ab", "abcd"), ("abcd", "wxyz"), ("abcdefgh", "wxyz"), ("x" * 40, "y" * 10), ("abc", "")]


def insert(db) -> None:
    with session_scope(db) as session:
        session.execute(
            Pair.__table__.insert(),
            [
                {
                    "source": "test",
                    "constitution_name": "harmless",
                    "prompt": [{"role": "user", "content": f"prompt {i}"}],
                    "chosen": chosen,
                    "rejected": rejected,
                    "flags": [],
                }
                for i, (chosen, rejected) in enumerate(TEXTS)
            ],
        )


def test_pairs_report_and_filter_on_the_length_ratio(client, db):
    insert(db)
    items = client.get("/pairs").json()["items"]
    assert [item["length_ratio"] for item in items] == [0.5, 1.0, 2.0, 4.0, None]
    assert client.get("/pairs/4").json()["length_ratio"] == 4.0

    def ids(route, **params):
        if route == "/pairs":
            return [item["id"] for item in client.get(route, params=params).json()["items"]]
        rows = client.get(route, params={"metadata": True, **params}).text.splitlines()
        return sorted(json.loads(row)["id"] for row in rows)

    for route in ("/pairs", "/export"):
        assert ids(route, max_length_ratio=2) == [1, 2, 3]
        assert ids(route, min_length_ratio=1) == [2, 3, 4]
        assert ids(route, min_length_ratio=0.75, max_length_ratio=1.5) == [2]
    assert 'name="max_length_ratio"' in client.get("/ui/pairs").text
    page = client.get("/ui/pairs", params={"max_length_ratio": "1.5"}).text
    assert 'data-pair="1"' in page and 'data-pair="3"' not in page
    assert "Length ratio" in client.get("/ui/pairs/3").text


@pytest.mark.parametrize("params", [{"max_length_ratio": -1}, {"min_length_ratio": "long"}])
def test_a_bad_length_ratio_is_refused_naming_the_field(client, params):
    for route in ("/pairs", "/export"):
        response = client.get(route, params=params)
        field = next(iter(params))
        assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}:")


def test_the_flag_filter_lists_the_pairs_carrying_that_flag(client, db):
    with session_scope(db) as session:
        session.execute(
            Pair.__table__.insert(),
            [
                {"source": "test", "prompt": [], "chosen": "c", "rejected": "r", "flags": flags}
                for flags in ([], ["copies_example"], ["meta_revision", "copies_example"], ["truncated"])
            ],
        )
    listed = client.get("/pairs", params={"flag": "copies_example"}).json()["items"]
    assert [item["id"] for item in listed] == [2, 3]
    exported = client.get("/export", params={"flag": "copies_example", "metadata": True}).text.splitlines()
    assert [json.loads(row)["id"] for row in exported] == [2, 3]
    assert [item["id"] for item in client.get("/pairs").json()["items"]] == [1]
    assert [
        item["id"] for item in client.get("/pairs", params={"flag": "inconsistent"}).json()["items"]
    ] == []
    refused = client.get("/pairs", params={"flag": "made_up"})
    assert refused.status_code == 422 and refused.json()["detail"].startswith("flag:")
    page = client.get("/ui/pairs", params={"flag": "meta_revision"}).text
    assert 'data-pair="3"' in page and 'data-pair="2"' not in page
    assert " selected>meta_revision</option>" in page
